"""torch.profiler traces of chosen optimizer steps (`trainer.profile.steps=[a,b]`).

Every rank records steps a..b (1-based, inclusive) and writes
RUN/profile/rank{R}.steps{first}-{last}.pt.trace.json (the steps it actually recorded), a Chrome
trace that Perfetto (ui.perfetto.dev) and TensorBoard's profiler plugin open. Ranges in it: `step_{n}` per optimizer step, the phases `data`, `forward`, `backward`, `optimizer`, and
`mor/recursion_{r}` around each recursion step of the forward. With `trainer.profile.memory=true`
the profiler also records allocations, and on CUDA the allocator's history goes to
RUN/profile/rank{R}.steps{first}-{last}_memory.pickle (open it at pytorch.org/memory_viz).

Off (no steps), nothing is installed: `phase()` hands back one shared null context. A run that
stops inside the range (a signal, an error) exports what was recorded: the trainer calls
`close()` on its way out. The files are written under a temporary name and renamed, so a
reader never sees half a trace, and never over an existing file: a run resumed inside the range
records again from the resumed step and writes a second file beside the first (its own step
range in the name; the same range twice gets a `.2`, `.3`, ... suffix).

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

from megamor.utils.atomic import fsync_path, temp_path

PROFILE_DIR = "profile"
TRACE_SUFFIX = ".pt.trace.json"
MEMORY_SUFFIX = "_memory.pickle"
_OFF = nullcontext()


def trace_path(run_dir: Path, rank: int, first: int, last: int) -> Path:
    return run_dir / PROFILE_DIR / f"rank{rank}.steps{first}-{last}{TRACE_SUFFIX}"


def memory_snapshot_path(run_dir: Path, rank: int, first: int, last: int) -> Path:
    return run_dir / PROFILE_DIR / f"rank{rank}.steps{first}-{last}{MEMORY_SUFFIX}"


def traces(run_dir: Path, rank: int) -> list[Path]:
    """Every trace rank `rank` wrote into RUN/profile/, oldest step range first."""
    def order(p: Path) -> tuple[int, ...]:  # rank0.steps{a}-{b}[.{copy}].pt.trace.json -> (a, b, copy)
        span, _, copy = p.name.removesuffix(TRACE_SUFFIX).split(".steps", 1)[1].partition(".")
        a, _, b = span.partition("-")
        return int(a), int(b), int(copy or 1)

    return sorted((run_dir / PROFILE_DIR).glob(f"rank{rank}.steps*{TRACE_SUFFIX}"), key=order)


def _publish(tmp: Path, final: Path, suffix: str) -> Path:
    """Give the finished file `tmp` the name `final`, or `final` with `.2`, `.3`, ... before
    `suffix` when that is taken: a hard link never replaces an existing file."""
    stem = final.name.removesuffix(suffix)
    for n in range(1, 1000):
        name = final if n == 1 else final.with_name(f"{stem}.{n}{suffix}")
        try:
            os.link(tmp, name)
        except FileExistsError:
            continue
        except OSError:  # a filesystem without hard links: look, then rename (not atomic against a racer)
            if name.exists():
                continue
            os.replace(tmp, name)
            return name
        os.unlink(tmp)
        fsync_path(name.parent)
        return name
    raise FileExistsError(f"{final}: 999 files of this name already exist")


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
        self._recorded: list[int] = []  # [first, last] step recorded by the running profiler
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
            self._recorded = [self._recorded[0] if self._recorded else step_no, step_no]
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
        first, last = self._recorded or (self.first, self.first)
        out = trace_path(self.run_dir, self.rank, first, last)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(out)
        try:
            prof.export_chrome_trace(str(tmp))
            self.written.append(_publish(tmp, out, TRACE_SUFFIX))
        finally:
            if tmp.exists():
                os.unlink(tmp)
        if self.memory and self.device.type == "cuda":
            snap = memory_snapshot_path(self.run_dir, self.rank, first, last)
            tmp = temp_path(snap)
            try:
                torch.cuda.memory._dump_snapshot(str(tmp))
                self.written.append(_publish(tmp, snap, MEMORY_SUFFIX))
            finally:
                torch.cuda.memory._record_memory_history(enabled=None)
                if tmp.exists():
                    os.unlink(tmp)
        return self.written
