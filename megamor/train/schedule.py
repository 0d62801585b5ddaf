"""Learning-rate schedules as pure functions of the step, so resuming needs no scheduler state.

WSD (warmup-stable-decay, the paper's "trapezoid"): linear warmup to the peak, constant,
then a decay over the last `decay_steps` (or `decay_fraction` of the) steps to min_lr_ratio * peak.
Cosine: linear warmup, then cosine decay to min_lr_ratio * peak at the last step.
Step numbering: `lr_at(step)` is the rate used by optimizer step `step` (1-based), so the
first step already has a non-zero rate and the last step of a WSD run reaches the minimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megamor.train.config import ScheduleConfig


@dataclass(frozen=True)
class LRSchedule:
    peak: float
    total_steps: int
    warmup_steps: int
    decay_steps: int  # wsd only
    kind: str = "wsd"
    decay_shape: str = "linear"
    min_ratio: float = 0.0

    @classmethod
    def from_config(cls, cfg: ScheduleConfig, peak: float, total_steps: int) -> LRSchedule:
        return cls(peak, total_steps, cfg.warmup(total_steps), cfg.decay(total_steps), cfg.type, cfg.decay_shape, cfg.min_lr_ratio)

    def factor(self, step: int) -> float:
        """Multiplier of the peak rate at optimizer step `step` (1-based)."""
        s, n, w = step, self.total_steps, self.warmup_steps
        if w > 0 and s <= w:
            return s / w
        if self.kind == "constant":
            return 1.0
        lo = self.min_ratio
        if self.kind == "cosine":
            span = max(1, n - w)
            progress = min(1.0, (s - w) / span)
            return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
        # wsd
        d = self.decay_steps
        if d <= 0 or s <= n - d:
            return 1.0
        progress = min(1.0, (s - (n - d)) / d)
        if self.decay_shape == "cosine":
            return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
        return lo + (1 - lo) * (1 - progress)

    def lr_at(self, step: int) -> float:
        return self.peak * self.factor(step)
