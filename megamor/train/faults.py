"""Fault injection for tests of crash safety: real failures at chosen moments.

MEGAMOR_FAULTS is a comma-separated list (unset in normal runs):
    sigkill_after_step=K     SIGKILL this process right after optimizer step K
    sigkill_during_save=K    SIGKILL after the checkpoint of step K is on disk but before
                             its completeness marker (a crash mid-save)
    nan_loss_at_step=K[:K2]  make the loss of steps K..K2 non-finite (on every rank)
    inf_grad_at_step=K[:K2]  keep the loss of steps K..K2 finite but make every gradient
                             non-finite (what a corrupted weight or an overflow does)
    signal_at_eval_batch=K:SIG  send signal SIG (TERM, INT, USR1) to this process before its
                             K-th validation batch of the run (a stop during validation)
    signal_at_setup=SIG      send signal SIG to this process as set-up starts
    signal_before_step=K:SIG send signal SIG to this process before optimizer step K (the
                             stop is agreed in step K's all-reduce: the run stops at step K)
    abort_in_teardown        SIGABRT while the interpreter finalizes, after the run is over
                             (what a native library's teardown can do to a finished run)
    slow_forward=S           sleep S seconds before every forward pass (a slow node, for the
                             straggler metrics)
    lock_taken_after_step=K  right after optimizer step K, replace RUN/trainer.lock with another
                             host's trainer's (what a second trainer that took the lock leaves)
    rank=R                   only rank R does the sigkill, signal, abort and slow faults (default: all ranks)
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megamor.utils.atomic import atomic_open

ENV = "MEGAMOR_FAULTS"


@dataclass
class Faults:
    sigkill_after_step: int | None = None
    sigkill_during_save: int | None = None
    nan_from: int | None = None
    nan_to: int | None = None
    inf_from: int | None = None
    inf_to: int | None = None
    rank: int | None = None
    eval_signal_batch: int | None = None
    eval_signal: int | None = None
    setup_signal: int | None = None
    step_signal_at: int | None = None
    step_signal: int | None = None
    abort_in_teardown: bool = False
    slow_forward_s: float = 0.0
    lock_taken_after_step: int | None = None
    _eval_batches: int = 0

    @classmethod
    def from_env(cls) -> Faults:
        f = cls()
        for item in filter(None, os.environ.get(ENV, "").split(",")):
            name, _, value = item.partition("=")
            if name == "sigkill_after_step":
                f.sigkill_after_step = int(value)
            elif name == "sigkill_during_save":
                f.sigkill_during_save = int(value)
            elif name == "nan_loss_at_step":
                lo, _, hi = value.partition(":")
                f.nan_from, f.nan_to = int(lo), int(hi or lo)
            elif name == "inf_grad_at_step":
                lo, _, hi = value.partition(":")
                f.inf_from, f.inf_to = int(lo), int(hi or lo)
            elif name == "signal_at_eval_batch":
                k, _, sig = value.partition(":")
                f.eval_signal_batch, f.eval_signal = int(k), _signum(sig)
            elif name == "signal_before_step":
                k, _, sig = value.partition(":")
                f.step_signal_at, f.step_signal = int(k), _signum(sig)
            elif name == "signal_at_setup":
                f.setup_signal = _signum(value)
            elif name == "slow_forward":
                f.slow_forward_s = float(value)
            elif name == "lock_taken_after_step":
                f.lock_taken_after_step = int(value)
            elif name == "abort_in_teardown":
                f.abort_in_teardown = True
            elif name == "rank":
                f.rank = int(value)
            else:
                raise ValueError(f"{ENV}: unknown fault {name!r}")
        return f

    def _mine(self, rank: int) -> bool:
        return self.rank is None or self.rank == rank

    def after_step(self, step: int, rank: int, run_dir: Path | None = None) -> None:
        if self.sigkill_after_step == step and self._mine(rank):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.lock_taken_after_step == step and rank == 0 and run_dir is not None:
            now = time.time()
            with atomic_open(run_dir / "trainer.lock", "w") as f:
                json.dump({"host": "elsewhere", "pid": 1, "started": now, "heartbeat": now, "token": "taken"}, f)

    def before_step(self, step: int, rank: int) -> None:
        if self.step_signal is not None and self.step_signal_at == step and self._mine(rank):
            os.kill(os.getpid(), self.step_signal)

    def during_save(self, step: int, rank: int) -> None:
        if self.sigkill_during_save == step and self._mine(rank):
            os.kill(os.getpid(), signal.SIGKILL)

    def before_forward(self, rank: int) -> None:
        if self.slow_forward_s and self._mine(rank):
            time.sleep(self.slow_forward_s)

    def nan_loss(self, step: int) -> bool:
        return self.nan_from is not None and self.nan_from <= step <= (self.nan_to or self.nan_from)

    def inf_grad(self, step: int) -> bool:
        return self.inf_from is not None and self.inf_from <= step <= (self.inf_to or self.inf_from)

    def at_setup(self, rank: int) -> None:
        if self.abort_in_teardown and self._mine(rank):
            _TEARDOWN.append(_AbortWhenCollected())
        if self.setup_signal is not None and self._mine(rank):
            os.kill(os.getpid(), self.setup_signal)

    def before_eval_batch(self, rank: int) -> None:
        self._eval_batches += 1
        if self.eval_signal is not None and self._eval_batches == self.eval_signal_batch and self._mine(rank):
            os.kill(os.getpid(), self.eval_signal)


class _AbortWhenCollected:
    """Aborts the process when collected: held by a module global, that is as the interpreter
    clears the modules while it finalizes."""

    def __del__(self, abort=os.abort) -> None:  # `os` may already be cleared then
        abort()


_TEARDOWN: list[_AbortWhenCollected] = []


def _signum(name: str) -> int:
    return int(getattr(signal, "SIG" + name.upper().removeprefix("SIG")))


class _InfGrad(torch.autograd.Function):
    """Identity forward; the backward pass turns every gradient into inf/NaN."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g * float("inf")


def poison_gradients(loss: torch.Tensor) -> torch.Tensor:
    return _InfGrad.apply(loss)
