"""Automatic restarts that make no progress end the job instead of looping forever.

slurm/train.sbatch requeues on exit 75 (a stop signal, or a rank that stopped answering),
SLURM requeues on a node failure, torchrun --max-restarts restarts failed workers. A fault that
comes back on every attempt before the next checkpoint (a GPU that hangs at the same step, a
node that keeps failing) would be restarted forever, burning the allocation. Rank 0 records in
RUN/restarts.json the checkpoint step an attempt resumed from and how many attempts in a row
resumed from it. An automatic restart (SLURM_RESTART_COUNT or TORCHELASTIC_RESTART_COUNT > 0)
that is more than `trainer.max_restarts_without_progress` restarts in a row from one checkpoint
ends with exit 1 (FAILED: train.sbatch does not requeue it) and one line saying so; the count
is then cleared, so requeueing the job by hand (`scontrol requeue`) after fixing the cause trains.

Attempts ended by a stop signal (preemption, the time limit) do not count: the scheduler
stopped them, and one after progress saves a newer checkpoint anyway. A run started by hand
(no restart count) starts the count again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megamor.parallel import dist as pdist
from megamor.train.callbacks.base import Callback
from megamor.utils.atomic import atomic_open

RESTARTS_FILE = "restarts.json"
RESTART_COUNT_VARS = ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")


class NoProgressError(RuntimeError):
    """Too many automatic restarts in a row from one checkpoint (raised on every rank alike)."""


def is_automatic_restart(environ: Mapping[str, str]) -> bool:
    """Did a scheduler restart this attempt (SLURM's requeue, torchrun's --max-restarts)?"""
    return any(environ.get(name, "0").strip() not in ("", "0") for name in RESTART_COUNT_VARS)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: a count that starts again is safe
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, record: dict[str, Any]) -> None:
    with atomic_open(path, "w") as f:
        json.dump(record, f)


def record_attempt(run_dir: Path, step: int, restarted: bool) -> int:
    """Record an attempt that resumed from `step`; the attempts in a row from it (1: the first)."""
    path = run_dir / RESTARTS_FILE
    prev = _read(path)
    same = restarted and prev.get("step") == step and isinstance(prev.get("attempts"), int)
    attempts = prev["attempts"] + 1 if same else 1
    _write(path, {"step": step, "attempts": attempts})
    return attempts


def uncount_attempt(run_dir: Path, step: int) -> None:
    """This attempt ended on a stop signal: it does not count against the checkpoint at `step`."""
    path = run_dir / RESTARTS_FILE
    prev = _read(path)
    if prev.get("step") == step and isinstance(prev.get("attempts"), int) and prev["attempts"] > 0:
        _write(path, {"step": step, "attempts": prev["attempts"] - 1})


def refusal(step: int, attempts: int, limit: int) -> str | None:
    """The one line that ends the job, or None while restarts are within `limit` (0: no limit)."""
    restarts = attempts - 1
    if limit <= 0 or restarts <= limit:
        return None
    where = f"the checkpoint of step {step}" if step > 0 else "the start (no checkpoint of this run folder yet)"
    return (f"{restarts} automatic restarts in a row resumed from {where} and none saved a newer one: "
            "not retrying (exit 1: the job ends FAILED instead of being requeued again). Find the cause in the "
            "earlier attempts' output (a rank that stopped answering, a failing node), then resubmit; "
            f"trainer.max_restarts_without_progress={limit} (0: no limit)")


class RestartGuard(Callback):
    """Counts this attempt once the checkpoint to resume is known (before a universal conversion,
    the engine or the load, any of which may be what kills every attempt) and refuses a loop."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ
        self.counted_at: int | None = None

    def resume_planned(self, step: int) -> None:
        t = self.trainer
        line = None
        if t.is_main and step < t.max_steps:  # a complete run rerun (its final evaluation) is no attempt
            restarted = is_automatic_restart(self.environ)
            attempts = record_attempt(t.run_dir, step, restarted)
            self.counted_at = step
            line = refusal(step, attempts, t.cfg.trainer.max_restarts_without_progress) if restarted else None
            if line:  # the job ends here; a requeue by hand (scontrol requeue) after the fix trains again
                _write(t.run_dir / RESTARTS_FILE, {"step": step, "attempts": 0})
        line = pdist.broadcast_object(line)
        if line:
            raise NoProgressError(line)

    def on_stop(self, step: int, signum: int | None) -> None:
        if self.counted_at is not None:  # an agreed stop: a signal reached some rank
            uncount_attempt(self.trainer.run_dir, self.counted_at)
