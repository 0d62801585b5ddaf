"""A user callback (added from the config, `trainer.callbacks`) that raises on one rank after
one step: a bug or an out-of-memory error on a single rank of a multi-rank job."""

from __future__ import annotations

from typing import Any

from megamor.train.callbacks import Callback


class RaiseOnRank(Callback):
    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def after_step(self, step: int, result: Any) -> None:
        if step == self.step and self.trainer.rank == self.rank:
            raise RuntimeError(f"injected failure on rank {self.rank} at step {step}")
