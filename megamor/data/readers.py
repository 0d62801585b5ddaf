"""Stream the documents of one unit of a source, counting what was skipped or repaired.

Document rules:
- .txt: `file` mode = the whole file is one document; `paragraph` = runs of lines separated by
  blank (whitespace-only) lines, joined with "\\n"; `line` = every line. See `text.py` for the
  normalisation (BOM, CRLF, invalid UTF-8).
- .jsonl: one JSON object per line, text in `text_field` (dotted path allowed). Whitespace-only
  lines are ignored. A line that is not JSON or lacks the field is an error naming file:line,
  or is skipped and counted when `skip_bad_lines` is set (--skip-bad-lines).
- A truncated or corrupt .gz/.zst stream is an error naming the file and the first line not read.
- .parquet / HF datasets: the `text_field` column; null counts as an empty document.
Whitespace-only documents are skipped and counted everywhere.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from megamor.data.errors import DataError
from megamor.data.sources import Source, Unit, load_hf
from megamor.data.text import BOM, decode_utf8, normalize_text_file

MAX_EXAMPLES = 10


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    txt_mode: str = "paragraph"
    skip_bad_lines: bool = False


@dataclass
class ReadStats:
    documents: int = 0  # documents yielded
    empty_skipped: int = 0
    bad_lines_skipped: int = 0
    blank_lines: int = 0  # whitespace-only jsonl lines (ignored, not errors)
    replaced_chars: int = 0  # invalid UTF-8 sequences / lone surrogates replaced by U+FFFD
    input_bytes: int = 0
    bad_line_examples: list[str] = field(default_factory=list)

    def add(self, other: ReadStats) -> None:
        for k in ("documents", "empty_skipped", "bad_lines_skipped", "blank_lines", "replaced_chars", "input_bytes"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        room = MAX_EXAMPLES - len(self.bad_line_examples)
        self.bad_line_examples.extend(other.bad_line_examples[: max(room, 0)])

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReadStats:
        return cls(**d)


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file (one or more frames). A file that ends inside a
    frame raises EOFError, as gzip does; zstandard's stream_reader would just stop there."""

    def __init__(self, path: str):
        import zstandard

        self._new = zstandard.ZstdDecompressor().decompressobj
        self._raw = open(path, "rb")  # noqa: SIM115  a stream object: closed in close()
        self._dobj: Any = None  # None between frames
        self._pending = b""  # compressed bytes not yet fed
        self._out = memoryview(b"")  # decompressed bytes not yet returned

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not len(self._out):
            if not self._pending:
                self._pending = self._raw.read(1 << 16)
                if not self._pending:
                    if self._dobj is not None:
                        raise EOFError("compressed file ended before the end of its last zstd frame")
                    return 0
            if self._dobj is None:
                self._dobj = self._new()
            data, self._pending = self._pending, b""
            self._out = memoryview(self._dobj.decompress(data))
            if self._dobj.eof:  # frame done; what follows is the next frame
                self._pending, self._dobj = self._dobj.unused_data, None
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _stream_problem(source: Source, e: BaseException) -> str:
    """What is wrong with a file whose read failed (a truncated download, a corrupt archive)."""
    if isinstance(e, EOFError):
        return f"the {source.compression} stream is truncated (the file ends before its end-of-stream marker)"
    if source.compression:
        return f"corrupt {source.compression} data ({type(e).__name__}: {e})"
    return f"cannot read ({type(e).__name__}: {e})"


