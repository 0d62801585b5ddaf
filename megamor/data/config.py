"""The data section of an experiment config.

`validate` (called by megamor.config when loading) checks values only; `check_paths` reads the
shard folders and should run on every rank before distributed start-up, so a typo fails in
seconds with the key that holds it (e.g. data.train[0]) instead of after the launcher.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megamor.config import ConfigError, key
from megamor.data.blend import Blend
from megamor.data.dataset import check_split
from megamor.data.errors import DataError
from megamor.data.manifest import load_manifest
from megamor.data.tokenizer import TokenizerMismatchError, TokenizerNotFoundError, check_same_tokenizer, load_tokenizer

# False while a tool that reads no data (megamor.plan) loads a config: an unset data.train is fine
# there (megamor.train.config.load_experiment(need_data=False)).
NEED_TRAIN: ContextVar[bool] = ContextVar("NEED_TRAIN", default=True)


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # shard folders (tokenize_and_shard outputs)
    train_weights: list[float] | None = None  # blending weights; None: proportional to size
    valid: list[str] = field(default_factory=list)  # folders whose `valid_split` is evaluated
    train_split: str = "train"  # shard name prefix read for training (<split>-NNNNN.npy)
    valid_split: str = "valid"  # shard name prefix read for validation
    seq_len: int = 2048  # tokens per training sequence (at most model.max_seq_len)
    seed: int = 1234  # the global sample order is a function of this seed and the data
    document_masking: bool = False  # batches carry position_ids and doc_ids (reset per document)
    tokenizer: str | None = None  # if set, must be the tokenizer the shards were made with

    def validate(self, path: str = "") -> None:
        if not self.train and NEED_TRAIN.get():
            raise ConfigError(key(path, "train"), "needs at least one shard folder")
        if self.seq_len < 1:
            raise ConfigError(key(path, "seq_len"), f"must be >= 1, got {self.seq_len}")
        if self.seed < 0:
            raise ConfigError(key(path, "seed"), f"must be >= 0, got {self.seed}")
        if self.train_weights is not None:
            w = list(self.train_weights)
            if len(w) != len(self.train) and (self.train or NEED_TRAIN.get()):  # the planner: no folders given
                raise ConfigError(key(path, "train_weights"), f"has {len(w)} entries for {len(self.train)} train folders")
            for i, x in enumerate(w):
                if not (math.isfinite(x) and x > 0):
                    raise ConfigError(f"{key(path, 'train_weights')}[{i}]", f"must be a positive number, got {x}")
            try:
                Blend(w)  # the loader's own rule: every source gets at least one sample per block
            except ValueError as e:
                raise ConfigError(key(path, "train_weights"), str(e)) from None
        for name in ("train_split", "valid_split"):
            if not getattr(self, name):
                raise ConfigError(key(path, name), "must not be empty")

    def check_paths(self, prefix: str = "data") -> dict[str, Any]:
        """Check every folder holds a finished shard set with the needed split, all made with
        one tokenizer; returns that tokenizer's manifest entry (vocab_size, eos_id, ...)."""
        tok = self._load_tokenizer(prefix)  # first: a missing placeholder is named even without shards
        tokenizer: dict[str, Any] | None = None
        first = ""
        entries = [("train", i, p, self.train_split) for i, p in enumerate(self.train)]
        entries += [("valid", i, p, self.valid_split) for i, p in enumerate(self.valid)]
        for field_name, i, p, split in entries:
            k = f"{key(prefix, field_name)}[{i}]"
            folder = Path(p)
            if not folder.is_dir():
                raise ConfigError(k, f"shard folder {p} not found")
            try:
                m = load_manifest(folder)
            except DataError as e:
                raise ConfigError(k, str(e)) from None
            s = m["splits"].get(split)
            if s is None:
                raise ConfigError(k, f"{p} has no split {split!r} (has {list(m['splits'])})")
            try:
                check_split(folder, m, split)  # truncated shards: here, not after the process group starts
            except DataError as e:
                raise ConfigError(k, str(e)) from None
            if s["tokens"] < self.seq_len + 1:
                what = "train" if field_name == "train" else "evaluate"
                raise ConfigError(k, f"split {split!r} of {p} has {s['tokens']} tokens, fewer than seq_len+1 = "
                                     f"{self.seq_len + 1}: nothing to {what}")
            if tokenizer is None:
                tokenizer, first = m["tokenizer"], k
            elif m["tokenizer"]["hash"] != tokenizer["hash"]:
                raise ConfigError(k, f"{p} was tokenized with another tokenizer than {first} "
                                     f"({m['tokenizer']['hash'][:12]} vs {tokenizer['hash'][:12]})")
        assert tokenizer is not None
        if tok is not None:
            try:
                check_same_tokenizer(tokenizer["hash"], tok.content_hash, "the shards were made with", str(self.tokenizer))
            except TokenizerMismatchError as e:
                raise ConfigError(key(prefix, "tokenizer"), str(e)) from None
        return tokenizer

    def _load_tokenizer(self, prefix: str) -> Any:
        if self.tokenizer is None:
            return None
        k = key(prefix, "tokenizer")
        try:
            return load_tokenizer(self.tokenizer)
        except TokenizerNotFoundError as e:  # e.g. a shipped config's placeholder path
            raise ConfigError(k, f"{e}: put the tokenizer the shards were made with there (a sentencepiece .model, a "
                                 f"Hugging Face tokenizer.json or a folder holding one), or set {k}=PATH") from None
        except (DataError, OSError) as e:
            raise ConfigError(k, str(e)) from None
