"""What the training loop measures about itself, behind one object the step code calls:

    with obs.phase("data"): ...               # timed (PhaseTimer) and named in a trace
    with obs.forward(): out = engine(...)     # + the saved-for-backward bytes, once per window
    with obs.phase("backward"): ...

The trainer's callbacks own the windows and the profiler's range: megamor/train/callbacks/
phase_timers.py, straggler.py, activation_memory.py and profiler.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from megamor.observe.activation_memory import SavedTensorMeter
from megamor.observe.phase_timer import PhaseTimer
from megamor.observe.profiler import StepProfiler


class StepObserver:
    def __init__(self, device: torch.device, run_dir: Path | None = None, rank: int = 0, world: int = 1,
                 profile_steps: list[int] | tuple[int, ...] = (), profile_memory: bool = False, model: Any = None,
                 activation_meter: bool = True):
        self.rank, self.world, self.model = rank, world, model
        self.timer = PhaseTimer(device)
        self.profiler = StepProfiler(run_dir or Path("."), rank, list(profile_steps), profile_memory, device, model)
        self._meter_cls = SavedTensorMeter if activation_meter else None
        self._measure_next = self._meter_cls is not None  # the window's first forward is measured
        self.activation_bytes: int | None = None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with self.profiler.phase(name), self.timer.phase(name):
            yield

    @contextmanager
    def forward(self) -> Iterator[None]:
        if not self._measure_next:
            with self.phase("forward"):
                yield
            return
        self._measure_next = False
        meter = self._meter_cls(exclude=self.model)  # type: ignore[misc]
        with self.phase("forward"), meter:
            yield
        self.activation_bytes = max(self.activation_bytes or 0, int(meter.bytes))

    def take_activation_bytes(self) -> int | None:
        """The window's largest measured forward (None when none was), and re-arm the meter for
        the next window's first forward."""
        out, self.activation_bytes = self.activation_bytes, None
        self._measure_next = self._meter_cls is not None
        return out
