"""Stage 2 of tokenize-and-shard: join the parts of every unit, in unit order, into shards.

This is the whole of the "merge" step of a SLURM job array, and the last step of a single
run, so both produce the same bytes. Memory stays bounded: parts are memory-mapped and
copied in chunks. A shard whose final file already exists with the planned size is kept
(files only ever appear under final names by atomic rename, and the plan fingerprint of the
folder guarantees it came from this same run).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from megamor.data.errors import DataError
from megamor.data.manifest import FORMAT, MANIFEST, PLAN, VERSION
from megamor.data.readers import ReadStats
from megamor.data.shards import (
    NpyStreamWriter,
    docs_name,
    npy_size,
    shard_name,
    shard_sizes,
    write_npy,
)
from megamor.data.sources import Unit
from megamor.data.tokenize_units import SPLITS, part_paths, read_done
from megamor.data.tokenizer import file_sha256
from megamor.utils.atomic import remove_temps, write_json

_DOC_CHUNK = 1 << 20
_TOKEN_CHUNK = 1 << 21


def load_plan(out_dir: Path) -> dict[str, Any]:
    p = out_dir / PLAN
    if not p.is_file():
        raise DataError(f"{p}: no plan; run tokenize_and_shard on this folder first")
    return json.loads(p.read_text())


class _SplitWriter:
    """Receives a split's tokens in order and cuts them into fixed-size shards."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, sizes: list[int]):
        self.out, self.split, self.dtype, self.sizes = out, split, dtype, sizes
        self.k = -1
        self.shard_start = 0
        self.remaining = 0
        self.writer: NpyStreamWriter | None = None
        self.pending: list[np.ndarray] = []  # global doc starts not yet given to a shard
        self.meta: list[dict[str, Any]] = []

    def add(self, tokens: np.ndarray, doc_starts: np.ndarray) -> None:
        self.pending.append(doc_starts)
        i = 0
        while i < len(tokens):
            if self.remaining == 0:
                self._open_next()
            n = min(self.remaining, len(tokens) - i)
            if self.writer is not None:
                self.writer.write(tokens[i : i + n])
            i += n
            self.remaining -= n
            if self.remaining == 0:
                self._close()

    def _open_next(self) -> None:
        self.k += 1
        if self.k > 0:
            self.shard_start += self.sizes[self.k - 1]
        n = self.sizes[self.k]
        self.remaining = n
        final = self.out / shard_name(self.split, self.k)
        done = final.is_file() and final.stat().st_size == npy_size(self.dtype, n)
        self.writer = None if done else NpyStreamWriter(final, self.dtype, n)

    def _close(self) -> None:
        n = self.sizes[self.k]
        starts = np.concatenate(self.pending) if self.pending else np.zeros(0, np.int64)
        end = self.shard_start + n
        mine = starts[starts < end]
        self.pending = [starts[starts >= end]]
        final = self.out / shard_name(self.split, self.k)
        sha = self.writer.close() if self.writer is not None else file_sha256(final)
        docs = (mine - self.shard_start).astype(np.int64)
        docs_sha = write_npy(self.out / docs_name(self.split, self.k), docs, np.dtype(np.int64))
        self.meta.append({
            "file": final.name, "docs_file": docs_name(self.split, self.k), "tokens": n,
            "documents": len(docs), "sha256": sha, "docs_sha256": docs_sha,
        })
        self.writer = None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _write_split(out: Path, parts: Path, units: list[Unit], results: list[dict], split: str,
                 dtype: np.dtype, shard_tokens: int) -> dict[str, Any]:
    total = sum(r[split]["tokens"] for r in results)
    w = _SplitWriter(out, split, dtype, shard_sizes(total, shard_tokens))
    pos = 0
    try:
        for unit, res in zip(units, results):
            if res[split]["tokens"] == 0:
                continue
            tok_path, len_path = part_paths(parts, unit, split)
            # Plain chunked reads, not memmap: mapped pages would count as resident memory.
            with open(tok_path, "rb") as tf, open(len_path, "rb") as lf:
                t = 0
                while True:
                    chunk = np.fromfile(lf, dtype=np.int64, count=_DOC_CHUNK)
                    if not len(chunk):
                        break
                    ends = np.cumsum(chunk)
                    starts = pos + t + np.concatenate([[0], ends[:-1]])
                    span = int(ends[-1])
                    for c in range(0, span, _TOKEN_CHUNK):
                        piece = np.fromfile(tf, dtype=dtype, count=min(_TOKEN_CHUNK, span - c))
                        w.add(piece, starts if c == 0 else np.zeros(0, np.int64))
                    t += span
            pos += t
    except BaseException:
        w.abort()
        raise
    return {"tokens": total, "documents": sum(r[split]["documents"] for r in results), "shards": w.meta}


def finalize(out_dir: str | Path, keep_parts: bool = False) -> dict[str, Any]:
    """Check every unit is done, write the shards, then the manifest (last); returns it."""
    out = Path(out_dir)
    plan = load_plan(out)
    done = out / MANIFEST
    if done.is_file():
        manifest = json.loads(done.read_text())
        if manifest.get("run_fingerprint") == plan["run_fingerprint"]:
            return manifest  # already merged
    parts = out / "parts"
    units = [Unit(**u) for u in plan["units"]]
    results, missing = [], []
    for u in units:
        r = read_done(parts, u, plan["fingerprint"], plan["dtype"])
        (results.append(r) if r is not None else missing.append(u))
    if missing:
        srcs = plan["sources"]
        eg = ", ".join(f"unit {u.name} ({srcs[u.source]['path']} [{u.start}:{u.end}])" for u in missing[:3])
        raise DataError(f"{out}: {len(missing)} of {len(units)} units are not tokenized yet (e.g. {eg}); "
                        "run the missing tasks (or rerun without --num-tasks) before merging")
    remove_temps(out)
    dtype = np.dtype(plan["dtype"])
    stats = ReadStats()
    for r in results:
        stats.add(ReadStats.from_dict(r["stats"]))
    splits = {s: _write_split(out, parts, units, results, s, dtype, plan["settings"]["shard_tokens"]) for s in SPLITS}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": {k: v for k, v in plan["tokenizer"].items() if k != "path"},
        "dtype": dtype.name,
        "settings": {k: v for k, v in plan["settings"].items() if k not in ("unit_bytes", "unit_rows")},
        "sources": [{k: v for k, v in s.items() if k != "mtime_ns"} for s in plan["sources"]],
        "splits": splits,
        "stats": stats.to_dict(),
        "run_fingerprint": plan["run_fingerprint"],
    }
    write_json(out / MANIFEST, manifest)
    if not keep_parts:
        shutil.rmtree(parts, ignore_errors=True)
    return manifest
