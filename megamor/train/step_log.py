"""What a log line says: the steps since the last one summed (WindowStats), turned into metrics.

Rank 0 holds the global values (every StepResult is already reduced over the world); the
metric names are those of metrics.jsonl and W&B (train/, perf/, router/).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megamor.train.metrics import PeakFlops, WindowStats, peak_memory_bytes
from megamor.train.step import StepResult


def accumulate(w: WindowStats, r: StepResult) -> None:
    w.steps += 1
    w.time += r.time
    w.tokens += r.tokens
    w.flops += r.flops
    if r.skipped:
        w.skipped += 1
        return
    w.loss += r.loss
    if r.grad_norm is not None:
        w.grad_norm += r.grad_norm
        w.grad_norm_steps += 1
    for k, v in r.aux.items():
        w.aux[k] = w.aux.get(k, 0.0) + v
    if r.tokens_per_step:
        w.add_routing(r.tokens_per_step, r.depth_hist)


def window_metrics(w: WindowStats, *, lr: float, tokens: int, skipped_steps: int, flops_total: float,
                   device: torch.device, world: int, peak: PeakFlops | None,
                   recomputed_share: float = 0.0, warn: Callable[[str], None] | None = None,
                   ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(scalar metrics, histograms or None) of one window; `tokens`, `skipped_steps` and
    `flops_total` are the run's totals so far. MFU/HFU never exceed 1 (PeakFlops.utilisation)."""
    good = w.steps - w.skipped
    m: dict[str, Any] = {
        "train/loss": w.loss / good if good else float("nan"),
        "train/lr": lr,
        "train/grad_norm": w.grad_norm / w.grad_norm_steps if w.grad_norm_steps else None,
        "train/tokens": tokens,
        "train/skipped_steps": skipped_steps,
        "perf/tokens_per_s": w.tokens / w.time if w.time else 0.0,
        "perf/step_time_s": w.time / w.steps,
        "perf/model_tflops_total": flops_total / 1e12,
        "perf/peak_mem_gb": peak_memory_bytes(device) / 2**30,
    }
    for k, v in w.aux.items():
        m[f"train/{k}"] = v / good if good else float("nan")
    if peak is not None and w.time:
        achieved = w.flops / w.time / world / 1e12  # per device
        # Activation checkpointing runs the layers' forward again (recomputed_share of the forward,
        # megamor.model.flops.recomputed_share): hardware FLOPs per model FLOP (3 x forward) 1 + share / 3.
        hw = 1.0 + recomputed_share / 3.0
        u = peak.utilisation(achieved, hw, warn)
        if u is not None:
            m["perf/mfu"], m["perf/hfu"] = u
    hist = None
    if w.tokens_per_step and w.depth_hist is not None:
        total = float(w.depth_hist.sum()) or 1.0
        for r, n in enumerate(w.tokens_per_step):
            m[f"router/selected_frac_r{r + 1}"] = n / total
        depths = torch.arange(len(w.depth_hist), dtype=torch.float64)
        m["router/mean_depth"] = float((w.depth_hist.double() * depths).sum()) / total
        edges = [d - 0.5 for d in range(len(w.depth_hist) + 1)]
        hist = {"router/depth_hist": (w.depth_hist.tolist(), edges)}
    return m, hist
