"""Straggler detection: which rank is slow in the phases without a collective (data + forward),
per log window: time/straggler_ratio (slowest / median), time/straggler_rank, time/straggler_s.
One small all-reduce per window, on every rank; reads the window PhaseTimers just closed, so it
comes after PhaseTimers in the callback list."""

from __future__ import annotations

from typing import Any

from megamor.train.callbacks.base import Callback


class StragglerDetection(Callback):
    def log_window(self, step: int, metrics: dict[str, Any]) -> None:
        t = self.trainer
        for name, value in t.observer.timer.straggler(t.rank, t.world).items():
            t.record_metric(name, value)
