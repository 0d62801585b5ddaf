"""Fault injection for the crash-safety tests (`MEGAMOR_FAULTS`, megamor.train.faults): real
failures at chosen moments. The trainer installs this callback only when the variable is set,
so a normal run holds no fault code on its path. It comes first in the callback list: a fault
after step K strikes before that step's checkpoint or evaluation."""

from __future__ import annotations

from typing import Any

from megamor.train.callbacks.base import Callback
from megamor.train.faults import Faults, poison_gradients


class FaultInjection(Callback):
    def __init__(self, faults: Faults):
        self.faults = faults

    def setup_start(self) -> None:
        self.faults.at_setup(self.trainer.rank)

    def before_step(self, step: int) -> None:
        self.faults.before_step(step, self.trainer.rank)

    def before_forward(self, step: int, micro: int) -> None:
        self.faults.before_forward(self.trainer.rank)

    def modify_loss(self, step: int, micro: int, loss: Any) -> Any:
        if self.faults.nan_loss(step):
            loss = loss * float("nan")
        if self.faults.inf_grad(step):
            loss = poison_gradients(loss)
        return loss

    def step_end(self, step: int, result: Any) -> None:
        self.faults.after_step(step, self.trainer.rank, self.trainer.run_dir)

    def during_save(self, step: int) -> None:
        self.faults.during_save(step, self.trainer.rank)

    def before_eval_batch(self) -> None:
        self.faults.before_eval_batch(self.trainer.rank)
