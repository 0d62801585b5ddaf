"""The callback interface of the training loop: one object per feature, told where the loop is.

The trainer calls every callback's hooks in list order (built-ins first, then
`trainer.callbacks` from the config), on every rank; a hook that runs a collective must do so
on every rank. `self.trainer` is set before `setup`. Hooks, in the order one run meets them:

    setup_start()                    set-up begins (signal handlers installed; nothing built yet)
    resume_planned(step)             the run folder's checkpoint this attempt resumes from is known
                                     (`step`; 0: none), before anything is converted, built or loaded
    setup()                          after set-up (engine, loader exist; resumed state loaded), before
                                     the banner: the sinks open here
    fit_start()                      the loop begins (after the set-up stop check)
    before_step(step)                before optimizer step `step` (1-based) runs
    before_forward(step, micro)      before the forward of micro-batch `micro` (0-based) of the step
    modify_loss(step, micro, loss)   returns the loss to backpropagate (fault injection poisons it)
    after_backward(step, micro)      after the backward of micro-batch `micro`
    step_reduction(step)             a tensor to add to the step's one all-reduce over the world, or None
    step_reduced(step, values)       its sum over the world (divided by the TP size: TP ranks count alike)
    before_optimizer_step(step)      after the last backward, before engine.step() updates the weights
    after_optimizer_step(step, skipped)  right after engine.step() (skipped: the update was not applied)
    log_window(step, metrics)        a log window closes: `metrics` is what goes out; add with
                                     `self.trainer.record_metric(name, value)` (rank 0's values are logged)
    log_metrics(step, metrics, histograms)  a metrics record goes out (after the window's `log_window`
                                     hooks, or an evaluation's results; histograms: name -> (counts, edges)
                                     or None): the sinks (console, metrics.jsonl, W&B, TensorBoard) write
                                     rank 0's (every rank gets its own record)
    after_step(step, result)         the step is counted (result: train.step.StepResult), before its logging
    step_end(step, result)           after the step's logging: checkpoint and evaluation cadence
    during_save(step)                a checkpoint's files are on disk, its completeness marker not yet
    after_save(step, path)           a checkpoint of `step` is complete at `path`
    before_eval_batch()              before each validation batch (every rank)
    fit_end(step)                    the loop reached max_steps (not called on a stop)
    on_stop(step, signum)            a stop signal was agreed; the trainer saves and exits 75 next
    close()                          on the way out, always (after an error too)

Every hook does nothing by default: a callback overrides the ones it needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The trainer and StepResult are typed Any here: train.config checks trainer.callbacks with this
# package, and the trainer imports train.config (no import circle, type-checking ones included).
Trainer = Any
StepResult = Any


class Callback:
    trainer: Trainer

    def setup_start(self) -> None:
        pass

    def resume_planned(self, step: int) -> None:
        pass

    def setup(self) -> None:
        pass

    def fit_start(self) -> None:
        pass

    def before_step(self, step: int) -> None:
        pass

    def before_forward(self, step: int, micro: int) -> None:
        pass

    def modify_loss(self, step: int, micro: int, loss: Any) -> Any:
        return loss

    def after_backward(self, step: int, micro: int) -> None:
        pass

    def step_reduction(self, step: int) -> Any:
        return None

    def step_reduced(self, step: int, values: Any) -> None:
        pass

    def before_optimizer_step(self, step: int) -> None:
        pass

    def after_optimizer_step(self, step: int, skipped: bool) -> None:
        pass

    def log_window(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def log_metrics(self, step: int, metrics: dict[str, Any], histograms: dict[str, tuple[list, list]] | None) -> None:
        pass

    def after_step(self, step: int, result: StepResult) -> None:
        pass

    def step_end(self, step: int, result: StepResult) -> None:
        pass

    def during_save(self, step: int) -> None:
        pass

    def after_save(self, step: int, path: Path) -> None:
        pass

    def before_eval_batch(self) -> None:
        pass

    def fit_end(self, step: int) -> None:
        pass

    def on_stop(self, step: int, signum: int | None) -> None:
        pass

    def close(self) -> None:
        pass
