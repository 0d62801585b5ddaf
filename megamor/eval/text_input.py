"""Reading the text files an evaluation is pointed at: decode errors and empty files are one
clear error naming the file (and line and byte offset), never a traceback or a silent 0-token result."""

from __future__ import annotations

import bz2
import codecs
import gzip
import lzma
from pathlib import Path

from .tasks.base import TaskDataError, open_text

ENCODING_ERRORS = ("strict", "replace", "ignore")


def read_text(path: str | Path, encoding: str = "utf-8", errors: str = "strict") -> str:
    """The text of a file (.bz2/.gz/.xz decompressed by suffix), universal newlines as open_text.
    Undecodable bytes with errors="strict" raise TaskDataError naming the line and byte offset."""
    p = Path(path)
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise TaskDataError(p, None, f"unknown text encoding {encoding!r} (--encoding)") from None
    if errors not in ENCODING_ERRORS:
        raise TaskDataError(p, None, f"--encoding-errors must be one of {ENCODING_ERRORS}, got {errors!r}")
    open_text(p).close()  # a missing file: the same message as everywhere else
    opener = {".bz2": bz2.open, ".gz": gzip.open, ".xz": lzma.open}.get(p.suffix, open)
    with opener(p, "rb") as f:  # type: ignore[operator]
        data = f.read()
    try:
        text = data.decode(encoding, errors)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TaskDataError(p, line, f"not valid {encoding} at byte offset {e.start} ({e.reason}); pass --encoding "
                                     "(e.g. latin-1) or --encoding-errors replace") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def require_text(path: str | Path, text: str) -> str:
    if not text.strip():
        raise TaskDataError(path, None, "no text to evaluate (the file is empty or whitespace only)")
    return text
