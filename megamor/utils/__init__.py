"""Small helpers below every other megamor package (they import only the standard library)."""
