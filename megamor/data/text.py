"""Bytes to text: UTF-8 decoding that replaces and counts bad bytes, and text-file normalisation.

Normalisation of .txt input (what "the input documents" means when checking a round trip):
a UTF-8 BOM at the start of a file is dropped, CRLF line ends become LF, invalid UTF-8 is
replaced by U+FFFD (each replacement counted). JSON/parquet text is taken as it is.
"""

from __future__ import annotations

_REPL = "\ufffd"
_REPL_BYTES = _REPL.encode("utf-8")
BOM = "\ufeff"


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode, replacing invalid sequences; returns (text, number of replacements made)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", "replace")
        # U+FFFD already present in valid input is not a replacement we made.
        return text, text.count(_REPL) - data.count(_REPL_BYTES)


def to_utf8(text: str) -> tuple[bytes, str, int]:
    """UTF-8 bytes of text; lone surrogates (possible from JSON escapes) become U+FFFD, counted."""
    try:
        return text.encode("utf-8"), text, 0
    except UnicodeEncodeError:
        fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        n = fixed.count(_REPL) - text.count(_REPL)
        return fixed.encode("utf-8"), fixed, n


def normalize_text_file(text: str) -> str:
    """Whole-file normalisation for txt 'file' mode (same rules as the line readers)."""
    if text.startswith(BOM):
        text = text[1:]
    return text.replace("\r\n", "\n")
