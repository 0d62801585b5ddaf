"""Router health on validation, accumulated over batches and reduced over ranks once.

- agreement (expert choice), on the top-k pass: per routed step, precision and recall of the
  causal choice (logit > the router's threshold, what evaluation and decoding use) against top-k;
- depth vs loss, on the causal pass (the only pass for other routers): Pearson correlation
  of a token's recursion depth and its next-token loss (sums that all-reduce exactly).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from megamor.model.routing import precision_recall, trace_agreement
from megamor.parallel import dist as pdist


class RouterValidation:
    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model
        cfg = model.cfg
        self.expert = cfg.router.type == "expert_choice"
        self.routed_steps = [r for r, c in enumerate(cfg.capacities) if c < 1.0] if self.expert else []
        self.has_depth = len(model.steps) > 0 and cfg.router.type != "none"
        self.agree = torch.zeros(max(1, len(self.routed_steps)), 3, dtype=torch.float64, device=device)
        self.moments = torch.zeros(6, dtype=torch.float64, device=device)  # n, sx, sy, sxx, syy, sxy

    def start(self, causal: bool) -> None:
        """Before a validation pass: the top-k pass of expert choice records router logits."""
        self.model.record_router = self.expert and not causal

    def wants_logits(self, causal: bool) -> bool:
        """This pass's per-token losses feed the depth-loss correlation (logits needed)."""
        return self.has_depth and (causal or not self.expert)

    def stop(self) -> None:
        self.model.record_router = False

    @torch.no_grad()
    def update(self, out, targets: torch.Tensor, causal: bool) -> None:
        if self.expert and not causal:
            for r, counts in trace_agreement(self.model.routers, out.stats.get("router_trace", [])).items():
                self.agree[self.routed_steps.index(r)] += counts
        if self.wants_logits(causal) and out.logits is not None:
            mask = targets != -100
            loss = F.cross_entropy(out.logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
            x, y = out.stats.depth[mask].double(), loss[mask].double()
            self.moments += torch.stack([x.new_tensor(float(x.numel())), x.sum(), y.sum(), (x * x).sum(), (y * y).sum(),
                                         (x * y).sum()])

    def results(self, group: Any = None) -> dict[str, float]:
        """Metrics all-reduced over `group` (data parallel; every rank of it must call this)."""
        pdist.all_reduce_(self.agree, group=group)
        pdist.all_reduce_(self.moments, group=group)
        out: dict[str, float] = {}
        for i, r in enumerate(self.routed_steps):
            p, rec = precision_recall(self.agree[i].cpu())
            out[f"val/router_precision_r{r + 1}"] = p
            out[f"val/router_recall_r{r + 1}"] = rec
        if self.has_depth:
            n, sx, sy, sxx, syy, sxy = self.moments.tolist()
            vx, vy = n * sxx - sx * sx, n * syy - sy * sy
            out["val/corr_depth_loss"] = (n * sxy - sx * sy) / math.sqrt(vx * vy) if n > 1 and vx > 0 and vy > 0 else math.nan
        return out
