"""Phase timers: where each window's step time went (time/data, time/forward, time/backward,
time/optimizer, time/checkpoint, time/eval, time/other, time/step; megamor.observe.phase_timer).
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
        for name, value in self.trainer.observer.timer.window().items():
            self.trainer.record_metric(name, value)
