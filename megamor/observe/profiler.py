"""torch.profiler traces of chosen optimizer steps (`trainer.profile.steps=[a,b]`).

Every rank records steps a..b (1-based, inclusive) and writes RUN/profile/rank{R}.pt.trace.json,
a Chrome trace that Perfetto (ui.perfetto.dev) and TensorBoard's profiler plugin open. Ranges in
it: `step_{n}` per optimizer step, the phases `data`, `forward`, `backward`, `optimizer`, and
`mor/recursion_{r}` around each recursion step of the forward. With `trainer.profile.memory=true`
the profiler also records allocations, and on CUDA the allocator's history goes to
RUN/profile/rank{R}_memory.pickle (open it at pytorch.org/memory_viz).

Off (no steps), nothing is installed: `phase()` hands back one shared null context. A run that
stops inside the range (a signal, an error) exports what was recorded: the trainer calls
`close()` on its way out. The files are written under a temporary name and renamed, so a
reader never sees half a trace.

The recursion ranges are added from outside the model, through its documented hook point
`MoRLM.recursion_hook` (a context per recursion step: gather, the step's layers, scatter),
set while profiling and restored after; the model itself holds no profiler code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from megamor.data.atomic import commit, temp_path

PROFILE_DIR = "profile"
_OFF = nullcontext()


def trace_path(run_dir: Path, rank: int) -> Path:
    return run_dir / PROFILE_DIR / f"rank{rank}.pt.trace.json"


def memory_snapshot_path(run_dir: Path, rank: int) -> Path:
    return run_dir / PROFILE_DIR / f"rank{rank}_memory.pickle"


def instrument_recursions(model: Any) -> Callable[[], None]:
    """Name each recursion step's forward `mor/recursion_{r}` (1-based) in profiler traces;
    returns the function that takes the ranges away again."""
    if not getattr(model, "steps", None) or not hasattr(model, "recursion_hook"):  # vanilla, or another model
        return lambda: None
    previous = model.recursion_hook
    model.recursion_hook = lambda r: record_function(f"mor/recursion_{r + 1}")

    def restore() -> None:
        model.recursion_hook = previous

    return restore


class StepProfiler:
    def __init__(self, run_dir: Path, rank: int, steps: list[int] | tuple[int, ...], memory: bool,
                 device: torch.device, model: Any = None):
        self.run_dir, self.rank, self.memory, self.device, self.model = run_dir, rank, memory, device, model
        self.first, self.last = (int(steps[0]), int(steps[-1])) if steps else (0, -1)
        self.enabled = bool(steps)
        self._prof: Any = None
        self._step: AbstractContextManager | None = None
        self._restore: Callable[[], None] | None = None
        self.written: list[Path] = []

    @property
    def active(self) -> bool:
        return self._prof is not None

    def phase(self, name: str) -> AbstractContextManager:
        return record_function(name) if self._prof is not None else _OFF

    def begin_step(self, step_no: int) -> None:
        """Before optimizer step `step_no` (1-based)."""
        if not self.enabled:
            return
        if self._prof is None and self.first <= step_no <= self.last and not self.written:
            self._start()
        if self._prof is not None:
            self._step = record_function(f"step_{step_no}")
            self._step.__enter__()

    def end_step(self, step_no: int) -> None:
        """After optimizer step `step_no`: the last one of the range writes the trace."""
        if self._prof is None:
            return
        self._close_step()
        if step_no >= self.last:
            self.close()

    def _start(self) -> None:
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
            if self.memory:
                torch.cuda.memory._record_memory_history(max_entries=200_000)
        self._prof = profile(activities=activities, profile_memory=self.memory, record_shapes=self.memory)
        self._prof.__enter__()
        if self.model is not None:
            self._restore = instrument_recursions(self.model)

    def _close_step(self) -> None:
        if self._step is not None:
            step, self._step = self._step, None
            step.__exit__(None, None, None)

    def close(self) -> list[Path]:
        """Stop and write what was recorded (idempotent; safe at any point of a step)."""
        if self._prof is None:
            return self.written
        self._close_step()
        prof, self._prof = self._prof, None
        if self._restore is not None:
            self._restore()
            self._restore = None
        prof.__exit__(None, None, None)
        out = trace_path(self.run_dir, self.rank)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(out)
        try:
            prof.export_chrome_trace(str(tmp))
            commit(tmp, out)
        finally:
            if tmp.exists():
                os.unlink(tmp)
        self.written.append(out)
        if self.memory and self.device.type == "cuda":
            snap = memory_snapshot_path(self.run_dir, self.rank)
            tmp = temp_path(snap)
            try:
                torch.cuda.memory._dump_snapshot(str(tmp))
                commit(tmp, snap)
            finally:
                torch.cuda.memory._record_memory_history(enabled=None)
                if tmp.exists():
                    os.unlink(tmp)
            self.written.append(snap)
        return self.written
