"""Router-state sync: the router state that is not a parameter, kept equal on every rank so the
ranks route alike.

- Expert choice's learned causal thresholds (`router.learn_threshold`): each rank tracks its own
  micro-batches; their average over the world rides in the step's one all-reduce and goes back
  into every rank's routers, and is logged as train/router_health/r{r}/threshold (the causal cut
  after this step, a logit) for the steps with capacity < 1.
- Token choice's loss-free balancing bias (`router.balancing: loss_free`): after an optimizer
  step that was applied, the per-depth load is all-reduced over the data-parallel group and the
  bias updated.
"""

from __future__ import annotations

from typing import Any

import torch

from megamor.parallel import dist as pdist
from megamor.train.callbacks.base import Callback


class RouterStateSync(Callback):
    def __init__(self) -> None:
        self._thresholds: list[float] = []

    def step_reduction(self, step: int) -> torch.Tensor | None:
        return self.trainer.model.router_thresholds()

    def step_reduced(self, step: int, values: torch.Tensor) -> None:
        values /= self.trainer.dp  # summed over the world and divided by TP: now the mean
        self.trainer.model.set_router_thresholds(values)
        self._thresholds = values.tolist()

    def after_optimizer_step(self, step: int, skipped: bool) -> None:
        model = self.trainer.model
        if skipped:
            return
        load = model.loss_free_load()
        if load is not None:
            model.update_loss_free_bias(pdist.all_reduce_(load.to(self.trainer.device), group=self.trainer.layout.dp_group))

    def after_step(self, step: int, result: Any) -> None:
        capacities = self.trainer.model.cfg.capacities
        for r, v in enumerate(self._thresholds):
            if capacities[r] < 1.0:
                result.aux[f"router_health/r{r + 1}/threshold"] = v
        self._thresholds = []
