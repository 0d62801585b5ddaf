"""Iso-FLOP token budgets: a variant that costs less per token trains on more tokens.

FLOPs per token are the model's expected forward FLOPs (megamor.model.flops) in the study's
convention (`flops.convention`), expert choice at its capacities (a step costs only for the
tokens routed to it), token choice with uniform depths, causal attention counted once per
useful entry:
  exact  megamor's count: LM head, routers and GQA's K/V projections at their real size
         (what MFU uses). Not the paper's: relative to vanilla it gives MoR-expert 2-9% fewer
         tokens than the paper does (360M MoR-expert-3: 5%), and at 135M and 360M it prices
         recursive KV sharing above recursion-wise caching, where the paper has it cheaper.
  paper  the paper's (Appendix D): no embedding, LM head or router, K/V at d x d; its 360M
         budget of 16.5e18 forward FLOPs gives vanilla 19.79B tokens, MoR-expert-3 29.70B.
"""

from __future__ import annotations

from dataclasses import dataclass

from megamor.model.config import ModelConfig
from megamor.model.flops import budget_flops_per_token, budget_steps
from megamor.study.config import BudgetConfig


@dataclass
class RunBudget:
    flops_per_token: float  # expected (capacity) routing, in the budget's count and the study's convention
    tokens_per_step: int  # global batch x sequence length
    steps: int
    tokens: int  # steps x tokens_per_step
    flops: float  # tokens x FLOPs per token, in the budget's count (forward or training)
    target_flops: float | None = None  # the budget's FLOPs (None for a token budget)

    @property
    def off_budget(self) -> float:
        """flops / target - 1: what rounding to whole steps adds or leaves out (0 for tokens)."""
        return self.flops / self.target_flops - 1.0 if self.target_flops else 0.0


def run_budget(budget: BudgetConfig, cfg: ModelConfig, seq_len: int, global_batch_size: int,
               convention: str = "exact") -> RunBudget:
    """Optimizer steps (rounded to the nearest whole step, at least 1) that spend the budget.
    The paper's released 360M step counts are within one step of this (9,438 for vanilla;
    14,161 for MoR-expert-3, where its rule gives 14,160.01)."""
    per_step = global_batch_size * seq_len
    fpt = budget_flops_per_token(cfg, seq_len, budget.count, convention)
    if budget.tokens is not None:
        steps = max(1, round(budget.tokens / per_step))
    else:  # the rule an experiment's own `budget.flops` follows too (megamor.train.config)
        steps = budget_steps(float(budget.flops), fpt, per_step)
    target = float(budget.flops) if budget.tokens is None and budget.flops is not None else None
    return RunBudget(fpt, per_step, steps, steps * per_step, steps * per_step * fpt, target)


OFF_BUDGET_NOTE = 0.02  # whole steps this far off a FLOPs budget are pointed out (`--plan`)


def off_budget_note(named: list[tuple[str, RunBudget]]) -> str | None:
    """One line naming the runs whose whole steps spend more than 2% more or less than their
    FLOPs budget (few, large steps: an iso-FLOP comparison is then off by that much), or None."""
    off = [(n, b.off_budget) for n, b in named if abs(b.off_budget) > OFF_BUDGET_NOTE]
    if not off:
        return None
    worst = max(off, key=lambda x: abs(x[1]))
    return (f"note: whole steps put {len(off)} run(s) more than {OFF_BUDGET_NOTE:.0%} off their FLOPs budget "
            f"(worst {worst[0]}: {worst[1]:+.1%}); a larger budget or a smaller global batch makes finer steps")
