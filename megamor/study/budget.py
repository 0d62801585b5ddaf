"""Iso-FLOP token budgets: a variant that costs less per token trains on more tokens.

FLOPs per token are the model's expected forward FLOPs (megamor.model.flops): expert choice at
its capacities (a step costs only for the tokens routed to it), token choice with uniform
depths, causal attention counted once per useful entry. This is the paper's convention: MoR
runs more tokens at the same FLOPs (its 360M budget, 16.5e18, is forward FLOPs x ~20B tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from megamor.model.config import ModelConfig
from megamor.model.flops import flops_per_token
from megamor.study.config import BudgetConfig

TRAIN_MULTIPLIER = 3.0  # forward + backward


@dataclass
class RunBudget:
    flops_per_token: float  # forward, expected (capacity) routing
    tokens_per_step: int  # global batch x sequence length
    steps: int
    tokens: int  # steps x tokens_per_step
    flops: float  # tokens x FLOPs per token, in the budget's count (forward or training)


def counted_flops_per_token(cfg: ModelConfig, seq_len: int, count: str) -> float:
    fpt = flops_per_token(cfg, seq_len)
    return fpt * (TRAIN_MULTIPLIER if count == "training" else 1.0)


def run_budget(budget: BudgetConfig, cfg: ModelConfig, seq_len: int, global_batch_size: int) -> RunBudget:
    """Optimizer steps (rounded to the nearest whole step, at least 1) that spend the budget."""
    per_step = global_batch_size * seq_len
    fpt = counted_flops_per_token(cfg, seq_len, budget.count)
    tokens = budget.tokens if budget.tokens is not None else float(budget.flops) / fpt
    steps = max(1, round(tokens / per_step))
    return RunBudget(fpt, per_step, steps, steps * per_step, steps * per_step * fpt)
