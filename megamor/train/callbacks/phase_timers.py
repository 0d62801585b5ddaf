"""Phase timers: where each window's step time went (time/data, time/forward, time/backward,
time/optimizer, time/checkpoint, time/eval, time/other, time/step; megamor.observe.phase_timer),
and the window's end-to-end throughput (perf/wall_tokens_per_s).
The step code and the trainer time their blocks through the trainer's `observer.phase(...)`;
this callback opens the first window when the loop begins, counts steps and closes each window."""

from __future__ import annotations

from typing import Any

from megamor.train.callbacks.base import Callback


class PhaseTimers(Callback):
    def fit_start(self) -> None:
        self.trainer.observer.timer.restart()  # set-up is not the first window's time

    def after_step(self, step: int, result: Any) -> None:
        self.trainer.observer.timer.step_done()

    def log_window(self, step: int, metrics: dict[str, Any]) -> None:
        times = self.trainer.observer.timer.window()
        for name, value in times.items():
            self.trainer.record_metric(name, value)
        # End to end: the window's tokens over its wall clock, logging, validation and checkpoints
        # included (perf/tokens_per_s and MFU count the optimizer steps' own time only).
        tps, own, wall = metrics.get("perf/tokens_per_s"), metrics.get("perf/step_time_s"), times.get("time/step")
        if tps and own and wall:
            self.trainer.record_metric("perf/wall_tokens_per_s", tps * own / wall)
