"""The training loader: a deterministic global order, sliced per data-parallel rank, resumable.

Global sample n (a window of seq_len + 1 tokens from one source) is a pure function of
(seed, data, n). Global batch b is samples [b*G, (b+1)*G); rank r takes the contiguous slice
[r*G/D, (r+1)*G/D) of it and hands it out as G/(D*m) micro-batches of m samples. So the
concatenation of all ranks' micro-batches is the same sequence for any D and m.

State (identical on every rank after each full global batch): fingerprint, seed, seq_len and
tokens_consumed = samples consumed * seq_len (global). Resuming recomputes the sample
position as tokens_consumed // seq_len, so it continues exactly with another D, m or
accumulation split, even another global batch size (sample-exact, unlike floor(tokens / batch
tokens)). A state saved in the middle of a global batch resumes only under the same layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megamor.data.blend import GlobalOrder
from megamor.data.config import DataConfig
from megamor.data.dataset import PackedDataset, ShardSet
from megamor.data.errors import DataError, DataStateError
from megamor.data.manifest import canonical_hash

STATE_VERSION = 1


def _to_batch(windows: np.ndarray, segments: tuple[np.ndarray, np.ndarray] | None) -> dict[str, torch.Tensor]:
    t = torch.from_numpy(windows)
    batch = {"input_ids": t[:, :-1].contiguous(), "targets": t[:, 1:].contiguous()}
    if segments is not None:
        batch["position_ids"] = torch.from_numpy(segments[0])
        batch["doc_ids"] = torch.from_numpy(segments[1])
    return batch


def open_sources(folders: list[str], split: str, seq_len: int) -> list[PackedDataset]:
    return [PackedDataset(ShardSet(f, split), seq_len) for f in folders]


class TrainLoader:
    def __init__(self, cfg: DataConfig, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_world_size: int):
        G, m, D = global_batch_size, micro_batch_size, dp_world_size
        if D < 1 or not 0 <= dp_rank < D:
            raise DataError(f"dp_rank must be in [0, dp_world_size), got {dp_rank} of {D}")
        if m < 1 or G < 1 or G % (D * m):
            raise DataError(f"global_batch_size {G} must be a multiple of dp_world_size {D} x micro_batch_size {m}")
        self.cfg = cfg
        self.global_batch_size, self.micro_batch_size = G, m
        self.dp_rank, self.dp_world_size = dp_rank, D
        self.accum_steps = G // (D * m)
        self.seq_len = cfg.seq_len
        self.sources = open_sources(cfg.train, cfg.train_split, cfg.seq_len)
        for f, s in zip(cfg.train, self.sources):
            if len(s) == 0:
                raise DataError(f"{f}: split {cfg.train_split!r} has fewer than seq_len+1 = {cfg.seq_len + 1} tokens")
        hashes = {s.shards.tokenizer["hash"] for s in self.sources}
        if len(hashes) > 1:
            raise DataError(f"the train folders {cfg.train} were made with {len(hashes)} different tokenizers")
        counts = [len(s) for s in self.sources]
        weights = list(cfg.train_weights) if cfg.train_weights else [float(c) for c in counts]
        self.order = GlobalOrder(counts, weights, cfg.seed)
        self.source_fingerprints = [s.shards.fingerprint for s in self.sources]
        self.fingerprint = canonical_hash({"sources": self.source_fingerprints,
                                           "weights": [float(w) for w in self.order.blend.weights]})
        self.sample_pos = 0  # global index of the first sample of the current global batch
        self.micro_step = 0  # micro-batches of the current global batch already handed out here

    # -- iteration ---------------------------------------------------------------------------
    def micro_batch_samples(self) -> np.ndarray:
        """Global sample indices of the next micro-batch of this rank."""
        per_rank = self.global_batch_size // self.dp_world_size
        start = self.sample_pos + self.dp_rank * per_rank + self.micro_step * self.micro_batch_size
        return np.arange(start, start + self.micro_batch_size, dtype=np.int64)

    def read_samples(self, samples: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        src, win = self.order.lookup(samples)
        L = self.seq_len
        windows = np.empty((len(samples), L + 1), dtype=np.int64)
        seg = (np.empty((len(samples), L), np.int64), np.empty((len(samples), L), np.int64)) if self.cfg.document_masking else None
        for s in np.unique(src).tolist():
            sel = np.flatnonzero(src == s)
            windows[sel] = self.sources[s].windows(win[sel])
            if seg is not None:
                p, d = self.sources[s].segments(win[sel])
                seg[0][sel], seg[1][sel] = p, d
        return windows, seg

    def next_batch(self) -> dict[str, torch.Tensor]:
        windows, seg = self.read_samples(self.micro_batch_samples())
        self.micro_step += 1
        if self.micro_step == self.accum_steps:
            self.micro_step = 0
            self.sample_pos += self.global_batch_size
        return _to_batch(windows, seg)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    @property
    def tokenizer_info(self) -> dict[str, Any]:
        """The shards' tokenizer entry: hash, vocab_size, bos_id, eos_id, pad_id, unk_id."""
        return dict(self.sources[0].shards.tokenizer)

    # -- progress ----------------------------------------------------------------------------
    @property
    def tokens_consumed(self) -> int:
        """Global tokens (inputs, seq_len per sample) of the completed global batches."""
        return self.sample_pos * self.seq_len

    @property
    def samples_per_epoch(self) -> int:
        return int(sum(len(s) for s in self.sources))

    def epochs(self) -> list[float]:
        return self.order.epochs(self.sample_pos)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "seed": self.cfg.seed,
            "seq_len": self.seq_len,
            "tokens_consumed": self.tokens_consumed,
            "samples_consumed": self.sample_pos,
            "epochs": self.epochs(),
            "global_batch_size": self.global_batch_size,
            "micro_batch_size": self.micro_batch_size,
            "dp_world_size": self.dp_world_size,
            "micro_step": self.micro_step,
            "sources": list(self.cfg.train),
            "source_fingerprints": self.source_fingerprints,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        problem = self.resume_problem(state)
        if problem is not None:
            raise DataStateError(f"{problem[0]}: {problem[1]}")
        self.sample_pos = int(state["tokens_consumed"]) // self.seq_len
        self.micro_step = int(state.get("micro_step", 0))

    def resume_problem(self, state: dict[str, Any]) -> tuple[str, str] | None:
        """Why `state` (a checkpoint's loader state) cannot continue on this data, as (the config
        key that differs, why), or None. The preflight asks before the engine is built."""
        if state.get("version") != STATE_VERSION:
            return "data", f"data loader state version {state.get('version')!r} is not {STATE_VERSION}"
        if state["fingerprint"] != self.fingerprint:
            key, diff = self._fingerprint_diff(state)
            return key, (f"data fingerprint mismatch: the checkpoint was made on other data ({diff}); "
                         "resuming would not continue its sample order")
        for name, mine in (("seed", self.cfg.seed), ("seq_len", self.seq_len)):
            if state[name] != mine:
                return f"data.{name}", (f"data.{name} is {mine} but the checkpoint was made with {state[name]}; "
                                        "the sample order would change")
        tokens = int(state["tokens_consumed"])
        if tokens % self.seq_len:
            return "data.seq_len", f"tokens_consumed {tokens} is not a multiple of seq_len {self.seq_len}"
        micro = int(state.get("micro_step", 0))
        if micro:
            layout = (state["global_batch_size"], state["micro_batch_size"], state["dp_world_size"])
            if layout != (self.global_batch_size, self.micro_batch_size, self.dp_world_size):
                return "batch", (
                    f"the checkpoint was taken {micro} micro-batches into a global batch with (global, micro, dp) = "
                    f"{layout}; it can only resume mid-batch with that layout, not "
                    f"{(self.global_batch_size, self.micro_batch_size, self.dp_world_size)}")
        return None

    def _fingerprint_diff(self, state: dict[str, Any]) -> tuple[str, str]:
        """(the key that differs, how) for a fingerprint mismatch."""
        old_src, old_fp = state.get("sources", []), state.get("source_fingerprints", [])
        if len(old_fp) != len(self.source_fingerprints):
            return "data.train", f"{len(old_fp)} train sources then, {len(self.source_fingerprints)} now"
        for i, (a, b) in enumerate(zip(old_fp, self.source_fingerprints)):
            if a != b:
                then = old_src[i] if i < len(old_src) else "?"
                return "data.train", f"data.train[{i}] ({self.cfg.train[i]}) differs in shards or tokenizer from {then}"
        return "data.train_weights", "the blending weights differ"


