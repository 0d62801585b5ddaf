"""Is the expert-choice router healthy? Statistics of its logits, per recursion step.

A sigmoid gate g = alpha * sigmoid(logit) passes language-model gradient to the router only
while it is unsaturated (sigmoid'(x) = s(1 - s) ~ e^-|x|). Logits running away to +-inf make
the gate a hard 0 / alpha and the router a pure top-k sorter trained by its BCE alone, so
these numbers say whether routing is still learned from the LM loss:

  logit_mean, logit_std, logit_max_abs   over the step's candidate tokens
  saturated      share of candidates whose sigmoid is within 1e-3 of 0 or 1 (|logit| > 6.9)
  bce            BCE of sigmoid(logit) against the top-k selection (this step alone)

and, on validation, how well the causal decision (sigmoid > threshold, what evaluation and
decoding use) reproduces the top-k selection it was trained to imitate:

  precision = |causal & topk| / |causal|,  recall = |causal & topk| / |topk|

Everything stays a tensor on the logits' device (no host sync inside the forward pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SATURATION_EPS = 1e-3
HEALTH_PREFIX = "router_health"


def step_health(r: int, logits: Tensor, candidates: Tensor, selected: Tensor) -> dict[str, Tensor]:
    """Health statistics of recursion step r (0-based; named r+1) over its candidate tokens.
    Keys are `router_health/r{r+1}/<stat>`; all are 0 without candidates. Masked reductions
    (no boolean indexing): fixed shapes, no host sync."""
    x = logits.detach().float()
    w = candidates.float()
    n = w.sum().clamp(min=1.0)
    mean = (x * w).sum() / n
    var = (((x - mean) ** 2) * w).sum() / n
    s = torch.sigmoid(x)
    sat = ((s < SATURATION_EPS) | (s > 1 - SATURATION_EPS)).float()
    name = f"{HEALTH_PREFIX}/r{r + 1}"
    return {
        f"{name}/logit_mean": mean,
        f"{name}/logit_std": var.sqrt(),
        f"{name}/logit_max_abs": (x.abs() * w).amax(),
        f"{name}/saturated": (sat * w).sum() / n,
        f"{name}/bce": F.binary_cross_entropy_with_logits(x, selected.float(), weight=w, reduction="sum") / n,
    }


def agreement_counts(logits: Tensor, candidates: Tensor, topk: Tensor, threshold: Tensor | float) -> Tensor:
    """[causal & topk, causal, topk] token counts (float64) of one routed step: the causal
    choice is candidates & logit > threshold (the router's `threshold`, a logit), compared
    with the top-k selection."""
    causal = candidates & (logits.float() > threshold)
    top = topk & candidates
    return torch.stack([(causal & top).sum(), causal.sum(), top.sum()]).double()


def precision_recall(counts: Tensor) -> tuple[float, float]:
    both, causal, top = (float(v) for v in counts.tolist())
    return (both / causal if causal else float("nan")), (both / top if top else float("nan"))
