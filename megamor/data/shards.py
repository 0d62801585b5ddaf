"""The shard format: `.npy` token arrays (memory-mappable) plus a `.docs.npy` document index.

A split's token stream is the concatenation of its shards; every shard but the last holds
exactly `shard_tokens` tokens, so global token t lives in shard t // shard_tokens. Documents
may continue across a shard boundary. `<split>-NNNNN.docs.npy` (int64) lists the offsets, within
the shard, of the documents that *start* in it. Every document ends with EOS.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from megamor.data.errors import ShardError
from megamor.utils.atomic import commit, temp_path

UINT16_MAX_VOCAB = 65535  # ids < vocab_size <= 65,535 fit in uint16


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= UINT16_MAX_VOCAB else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.npy"


def docs_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.docs.npy"


def npy_header(dtype: np.dtype, n: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n,)}
    )
    return buf.getvalue()


def npy_size(dtype: np.dtype, n: int) -> int:
    return len(npy_header(dtype, n)) + n * np.dtype(dtype).itemsize


def shard_sizes(total: int, shard_tokens: int) -> list[int]:
    full, rest = divmod(total, shard_tokens)
    return [shard_tokens] * full + ([rest] if rest else [])


class NpyStreamWriter:
    """Writes a 1-D .npy of known length piece by piece into a temp file; `close` renames it."""

    def __init__(self, final: Path, dtype: np.dtype, n: int):
        self.final, self.dtype, self.n = final, np.dtype(dtype), n
        self.tmp = temp_path(final)
        self.f: BinaryIO = open(self.tmp, "wb")  # noqa: SIM115  written piece by piece; closed in close()/abort()
        self.sha = hashlib.sha256()
        self.written = 0
        self._put(npy_header(self.dtype, n))

    def _put(self, b: bytes | memoryview) -> None:
        self.f.write(b)
        self.sha.update(b)

    def write(self, arr: np.ndarray) -> None:
        if self.written + len(arr) > self.n:
            raise ShardError(f"{self.final.name}: writing past its planned length {self.n}")
        self._put(memoryview(np.ascontiguousarray(arr, dtype=self.dtype)).cast("B"))
        self.written += len(arr)

    def close(self) -> str:
        if self.written != self.n:
            raise ShardError(f"{self.final.name}: wrote {self.written} of {self.n} planned items")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        commit(self.tmp, self.final)
        return self.sha.hexdigest()

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def write_npy(final: Path, arr: np.ndarray, dtype: np.dtype) -> str:
    w = NpyStreamWriter(final, dtype, len(arr))
    try:
        w.write(arr)
    except BaseException:
        w.abort()
        raise
    return w.close()


def open_npy(path: Path, dtype: np.dtype, n: int, what: str = "shard") -> np.memmap:
    """Memory-map a shard, checking it is complete and has the manifest's dtype and length."""
    if not path.is_file():
        raise ShardError(f"{path}: {what} listed in the manifest is missing")
    expected = npy_size(dtype, n)
    size = path.stat().st_size
    if size != expected:
        kind = "truncated" if size < expected else "longer than expected"
        raise ShardError(f"{path}: {what} is {kind} ({size} bytes, manifest implies {expected})")
    try:
        arr = np.load(path, mmap_mode="r")
    except Exception as e:  # noqa: BLE001  numpy raises ValueError/OSError/EOFError/... on a corrupt header
        raise ShardError(f"{path}: {what} is corrupted (cannot read the .npy header: {e})") from None
    if arr.dtype != np.dtype(dtype) or arr.shape != (n,):
        raise ShardError(f"{path}: {what} holds {arr.dtype}{list(arr.shape)}, manifest says {np.dtype(dtype)}[{n}]")
    return arr