def read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a failing read of a (compressed) input raises."""
    import zlib

    errors: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def open_binary(source: Source) -> IO[bytes]:
    if source.compression == "gz":
        return gzip.open(source.path, "rb")
    if source.compression == "zst":
        return io.BufferedReader(_ZstdFrames(source.path), 1 << 20)
    return open(source.path, "rb", buffering=1 << 20)


def read_whole(source: Source) -> bytes:
    """All (decompressed) bytes of a source; a truncated or corrupt file is a DataError naming it."""
    try:
        with open_binary(source) as f:
            return f.read()
    except read_errors() as e:
        raise DataError(f"{source.path}: {_stream_problem(source, e)}") from None


def line_number(path: str, offset: int) -> int:
    """1-based line number of the byte at `offset` of an uncompressed file (used for errors)."""
    n, pos = 1, 0
    with open(path, "rb") as f:
        while pos < offset:
            chunk = f.read(min(1 << 24, offset - pos))
            if not chunk:
                break
            n += chunk.count(b"\n")
            pos += len(chunk)
    return n


_BLOCK = 1 << 20


class _LineBlocks:
    """A unit's bytes in blocks of whole lines: the lines that *start* in [unit.start, unit.end).

    Line-based files are cut at arbitrary byte offsets; a line belongs to the unit in which it
    starts, so consecutive units cover every line exactly once.
    """

    def __init__(self, source: Source, unit: Unit, stats: ReadStats):
        self.source, self.unit, self.stats = source, unit, stats
        self.first_line_known = unit.start == 0  # else line numbers are computed on demand
        self.lines_yielded = 0  # complete lines handed out (for the line of a read error)
        self._error: BaseException | None = None

    def _span(self, f: IO[bytes]) -> tuple[int, int]:
        u = self.unit
        if u.end < 0:
            return 0, -1
        start = 0
        if u.start > 0:
            f.seek(u.start - 1)
            start = u.start - 1 + len(f.readline())  # the line straddling start is the previous unit's
        end = u.end
        if end < self.source.size:
            f.seek(end - 1)
            end = end - 1 + len(f.readline())
        return start, max(start, end)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """Yields (byte offset, block); a block ends with a newline except perhaps the last."""
        try:
            yield from self._blocks()
        except read_errors() as e:
            line = self.lines_yielded + 1
            where = f"{self.source.path}:{line}" if self.first_line_known else self.source.path
            raise DataError(f"{where}: {_stream_problem(self.source, e)}; the text read stops in line {line}") from None

    def _read(self, f: IO[bytes], want: int) -> bytes:
        """Up to `want` bytes. A read error after some bytes came is raised at the next call, so
        every complete line before a truncation is handed out and the error names the right line."""
        if self._error is not None:
            raise self._error
        parts, n = [], 0
        try:
            while n < want:
                chunk = f.read1(want - n)  # type: ignore[attr-defined]  # what is decompressed so far
                if not chunk:
                    break
                parts.append(chunk)
                n += len(chunk)
        except read_errors() as e:
            if not parts:
                raise
            self._error = e
        return b"".join(parts)

    def _blocks(self) -> Iterator[tuple[int, bytes]]:
        with open_binary(self.source) as f:
            start, end = self._span(f)
            if end >= 0:  # _span moved the file position
                f.seek(start)
            pos, carry = start, b""
            while True:
                want = _BLOCK if end < 0 else min(_BLOCK, end - pos - len(carry))
                data = self._read(f, want) if want > 0 else b""
                if not data:
                    if carry:
                        self.stats.input_bytes += len(carry)
                        self.lines_yielded += 1
                        yield pos, carry
                    return
                data = carry + data
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    carry = data
                    continue
                block, carry = data[:cut], data[cut:]
                self.stats.input_bytes += len(block)
                self.lines_yielded += block.count(b"\n")
                yield pos, block
                pos += len(block)

    def where(self, offset: int, rel_line: int, exact: bool = False) -> str:
        path = self.source.path
        if self.first_line_known:
            return f"{path}:{rel_line}"
        if exact:  # an error is about to stop the run: worth a scan for the true line number
            return f"{path}:{line_number(path, offset)}"
        return f"{path}@byte{offset}"


def _decode(data: bytes, stats: ReadStats) -> str:
    text, n = decode_utf8(data)
    stats.replaced_chars += n
    return text


def _emit(text: str, stats: ReadStats) -> str | None:
    if not text.strip():
        stats.empty_skipped += 1
        return None
    stats.documents += 1
    return text


def _iter_txt(source: Source, unit: Unit, opts: ReadOptions, stats: ReadStats) -> Iterator[str]:
    if opts.txt_mode == "file":
        data = read_whole(source)
        stats.input_bytes += len(data)
        doc = _emit(normalize_text_file(_decode(data, stats)), stats)
        if doc is not None:
            yield doc
        return
    para: list[str] = []
    for offset, block in _LineBlocks(source, unit, stats):
        text = _decode(block, stats).replace("\r\n", "\n")  # blocks end at \n: no CRLF is cut
        if offset == 0 and text.startswith(BOM):
            text = text[1:]
        lines = text.split("\n")
        if text.endswith("\n"):
            lines.pop()
        for line in lines:
            if opts.txt_mode == "line":
                doc = _emit(line, stats)
                if doc is not None:
                    yield doc
            elif line.strip():
                para.append(line)
            elif para:
                yield _emit("\n".join(para), stats)  # type: ignore[misc]
                para = []
    if para:
        yield _emit("\n".join(para), stats)  # type: ignore[misc]


def _get_field(obj: Any, path: str) -> tuple[bool, Any]:
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return False, None
        obj = obj[part]
    return True, obj


def _iter_jsonl(source: Source, unit: Unit, opts: ReadOptions, stats: ReadStats) -> Iterator[str]:
    blocks = _LineBlocks(source, unit, stats)
    lineno = 0
    for offset, block in blocks:
        lines = block.split(b"\n")
        if block.endswith(b"\n"):
            lines.pop()
        for raw in lines:
            lineno += 1
            line_offset = offset
            offset += len(raw) + 1
            if line_offset == 0 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM
                raw = raw[3:]
            if not raw.strip():
                stats.blank_lines += 1
                continue
            problem = ""
            try:
                try:
                    obj = json.loads(raw)  # bytes: decoded as strict UTF-8 in C
                except UnicodeDecodeError:
                    obj = json.loads(_decode(raw, stats))
            except json.JSONDecodeError as e:
                problem = f"not JSON ({e.msg} at column {e.colno})"
            else:
                found, value = _get_field(obj, opts.text_field)
                if not found:
                    problem = f"no field {opts.text_field!r}"
                elif value is None:
                    value = ""
                elif not isinstance(value, str):
                    problem = f"field {opts.text_field!r} is {type(value).__name__}, not a string"
            if problem:
                if not opts.skip_bad_lines:
                    where = blocks.where(line_offset, lineno, exact=True)
                    raise DataError(f"{where}: {problem} (pass --skip-bad-lines to skip such lines)")
                stats.bad_lines_skipped += 1
                if len(stats.bad_line_examples) < MAX_EXAMPLES:
                    stats.bad_line_examples.append(f"{blocks.where(line_offset, lineno)}: {problem}")
                continue
            doc = _emit(value, stats)
            if doc is not None:
                yield doc


def _column_values(source: Source, unit: Unit, opts: ReadOptions) -> Iterator[tuple[str, Any]]:
    """Yields (location for errors, value)."""
    if source.kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(source.path)
        if opts.text_field not in pf.schema_arrow.names:
            raise DataError(f"{source.path}: no column {opts.text_field!r} (columns: {pf.schema_arrow.names})")
        for g in range(unit.start, unit.end):
            batches = pf.iter_batches(batch_size=2048, row_groups=[g], columns=[opts.text_field])
            row = 0
            while True:
                try:  # a damaged row group: one line naming it, not pyarrow's traceback
                    batch = next(batches)
                except StopIteration:
                    break
                except (OSError, pa.ArrowException) as e:
                    raise DataError(f"{source.path} row group {g}: cannot read ({type(e).__name__}: {e})") from None
                for v in batch.column(0).to_pylist():
                    yield f"row group {g} row {row}", v
                    row += 1
        return
    ds = load_hf(source)
    if opts.text_field not in ds.column_names:
        raise DataError(f"{source.path}: no column {opts.text_field!r} (columns: {ds.column_names})")
    ds = ds.select_columns([opts.text_field]).with_format("arrow")
    for start in range(unit.start, unit.end, 2048):
        for i, v in enumerate(ds[start : min(start + 2048, unit.end)].column(0).to_pylist()):
            yield f"row {start + i}", v


def _iter_columnar(source: Source, unit: Unit, opts: ReadOptions, stats: ReadStats) -> Iterator[str]:
    for where, value in _column_values(source, unit, opts):
        if value is not None and not isinstance(value, str):
            raise DataError(f"{source.path} {where}: {opts.text_field!r} is {type(value).__name__}, not a string")
        value = value or ""
        stats.input_bytes += len(value.encode("utf-8", "surrogatepass"))
        doc = _emit(value, stats)
        if doc is not None:
            yield doc


def iter_documents(source: Source, unit: Unit, opts: ReadOptions, stats: ReadStats) -> Iterator[str]:
    """The non-empty documents of `unit`, in order; `stats` is updated as they stream."""
    if source.kind == "txt":
        return _iter_txt(source, unit, opts, stats)
    if source.kind == "jsonl":
        return _iter_jsonl(source, unit, opts, stats)
    return _iter_columnar(source, unit, opts, stats)
