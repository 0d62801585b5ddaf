"""Check a shard folder against its manifest; stop at the first problem, saying where it is.

Checks, per split and shard: the file exists with the planned size and .npy header, its
sha256, every token id < vocab size, the document index (sha256, sorted, and equal to the
positions that follow an EOS), and the split's token/document totals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megamor.data.errors import ShardError
from megamor.data.manifest import load_manifest
from megamor.data.shards import open_npy
from megamor.data.tokenizer import file_sha256

_CHUNK = 1 << 24


@dataclass
class VerifyReport:
    folder: Path
    shards: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    documents: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = ", ".join(f"{s}: {self.tokens[s]} tokens / {self.documents[s]} documents" for s in self.tokens)
        return f"{self.folder}: OK ({self.shards} shards; {parts})"


def verify_shards(folder: str | Path, check_hashes: bool = True) -> VerifyReport:
    folder = Path(folder)
    m = load_manifest(folder)
    dtype = np.dtype(m["dtype"])
    vocab, eos = int(m["tokenizer"]["vocab_size"]), int(m["tokenizer"]["eos_id"])
    report = VerifyReport(folder)
    for split, meta in m["splits"].items():
        prev_ended = True  # the stream starts with a document
        pos = 0
        n_docs = 0
        for s in meta["shards"]:
            path = folder / s["file"]
            where = f"{path}"
            tokens = open_npy(path, dtype, s["tokens"])
            if check_hashes and file_sha256(path) != s["sha256"]:
                raise ShardError(f"{where}: sha256 differs from the manifest (corrupted or replaced)")
            eos_pos = []
            for c in range(0, len(tokens), _CHUNK):
                chunk = np.asarray(tokens[c : c + _CHUNK])
                bad = np.flatnonzero(chunk >= vocab)
                if len(bad):
                    off = c + int(bad[0])
                    raise ShardError(f"{where}: token id {int(chunk[bad[0]])} at offset {off} (token {pos + off} of split "
                                     f"{split!r}) is >= vocab size {vocab}")
                eos_pos.append(np.flatnonzero(chunk == eos) + c)
            docs_path = folder / s["docs_file"]
            docs = np.asarray(open_npy(docs_path, np.dtype(np.int64), s["documents"], "document index"))
            if check_hashes and file_sha256(docs_path) != s["docs_sha256"]:
                raise ShardError(f"{docs_path}: sha256 differs from the manifest (corrupted or replaced)")
            e = np.concatenate(eos_pos) if eos_pos else np.zeros(0, np.int64)
            expected = e + 1
            expected = expected[expected < len(tokens)]
            if prev_ended:
                expected = np.concatenate([[0], expected])
            if len(docs) != len(expected) or not np.array_equal(docs, expected):
                diff = _first_difference(docs, expected)
                raise ShardError(f"{docs_path}: document index disagrees with the EOS tokens of {s['file']} "
                                 f"({diff})")
            prev_ended = bool(len(tokens)) and int(tokens[-1]) == eos
            pos += len(tokens)
            n_docs += len(docs)
            report.shards += 1
        if pos != meta["tokens"] or n_docs != meta["documents"]:
            raise ShardError(f"{folder}: split {split!r} holds {pos} tokens / {n_docs} documents, the manifest says "
                             f"{meta['tokens']} / {meta['documents']}")
        if pos and not prev_ended:
            raise ShardError(f"{folder}: split {split!r} does not end with EOS (its last document is cut)")
        report.tokens[split], report.documents[split] = pos, n_docs
    return report


def _first_difference(a: np.ndarray, b: np.ndarray) -> str:
    n = min(len(a), len(b))
    neq = np.flatnonzero(a[:n] != b[:n])
    if len(neq):
        i = int(neq[0])
        return f"entry {i}: index says {int(a[i])}, EOS positions imply {int(b[i])}"
    return f"index has {len(a)} entries, EOS positions imply {len(b)}"
