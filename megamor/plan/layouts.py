"""Every layout a world size allows, the ones that fit, ranked by predicted throughput.

Candidates: TP sizes that divide the world, stay inside one node and split the model (heads,
KV heads, d_ff, vocabulary); ZeRO 0-3 (TP runs with 0-2); micro-batches that divide the global
batch per data-parallel rank (powers of two and the largest); checkpointing off and on;
sequence parallelism (with TP > 1) only when the config asks for it. Ranking: predicted
tokens/day (megamor.plan.speed: the recompute's 4/3 and the exposed TP / DP traffic are what
separate them); layouts within 1% of the best of their group are ties (closer than that the
model cannot tell them apart), ordered by less traffic per rank (what a real network turns into
time the model does not see), then the larger micro-batch up to 16k tokens (fewer, larger
kernels), then fewer bytes per rank.
"""

from __future__ import annotations

from typing import Any

from megamor.config import ConfigError
from megamor.plan.hardware import GPU
from megamor.plan.planner import Layout, plan_layout
from megamor.plan.speed import DEFAULT_OVERLAP
from megamor.train.config import ExperimentConfig


def candidate_layouts(exp: ExperimentConfig, world: int, gpus_per_node: int) -> list[Layout]:
    sp = bool(getattr(exp.parallel, "sequence", False))
    out = []
    for tp in (t for t in (1, 2, 4, 8) if t <= min(world, gpus_per_node) and world % t == 0):
        dp = world // tp
        per_rank = exp.batch.global_batch_size // dp if exp.batch.global_batch_size % dp == 0 else 0
        micros = sorted({m for m in (1, 2, 4, 8, 16, 32, 64, per_rank) if m and per_rank % m == 0})
        for zero in (0, 1, 2) if tp > 1 else (0, 1, 2, 3):
            for micro in micros:
                for ckpt in (False, True):
                    out.append(Layout(world, tp, zero, micro, ckpt, sp and tp > 1))
    return out


def ranked_layouts(exp: ExperimentConfig, world: int, gpu: GPU, mfu: float, headroom: float,
                   attention: str = "sdpa", overlap: float = DEFAULT_OVERLAP) -> list[dict[str, Any]]:
    """Plans of the candidate layouts that fit, best first."""
    plans = []
    for layout in candidate_layouts(exp, world, gpu.gpus_per_node):
        try:
            plan = plan_layout(exp, layout, gpu, mfu, headroom, attention, overlap=overlap)
        except ConfigError:  # this TP size cannot split the model, or the batch does not divide
            continue
        if plan["fits"]:
            plans.append(plan)
    return rank(plans)


# Tokens per micro-batch beyond which a larger micro-batch buys no matmul efficiency, only memory.
SATURATION_TOKENS = 16384
# Predicted throughputs closer than this (relative) are ties.
TIE = 0.01


def rank(plans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first: by tokens/day, in groups of ties (within TIE of the group's fastest; the
    next group starts at the first plan outside), each group ordered by _tie_key."""
    by_speed = sorted(plans, key=lambda p: -p["speed"]["tokens_per_day"])
    out: list[dict[str, Any]] = []
    while by_speed:
        lead = by_speed[0]["speed"]["tokens_per_day"]
        group = [p for p in by_speed if p["speed"]["tokens_per_day"] >= lead * (1.0 - TIE)]
        by_speed = by_speed[len(group):]
        out += sorted(group, key=_tie_key)
    return out


def _tie_key(plan: dict[str, Any]) -> tuple[float, int, float]:
    """Less traffic per rank, then the larger micro-batch up to SATURATION_TOKENS (the model
    gives small ones no kernel-efficiency penalty, real GPUs do), then fewer bytes per rank
    (headroom for the unmodelled)."""
    sp, lay = plan["speed"], plan["layout"]
    tokens = min(lay["micro_batch"] * plan["kv_cache"]["seq_len"], SATURATION_TOKENS)
    return (sp["dp_traffic_bytes"] + sp["tp_traffic_bytes"], -tokens, plan["per_rank"]["total_bytes"])
