"""Expert choice's learned causal threshold (router.learn_threshold): training's top-k boundary,
averaged into a buffer that causal routing uses; checked against plain re-computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from megamor.model.router_health import agreement_counts, precision_recall
from megamor.model.routers import expert_choice_top_k

from .helpers import mor


def test_top_k_boundary_is_midway_between_the_kth_and_next_candidate():
    logits = torch.tensor([[3.0, -2.0, 1.0, -1.0, 0.5, 4.0],
                           [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
                           [9.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    cand = torch.tensor([[True, True, True, True, True, False],  # 5 candidates: k=2 -> 3 and 1, then 0.5
                         [False, False, False, False, True, True],  # exactly k candidates: the k-th itself
                         [True, False, False, False, False, False]])  # fewer than k: no boundary
    sel, boundary, has = expert_choice_top_k(logits, cand, 2)
    assert sel.tolist() == [[True, False, True, False, False, False],
                            [False, False, False, False, True, True],
                            [True, False, False, False, False, False]]
    assert boundary[:2].tolist() == [0.75, 4.0] and has.tolist() == [True, True, False]


def _router_logits(m, x) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Each routed step's router logits in a training forward, with the candidates it saw."""
    m.record_router = True
    try:
        trace = m(x).stats["router_trace"]
    finally:
        m.record_router = False
    return [(r, logits, cand) for r, logits, cand, _ in trace]


def _boundary_by_sorting(logits: torch.Tensor, cand: torch.Tensor, k: int) -> float:
    rows = []
    for lg, c in zip(logits.numpy(), cand.numpy()):
        v = np.sort(lg[c])[::-1]
        rows.append((v[k - 1] + v[k]) / 2)
    return float(np.mean(rows))


@torch.no_grad()
def test_training_forwards_average_the_boundary_and_nothing_else_moves_it():
    m = mor("expert_choice", nr=3).train()
    T = 40
    xs = [torch.randint(0, m.cfg.vocab_size, (4, T), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    expected: dict[int, list[float]] = {}
    for x in xs:
        for r, logits, cand in _router_logits(m, x):
            k = max(1, int(m.cfg.capacities[r] * T))
            expected.setdefault(r, []).append(_boundary_by_sorting(logits, cand, k))
    for r, router in enumerate(m.routers):
        if m.cfg.capacities[r] < 1.0:  # the first 1/(1-momentum) updates are a running mean
            assert router.threshold.item() == pytest.approx(np.mean(expected[r]), abs=1e-5)
            assert router.threshold_updates.item() == 3
        else:
            assert router.threshold.item() == 0.0 and r not in expected
    before = [r.threshold.clone() for r in m.routers]
    m(xs[0], causal_routing=True)  # causal routing in training mode: no top-k, no update
    m.eval()
    m(xs[1])  # evaluation's top-k pass
    m(xs[1], causal_routing=True)
    assert all(torch.equal(a, r.threshold) for a, r in zip(before, m.routers))

    fixed = mor("expert_choice", nr=3, router={"type": "expert_choice", "learn_threshold": False}).train()
    fixed(xs[0])
    assert all(r.threshold.item() == 0.0 for r in fixed.routers)  # the paper's sigmoid > 0.5


@torch.no_grad()
def test_after_warm_up_the_threshold_is_an_ema():
    m = mor("expert_choice", nr=2, sharing="cycle", router={"type": "expert_choice", "threshold_momentum": 0.5})
    router = m.routers[1]
    has = torch.ones(2, dtype=torch.bool)
    router.track_boundary(torch.tensor([1.0, 3.0]), has)  # first: the mean, 2
    router.track_boundary(torch.tensor([4.0, 4.0]), has)  # second: running mean 3 (rate max(1/2, 0.5))
    router.track_boundary(torch.tensor([7.0, 7.0]), has)  # EMA: 3 + 0.5 * (7 - 3)
    assert router.threshold.item() == pytest.approx(5.0)
    router.track_boundary(torch.tensor([100.0, 100.0]), torch.zeros(2, dtype=torch.bool))  # no boundary: no change
    assert router.threshold.item() == pytest.approx(5.0) and router.threshold_updates.item() == 3


class _Shift(nn.Module):
    def __init__(self, by: float):
        super().__init__()
        self.by = by

    def forward(self, x):
        return x + self.by


@torch.no_grad()
def test_learned_threshold_recovers_top_k_where_the_fixed_cut_misses_everything():
    """Router logits all far below 0 (as when the BCE's pull is weak against the LM's): sigmoid >
    0.5 runs nobody at the routed steps; the learned threshold agrees with top-k."""
    m = mor("expert_choice", nr=3, init_std=0.2)
    for router in m.routers:
        router.net = nn.Sequential(router.net, _Shift(-10.0))
    m.train()
    for i in range(20):
        m(torch.randint(0, m.cfg.vocab_size, (8, 64), generator=torch.Generator().manual_seed(i)))
    m.eval()
    x = torch.randint(0, m.cfg.vocab_size, (8, 64), generator=torch.Generator().manual_seed(99))
    m.record_router = True
    trace = m(x).stats["router_trace"]
    m.record_router = False
    for r, logits, cand, sel in trace:
        p, rec = precision_recall(agreement_counts(logits, cand, sel, m.routers[r].threshold))
        assert p >= 0.8 and rec >= 0.8, (r, p, rec)
        assert precision_recall(agreement_counts(logits, cand, sel, 0.0))[1] <= 0.05
    assert m(x, causal_routing=True).stats.mean_depth > 1.5  # fixed: 1.0 (step 1 only)


def test_threshold_stays_fp32_under_bf16_and_old_checkpoints_load():
    m = mor("expert_choice", nr=3).to(torch.bfloat16)
    assert all(r.threshold.dtype == torch.float32 and r.threshold_updates.dtype == torch.float32 for r in m.routers)
    assert m.routers[0].net.weight.dtype == torch.bfloat16
    m.train()
    with torch.no_grad():
        m(torch.randint(0, m.cfg.vocab_size, (2, 32)))
    assert m.routers[2].threshold_updates.item() == 1

    src = mor("expert_choice", nr=3)
    src.routers[2].threshold.fill_(-1.5)
    sd = src.state_dict()
    dst = mor("expert_choice", nr=3, seed=1)
    dst.load_state_dict(sd)  # strict
    assert dst.routers[2].threshold.item() == -1.5
    old = {k: v for k, v in sd.items() if ".threshold" not in k}  # a checkpoint from before the buffer
    fresh = mor("expert_choice", nr=3, seed=2, router={"type": "expert_choice", "causal_threshold": 0.6})
    fresh.load_state_dict(old)  # strict, no missing keys
    assert fresh.routers[2].threshold.item() == pytest.approx(math.log(0.6 / 0.4))
    assert ".threshold" not in "".join(old) and "routers.2.threshold" not in old  # the caller's dict is left alone
