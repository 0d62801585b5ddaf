"""Phase timers, the profiler, activation-memory metering and straggler detection, driven by
the loop's hooks. They share one megamor.observe.StepObserver (the trainer's `observer`), whose
`phase(...)` blocks the step code and the trainer's save/eval wrap; this callback opens and
closes its windows: the first window starts with the loop, each step is counted, each log
window gets time/*, time/straggler_* (one all-reduce, every rank) and mem/activation_bytes,
and the profiler's trace is written on the way out."""

from __future__ import annotations

from typing import Any

from megamor.train.callbacks.base import Callback


class StepObservation(Callback):
    def fit_start(self) -> None:
        self.trainer.observer.start()

    def before_step(self, step: int) -> None:
        self.trainer.observer.begin_step(step)

    def after_step(self, step: int, result: Any) -> None:
        self.trainer.observer.end_step(step)

    def log_window(self, step: int, metrics: dict[str, Any]) -> None:
        for name, value in self.trainer.observer.window().items():
            self.trainer.record_metric(name, value)

    def close(self) -> None:
        # A run stopped inside trainer.profile.steps still leaves its trace; a run that lost
        # its folder's lock writes nothing more there.
        if not self.trainer.lock_lost:
            self.trainer.observer.close()
