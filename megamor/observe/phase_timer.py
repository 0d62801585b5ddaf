"""Where a training step's time goes, per log window: time/data, time/forward, time/backward,
time/optimizer, time/checkpoint, time/eval, time/other and time/step, in seconds per optimizer
step averaged over the window (checkpoint and eval: their window total spread over its steps).

On CUDA the forward, backward and optimizer phases are timed with torch.cuda.Event pairs on
the current stream: recording an event does not wait for the device, and the events are read
once, when the window closes (`window()`), so timing adds no host-device sync per micro-batch.
The host-side phases (data, checkpoint, eval) and all phases on CPU use perf_counter.

time/step is the window's wall time per step (everything: steps, checkpoints, validation,
logging); time/other is what no phase covers (collectives outside DeepSpeed, logging).

Stragglers (`straggler()`, once per window, one small all-reduce): each rank's local time, the
phases with no collective inside in data-parallel training (data + forward), summed over the
window. In synchronous training every rank's step takes as long as the slowest one (the
others wait in the gradient all-reduce), so the step time cannot tell who is slow; the
time before the first collective can. time/straggler_ratio = slowest / median over ranks,
time/straggler_rank = the slowest rank, time/straggler_s = its local seconds per step.
With tensor parallelism or ZeRO-3 the forward holds collectives too and the ratio reads low.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from megamor.parallel.dist import all_reduce_

PHASES = ("data", "forward", "backward", "optimizer", "checkpoint", "eval")
DEVICE_PHASES = ("forward", "backward", "optimizer")  # CUDA events on CUDA
LOCAL_PHASES = ("data", "forward")  # no collective inside (data parallel): the straggler's measure


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._local = 0.0
        self._sums = dict.fromkeys(PHASES, 0.0)
        self._events: list[tuple[str, Any, Any]] = []  # (phase, start, end), read in window()
        self._free: list[Any] = []  # event objects reused across windows
        self._steps = 0
        self._t0 = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda and name in DEVICE_PHASES:
            start, end = self._event(), self._event()
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((name, start, end))
            return
        t = time.perf_counter()
        try:
            yield
        finally:
            self._sums[name] += time.perf_counter() - t

    def _event(self) -> Any:
        return self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)

    def step_done(self) -> None:
        self._steps += 1

    def restart(self) -> None:
        """Start the window now, dropping anything timed so far (e.g. set-up)."""
        self._sums = dict.fromkeys(PHASES, 0.0)
        self._events.clear()
        self._steps, self._t0 = 0, time.perf_counter()

    def window(self) -> dict[str, float]:
        """time/* of the window since the last call (seconds per step), then starts a new one."""
        if self._events:
            self._events[-1][2].synchronize()  # the one wait of the window
            for name, start, end in self._events:
                self._sums[name] += start.elapsed_time(end) / 1e3
                self._free += (start, end)
            self._events.clear()
        now = time.perf_counter()
        steps = max(self._steps, 1)
        out = {f"time/{k}": v / steps for k, v in self._sums.items()}
        out["time/step"] = (now - self._t0) / steps
        out["time/other"] = max(0.0, out["time/step"] - sum(out[f"time/{k}"] for k in PHASES))
        self._local = sum(self._sums[k] for k in LOCAL_PHASES) / steps
        self._sums = dict.fromkeys(PHASES, 0.0)
        self._steps, self._t0 = 0, now
        return out

    def straggler(self, rank: int = 0, world: int = 1) -> dict[str, float]:
        """time/straggler_* of the window `window()` just closed: one all-reduce of a vector with
        a slot per rank, so every rank calls it at the same point."""
        times = torch.zeros(world, dtype=torch.float64, device=self.device)
        times[rank] = self._local
        values = all_reduce_(times).tolist()
        slowest = max(range(world), key=values.__getitem__)
        median = statistics.median(values)
        return {
            "time/straggler_ratio": values[slowest] / median if median > 0 else 1.0,
            "time/straggler_rank": slowest,
            "time/straggler_s": values[slowest],
        }