def build_train_loader(cfg: DataConfig, global_batch_size: int, micro_batch_size: int,
                       dp_rank: int = 0, dp_world_size: int = 1) -> TrainLoader:
    return TrainLoader(cfg, global_batch_size, micro_batch_size, dp_rank, dp_world_size)


# -- evaluation ------------------------------------------------------------------------------
@dataclass
class EvalSet:
    name: str  # the folder
    dataset: PackedDataset


def build_eval_sets(cfg: DataConfig, split: str | None = None) -> list[EvalSet]:
    split = split or cfg.valid_split
    return [EvalSet(f, d) for f, d in zip(cfg.valid, open_sources(cfg.valid, split, cfg.seq_len))]


def iter_eval_batches(ds: PackedDataset, batch_size: int, max_batches: int | None = None, dp_rank: int = 0,
                      dp_world_size: int = 1, document_masking: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Every window of `ds` once, in order, in batches (the last may be smaller). Batch k goes
    to rank k % dp_world_size; max_batches bounds the batches before that split (all ranks agree)."""
    n_batches = -(-len(ds) // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(dp_rank, n_batches, dp_world_size):
        idx = np.arange(b * batch_size, min((b + 1) * batch_size, len(ds)), dtype=np.int64)
        yield _to_batch(ds.windows(idx), ds.segments(idx) if document_masking else None)


def build_eval_batches(cfg: DataConfig, split: str | None = None, batch_size: int = 8, max_batches: int | None = None,
                       dp_rank: int = 0, dp_world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """The windows of every `cfg.valid` folder's split, folder after folder (max_batches per folder)."""
    for es in build_eval_sets(cfg, split):
        yield from iter_eval_batches(es.dataset, batch_size, max_batches, dp_rank, dp_world_size, cfg.document_masking)
