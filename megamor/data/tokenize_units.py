"""Stage 1 of tokenize-and-shard: tokenize one unit into its "part" files.

For unit NNNNNN the parts folder gets, per split, `NNNNNN.<split>.bin` (the tokens, EOS after
every document, in the shard dtype) and `NNNNNN.<split>.len` (int64 document lengths), each
written to a temp file and renamed; then `NNNNNN.json` (counts, stats, plan fingerprint),
which marks the unit done. A killed worker leaves no json, so a rerun redoes that unit only.
Each document goes to train or valid by a keyed hash of its bytes: independent of worker,
task and unit layout, and exact duplicates always land in the same split.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from megamor.data.readers import ReadOptions, ReadStats, iter_documents
from megamor.data.sources import Source, Unit
from megamor.data.text import to_utf8
from megamor.data.tokenizer import Tokenizer, load_tokenizer
from megamor.utils.atomic import commit, temp_path, write_json

SPLITS = ("train", "valid")
_BATCH_CHARS = 1 << 18
_FLUSH_TOKENS = 1 << 18  # as Python ints ~36 bytes each: bounds a worker to ~10 MB of buffer


@dataclass(frozen=True)
class UnitJob:
    parts_dir: str
    plan_fingerprint: str
    tokenizer_path: str
    dtype: str
    eos_id: int
    read: ReadOptions
    valid_fraction: float
    split_seed: int
    source: Source
    unit: Unit
    valid_source: bool = False  # a --valid-files input: all its documents are valid documents


def is_valid_doc(text_bytes: bytes, seed: int, valid_fraction: float) -> bool:
    if valid_fraction <= 0.0:
        return False
    h = hashlib.blake2b(text_bytes, digest_size=8, key=b"split" + seed.to_bytes(8, "little")).digest()
    return int.from_bytes(h, "little") < int(valid_fraction * 2**64)


def part_paths(parts_dir: Path, unit: Unit, split: str) -> tuple[Path, Path]:
    return parts_dir / f"{unit.name}.{split}.bin", parts_dir / f"{unit.name}.{split}.len"


def done_marker(parts_dir: Path, unit: Unit) -> Path:
    return parts_dir / f"{unit.name}.json"


def read_done(parts_dir: Path, unit: Unit, plan_fingerprint: str, dtype: str) -> dict[str, Any] | None:
    """The unit's result if it finished under this plan and its files are intact, else None."""
    marker = done_marker(parts_dir, unit)
    try:
        res = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if res.get("plan_fingerprint") != plan_fingerprint:
        return None
    item = np.dtype(dtype).itemsize
    for split in SPLITS:
        tok, lens = part_paths(parts_dir, unit, split)
        s = res[split]
        if not tok.is_file() or tok.stat().st_size != s["tokens"] * item:
            return None
        if not lens.is_file() or lens.stat().st_size != s["documents"] * 8:
            return None
    return res


class _SplitOut:
    def __init__(self, final_tok: Path, final_len: Path, dtype: np.dtype):
        self.final = (final_tok, final_len)
        self.tmp = (temp_path(final_tok), temp_path(final_len))
        # written across add()/flush() calls; closed by the owner
        self.f: tuple[BinaryIO, BinaryIO] = (open(self.tmp[0], "wb"), open(self.tmp[1], "wb"))  # noqa: SIM115
        self.dtype = dtype
        self.buf: list[int] = []
        self.lens: list[int] = []
        self.tokens = 0
        self.documents = 0

    def add(self, ids: list[int], eos: int) -> None:
        self.buf.extend(ids)
        self.buf.append(eos)
        self.lens.append(len(ids) + 1)
        if len(self.buf) >= _FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.f[0].write(np.asarray(self.buf, dtype=self.dtype).tobytes())
            self.f[1].write(np.asarray(self.lens, dtype=np.int64).tobytes())
            self.tokens += len(self.buf)
            self.documents += len(self.lens)
            self.buf, self.lens = [], []

    def close(self) -> None:
        # No fsync: parts are intermediate, and read_done checks their sizes before reuse.
        # (Final shards and the manifest are fsynced.)
        self.flush()
        for f, tmp, final in zip(self.f, self.tmp, self.final):
            f.close()
            commit(tmp, final, durable=False)

    def abort(self) -> None:
        for f, tmp in zip(self.f, self.tmp):
            f.close()
            tmp.unlink(missing_ok=True)


_TOKENIZERS: dict[str, Tokenizer] = {}
_PROGRESS: Any = None  # (bytes, tokens) shared counters, set per process by set_progress


def set_progress(counters: Any) -> None:
    global _PROGRESS
    _PROGRESS = counters


def init_worker(counters: Any) -> None:
    """A pool worker: progress counters, and one thread for a Hugging Face tokenizer (the
    workers are the parallelism; `tokenizers`' own pool in each would oversubscribe the cores)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_progress(counters)


def _report(d_bytes: int, d_tokens: int) -> None:
    if _PROGRESS is None:
        return
    b, t = _PROGRESS
    with b.get_lock():
        b.value += d_bytes
    with t.get_lock():
        t.value += d_tokens


def run_unit(job: UnitJob) -> dict[str, Any]:
    """Tokenize one unit into its part files; returns what its done-marker records."""
    tok = _TOKENIZERS.get(job.tokenizer_path)
    if tok is None:
        tok = _TOKENIZERS[job.tokenizer_path] = load_tokenizer(job.tokenizer_path)
    parts = Path(job.parts_dir)
    dtype = np.dtype(job.dtype)
    outs = {s: _SplitOut(*part_paths(parts, job.unit, s), dtype) for s in SPLITS}
    stats = ReadStats()
    t0 = time.time()
    reported = [0, 0]

    def encode(batch: list[str], keys: list[bytes]) -> None:
        for text_bytes, ids in zip(keys, tok.encode_batch(batch)):
            held = job.valid_source or is_valid_doc(text_bytes, job.split_seed, job.valid_fraction)
            split = "valid" if held else "train"
            outs[split].add(ids, job.eos_id)
        tokens = sum(o.tokens + len(o.buf) for o in outs.values())
        _report(stats.input_bytes - reported[0], tokens - reported[1])
        reported[:] = [stats.input_bytes, tokens]

    try:
        batch: list[str] = []
        keys: list[bytes] = []
        chars = 0
        for doc in iter_documents(job.source, job.unit, job.read, stats):
            b, doc, n_fixed = to_utf8(doc)
            stats.replaced_chars += n_fixed
            batch.append(doc)
            keys.append(b)
            chars += len(doc)
            if chars >= _BATCH_CHARS:
                encode(batch, keys)
                batch, keys, chars = [], [], 0
        if batch:
            encode(batch, keys)
        for o in outs.values():
            o.close()
    except BaseException:
        for o in outs.values():
            o.abort()
        raise
    result = {
        "unit": {"index": job.unit.index, "source": job.unit.source, "start": job.unit.start, "end": job.unit.end},
        "plan_fingerprint": job.plan_fingerprint,
        **{s: {"tokens": o.tokens, "documents": o.documents} for s, o in outs.items()},
        "stats": stats.to_dict(),
        "seconds": round(time.time() - t0, 3),
    }
    write_json(done_marker(parts, job.unit), result, durable=False)
    return result
