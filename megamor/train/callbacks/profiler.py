"""The torch profiler over `trainer.profile.steps` (megamor.observe.profiler.StepProfiler): it
starts at the first chosen step, names the phases the observer marks, and writes one Chrome
trace per rank when the range ends or the run stops inside it."""

from __future__ import annotations

from typing import Any

from megamor.train.callbacks.base import Callback


class Profiler(Callback):
    def before_step(self, step: int) -> None:
        self.trainer.observer.profiler.begin_step(step)

    def after_step(self, step: int, result: Any) -> None:
        self.trainer.observer.profiler.end_step(step)

    def close(self) -> None:
        # A run stopped inside trainer.profile.steps still leaves its trace; a run that lost its
        # folder's lock writes nothing more there.
        if not self.trainer.lock_lost:
            self.trainer.observer.profiler.close()
