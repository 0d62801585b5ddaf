"""Calls one hook on every callback, in order (the trainer's only view of its callbacks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megamor.train.callbacks.base import Callback

# The trainer and StepResult are typed Any here: train.config checks trainer.callbacks with this
# package, and the trainer imports train.config (no import circle, type-checking ones included).
Trainer = Any
StepResult = Any


class Callbacks:
    def __init__(self, callbacks: list[Callback] | None = None):
        self.items: list[Callback] = list(callbacks or [])

    def attach(self, trainer: Trainer) -> None:
        for cb in self.items:
            cb.trainer = trainer

    def setup_start(self) -> None:
        for cb in self.items:
            cb.setup_start()

    def resume_planned(self, step: int) -> None:
        for cb in self.items:
            cb.resume_planned(step)

    def setup(self) -> None:
        for cb in self.items:
            cb.setup()

    def fit_start(self) -> None:
        for cb in self.items:
            cb.fit_start()

    def before_step(self, step: int) -> None:
        for cb in self.items:
            cb.before_step(step)

    def before_forward(self, step: int, micro: int) -> None:
        for cb in self.items:
            cb.before_forward(step, micro)

    def modify_loss(self, step: int, micro: int, loss: Any) -> Any:
        for cb in self.items:
            loss = cb.modify_loss(step, micro, loss)
        return loss

    def after_backward(self, step: int, micro: int) -> None:
        for cb in self.items:
            cb.after_backward(step, micro)

    def step_reductions(self, step: int) -> list[tuple[Callback, Any]]:
        """(callback, tensor) of every callback that adds to the step's all-reduce, in order."""
        out = []
        for cb in self.items:
            t = cb.step_reduction(step)
            if t is not None:
                out.append((cb, t))
        return out

    def before_optimizer_step(self, step: int) -> None:
        for cb in self.items:
            cb.before_optimizer_step(step)

    def after_optimizer_step(self, step: int, skipped: bool) -> None:
        for cb in self.items:
            cb.after_optimizer_step(step, skipped)

    def log_window(self, step: int, metrics: dict[str, Any]) -> None:
        for cb in self.items:
            cb.log_window(step, metrics)

    def log_metrics(self, step: int, metrics: dict[str, Any], histograms: dict[str, tuple[list, list]] | None = None) -> None:
        for cb in self.items:
            cb.log_metrics(step, metrics, histograms)

    def after_step(self, step: int, result: StepResult) -> None:
        for cb in self.items:
            cb.after_step(step, result)

    def step_end(self, step: int, result: StepResult) -> None:
        for cb in self.items:
            cb.step_end(step, result)

    def during_save(self, step: int) -> None:
        for cb in self.items:
            cb.during_save(step)

    def after_save(self, step: int, path: Path) -> None:
        for cb in self.items:
            cb.after_save(step, path)

    def before_eval_batch(self) -> None:
        for cb in self.items:
            cb.before_eval_batch()

    def fit_end(self, step: int) -> None:
        for cb in self.items:
            cb.fit_end(step)

    def on_stop(self, step: int, signum: int | None) -> None:
        for cb in self.items:
            cb.on_stop(step, signum)

    def close(self) -> None:
        """Every callback's close, even when one raises (the first error goes on)."""
        error: BaseException | None = None
        for cb in self.items:
            try:
                cb.close()
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the others closed
                error = error or e
        if error is not None:
            raise error
