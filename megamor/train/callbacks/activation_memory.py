"""Activation-memory metering: the bytes one micro-batch's forward keeps for its backward
(megamor.observe.activation_memory.SavedTensorMeter), measured on the first forward of each log
window (the trainer's `observer.forward()`) and logged as mem/activation_bytes."""

from __future__ import annotations

from typing import Any

from megamor.train.callbacks.base import Callback


class ActivationMemory(Callback):
    def log_window(self, step: int, metrics: dict[str, Any]) -> None:
        measured = self.trainer.observer.take_activation_bytes()  # and measure the next window's first forward
        if measured is not None:
            self.trainer.record_metric("mem/activation_bytes", measured)
