"""Reading shards: one split of a shard folder as a token stream, and its packed windows.

Windows are Megatron's: window i is tokens [i*L, i*L + L + 1) of the split's stream (documents
concatenated, each ending with EOS), so consecutive windows share one token, every token
after the first is a target exactly once per epoch, and there are (T - 1) // L windows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from megamor.data.errors import ShardError
from megamor.data.manifest import MANIFEST, load_manifest, split_fingerprint
from megamor.data.shards import npy_size, open_npy


def check_split(folder: Path, manifest: dict[str, Any], split: str) -> None:
    """The cheap completeness check of one split (stat only, no reading): its shard list adds up
    to the split's totals and every listed file exists with the size its entry implies, so a
    truncated shard or an entry claiming more tokens than its file holds fails here, by name
    (content: `verify_shards`). Run by the trainer's preflight, before any process group."""
    meta = manifest["splits"][split]
    where = folder / MANIFEST
    shards = meta.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise ShardError(f"{where}: split {split!r} has no list of shards")
    try:
        dtype = np.dtype(manifest["dtype"])
        entries = [(s["file"], int(s["tokens"]), s["docs_file"], int(s["documents"])) for s in shards]
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{where}: split {split!r} has a malformed shard entry ({type(e).__name__}: {e})") from None
    for field, k in (("tokens", 1), ("documents", 3)):
        total = sum(e[k] for e in entries)
        if field in meta and meta[field] != total:
            raise ShardError(f"{where}: split {split!r} says {meta[field]} {field}, its shards add up to {total}")
    for name, n, docs_name, n_docs in entries:
        for fname, count, dt in ((name, n, dtype), (docs_name, n_docs, np.dtype(np.int64))):
            p = folder / fname
            if not p.is_file():
                raise ShardError(f"{p}: listed in the manifest but missing")
            size = p.stat().st_size
            if size != npy_size(dt, count):
                kind = "truncated" if size < npy_size(dt, count) else "longer than its manifest entry"
                raise ShardError(f"{p}: {kind} ({size} bytes; the manifest's {count} entries imply {npy_size(dt, count)})")


class ShardSet:
    """One split of one shard folder. Shards are checked (existence, size) on open and
    memory-mapped lazily; their content is checked by `verify_shards`."""

    def __init__(self, folder: str | Path, split: str = "train"):
        self.folder = Path(folder)
        self.split = split
        self.manifest: dict[str, Any] = load_manifest(self.folder)
        if split not in self.manifest["splits"]:
            raise ShardError(f"{self.folder}: no split {split!r} (has {list(self.manifest['splits'])})")
        meta = self.manifest["splits"][split]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.tokenizer: dict[str, Any] = self.manifest["tokenizer"]
        self.vocab_size = int(self.tokenizer["vocab_size"])
        self.eos_id = int(self.tokenizer["eos_id"])
        self.shards: list[dict[str, Any]] = meta["shards"]
        check_split(self.folder, self.manifest, split)
        sizes = np.array([s["tokens"] for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_tokens = int(self.offsets[-1])
        self.fingerprint = split_fingerprint(self.manifest, split)
        self._tok: dict[int, np.ndarray] = {}
        self._docs: dict[int, np.ndarray] = {}

    def _shard(self, k: int) -> np.ndarray:
        a = self._tok.get(k)
        if a is None:
            s = self.shards[k]
            a = self._tok[k] = open_npy(self.folder / s["file"], self.dtype, s["tokens"])
        return a

    def _doc_index(self, k: int) -> np.ndarray:
        a = self._docs.get(k)
        if a is None:
            s = self.shards[k]
            a = self._docs[k] = open_npy(self.folder / s["docs_file"], np.dtype(np.int64), s["documents"], "document index")
        return a

    def locate(self, pos: int) -> tuple[int, int]:
        """(shard, offset in shard) of global token `pos`."""
        k = int(np.searchsorted(self.offsets, pos, side="right")) - 1
        return k, pos - int(self.offsets[k])

    def tokens(self, start: int, end: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens [start, end) of the stream (across shard boundaries), as int64."""
        if start < 0 or end > self.num_tokens or start > end:
            raise IndexError(f"{self.folder}:{self.split}: tokens [{start}, {end}) outside [0, {self.num_tokens})")
        if out is None:
            out = np.empty(end - start, dtype=np.int64)
        k, off = self.locate(start)
        i = 0
        while i < end - start:
            shard = self._shard(k)
            n = min(len(shard) - off, end - start - i)
            out[i : i + n] = shard[off : off + n]
            i += n
            k, off = k + 1, 0
        return out

    def doc_starts(self, start: int, end: int) -> np.ndarray:
        """Global positions in [start, end) where a document begins."""
        found = []
        k, _ = self.locate(start)
        while k < len(self.shards) and self.offsets[k] < end:
            base = int(self.offsets[k])
            idx = self._doc_index(k)
            lo = np.searchsorted(idx, start - base, side="left")
            hi = np.searchsorted(idx, end - base, side="left")
            found.append(np.asarray(idx[lo:hi]) + base)
            k += 1
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def where(self, pos: int) -> str:
        k, off = self.locate(pos)
        return f"{self.folder / self.shards[k]['file']} at offset {off}"


class PackedDataset:
    """Windows of seq_len + 1 tokens over a ShardSet."""

    def __init__(self, shards: ShardSet, seq_len: int):
        self.shards, self.seq_len = shards, seq_len
        self.num_windows = max(0, (shards.num_tokens - 1) // seq_len)

    def __len__(self) -> int:
        return self.num_windows

    def windows(self, idx: np.ndarray) -> np.ndarray:
        """int64 [len(idx), seq_len + 1]; raises ShardError on a token id outside the vocabulary."""
        L = self.seq_len
        out = np.empty((len(idx), L + 1), dtype=np.int64)
        for r, i in enumerate(np.asarray(idx).tolist()):
            if not 0 <= i < self.num_windows:
                raise IndexError(f"window {i} outside [0, {self.num_windows})")
            self.shards.tokens(i * L, i * L + L + 1, out=out[r])
        if out.size and (out.max() >= self.shards.vocab_size or out.min() < 0):
            r, c = np.argwhere((out >= self.shards.vocab_size) | (out < 0))[0]
            pos = int(idx[r]) * L + int(c)
            raise ShardError(f"token id {out[r, c]} >= vocab size {self.shards.vocab_size} in "
                             f"{self.shards.where(pos)} (run verify_shards on {self.shards.folder})")
        return out

    def segments(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position_ids, doc_ids), int64 [len(idx), seq_len], for the input positions of windows.

        position_ids restart at 0 where a document starts; doc_ids count the documents within
        the window (0 for the one the window opens in). A token and the tokens it may attend
        to under document masking share a doc_id.
        """
        L = self.seq_len
        pos_ids = np.empty((len(idx), L), dtype=np.int64)
        doc_ids = np.empty((len(idx), L), dtype=np.int64)
        ar = np.arange(L, dtype=np.int64)
        for r, i in enumerate(np.asarray(idx).tolist()):
            rel = self.shards.doc_starts(i * L + 1, i * L + L) - i * L  # starts inside (0, L)
            marks = np.zeros(L, dtype=np.int64)
            marks[rel] = rel
            pos_ids[r] = ar - np.maximum.accumulate(marks)
            starts = np.zeros(L, dtype=np.int64)
            starts[rel] = 1
            doc_ids[r] = np.cumsum(starts)
        return pos_ids, doc_ids
