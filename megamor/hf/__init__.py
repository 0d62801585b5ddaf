"""Hugging Face interop for MoR models: the self-contained config and modeling files megamor
copies into export folders (loaded with trust_remote_code=True), and the writer."""
