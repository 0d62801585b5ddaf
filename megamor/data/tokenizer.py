"""A sentencepiece model with megamor's conventions.

Models trained by `train_tokenizer` use: unk=0, bos=1, eos=2, pad=3, "\\n" as its own piece,
byte fallback (so every string round-trips: decode(encode(s)) == s), identity normalisation,
digits split one per token. Any other sentencepiece model loads too; ids it lacks are -1.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"
INFO_FILE = "tokenizer_info.json"


class TokenizerMismatchError(ValueError):
    """A tokenizer (or shard set) other than the one recorded: bad input."""


def check_same_tokenizer(recorded: str | None, actual: str | None, recorded_as: str, actual_as: str) -> None:
    """The one tokenizer identity check: training's (data.tokenizer against the shards' manifest,
    a resumed checkpoint against its data) and every evaluation entry point's. Two tokenizers are
    the same when their model files have the same SHA-256 (`Tokenizer.content_hash`, the `hash`
    of shard manifests); a side that recorded nothing has nothing to check.

    Raises TokenizerMismatchError: "<actual_as> (hash ...) is not the tokenizer <recorded_as> (hash ...)".
    """
    if recorded and actual and recorded != actual:
        raise TokenizerMismatchError(f"{actual_as} (hash {actual[:12]}) is not the tokenizer {recorded_as} (hash {recorded[:12]})")


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


class Tokenizer:
    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        self.path = Path(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.content_hash = file_sha256(self.path)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """`path` is a .model file or a folder holding tokenizer.model."""
        p = Path(path)
        if p.is_dir():
            p = p / MODEL_FILE
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {p}")
        return cls(p)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """One call into C++ for many documents (single-threaded: workers are processes)."""
        return self.sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        """Control tokens (BOS/EOS/PAD) decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def info(self) -> dict:
        """The ids and hash, as recorded in shard manifests."""
        return {
            "hash": self.content_hash,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
            "path": str(self.path),
        }

    def settings(self) -> dict | None:
        """The training settings JSON written beside the model, if any."""
        p = self.path.parent / INFO_FILE
        return json.loads(p.read_text()) if p.is_file() else None

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, vocab_size={self.vocab_size}, hash={self.content_hash[:12]})"
