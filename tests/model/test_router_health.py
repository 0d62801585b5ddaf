"""Router health statistics and the BCE options, against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megamor.model.router_health import agreement_counts, precision_recall, step_health
from megamor.model.routers import expert_choice_aux_losses

from .helpers import mor


def test_step_health_matches_numpy():
    torch.manual_seed(0)
    logits = torch.randn(3, 20) * 5
    logits[0, 0] = 9.0  # sigmoid within 1e-3 of 1
    cand = torch.rand(3, 20) > 0.2
    sel = cand & (torch.rand(3, 20) > 0.5)
    h = step_health(1, logits, cand, sel)
    x = logits.numpy()[cand.numpy()].astype(np.float64)
    y = sel.numpy()[cand.numpy()].astype(np.float64)
    s = 1 / (1 + np.exp(-x))
    assert set(h) == {f"router_health/r2/{k}" for k in ("logit_mean", "logit_std", "logit_max_abs", "saturated", "bce")}
    assert h["router_health/r2/logit_mean"].item() == pytest.approx(x.mean(), rel=1e-5)
    assert h["router_health/r2/logit_std"].item() == pytest.approx(x.std(), rel=1e-5)
    assert h["router_health/r2/logit_max_abs"].item() == pytest.approx(np.abs(x).max(), rel=1e-6)
    assert h["router_health/r2/saturated"].item() == pytest.approx(((s < 1e-3) | (s > 1 - 1e-3)).mean())
    assert h["router_health/r2/bce"].item() == pytest.approx(-(y * np.log(s) + (1 - y) * np.log(1 - s)).mean(), rel=1e-4)
    empty = step_health(0, logits, torch.zeros_like(cand), sel)
    assert all(v.item() == 0 for v in empty.values()) and len(empty) == 5


def test_agreement_precision_recall():
    logits = torch.tensor([[3.0, -2.0, 1.0, -1.0, 0.5, 4.0]])
    cand = torch.tensor([[True, True, True, True, True, False]])
    topk = torch.tensor([[True, True, False, False, True, False]])
    # causal: logit > 0 (sigmoid > 0.5) among candidates -> positions 0, 2, 4 (5 is no candidate)
    c = agreement_counts(logits, cand, topk, 0.0)
    assert c.tolist() == [2.0, 3.0, 3.0]
    p, r = precision_recall(c)
    assert (p, r) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    # a learned threshold (a logit, here a tensor as the routers hold it): logit > -2.5 -> 0-4
    assert agreement_counts(logits, cand, topk, torch.tensor([-2.5])).tolist() == [3.0, 5.0, 3.0]
    assert math.isnan(precision_recall(torch.tensor([0.0, 0.0, 5.0]))[0])


def test_label_smoothing_puts_the_bce_minimum_at_a_finite_logit():
    eps = 0.1
    x = torch.tensor([math.log((1 - eps) / eps), -math.log((1 - eps) / eps)], requires_grad=True)
    bce, _ = expert_choice_aux_losses(x.unsqueeze(0), torch.ones(1, 2, dtype=torch.bool),
                                      torch.tensor([[True, False]]), smoothing=eps)
    (g,) = torch.autograd.grad(bce, x)
    assert g.abs().max().item() < 1e-6  # the minimum: no pull towards +-inf
    bce0, _ = expert_choice_aux_losses(x.detach().unsqueeze(0), torch.ones(1, 2, dtype=torch.bool),
                                       torch.tensor([[True, False]]))
    assert bce0.item() > 0  # hard targets still pull further out


@pytest.mark.parametrize("full", [True, False])
def test_router_bce_is_a_mean_over_steps(full):
    """The logged and trained BCE is the mean of the per-step BCEs (it was their sum, so its
    scale grew with N_r); steps at capacity 1 count only with bce_full_capacity_steps."""
    m = mor("expert_choice", nr=3, router={"type": "expert_choice", "bce_full_capacity_steps": full, "bce_label_smoothing": 0.0})
    m.train()
    out = m(torch.randint(0, 211, (2, 24)))
    per_step = [out.aux_losses[f"router_health/r{r}/bce"] for r in (1, 2, 3)]
    counted = per_step if full else per_step[1:]
    assert out.aux_losses["router_bce"].item() == pytest.approx(torch.stack(counted).mean().item(), rel=1e-6)


def test_learned_alpha_starts_at_alpha_and_learns():
    m = mor("expert_choice", nr=2, router={"type": "expert_choice", "alpha": 0.1, "learn_alpha": True})
    alphas = [r.scale.alpha for r in m.routers]
    assert all(a.item() == pytest.approx(0.1) for a in alphas)
    fixed = mor("expert_choice", nr=2, router={"type": "expert_choice", "alpha": 0.1, "learn_alpha": False})
    fixed.load_state_dict({k: v for k, v in m.state_dict().items() if not k.endswith(".alpha")})
    x = torch.randint(0, 211, (2, 16))
    assert torch.allclose(m(x).logits, fixed(x).logits, atol=1e-6)  # same function at init
    m(x, targets=x).loss.backward()
    assert all(a.grad is not None and a.grad.abs().item() > 0 for a in alphas)


def test_record_router_traces_routed_steps():
    m = mor("expert_choice", nr=3)
    m.eval()
    m.record_router = True
    out = m(torch.randint(0, 211, (2, 24)))
    steps = [t[0] for t in out.stats["router_trace"]]
    assert steps == [1, 2]  # capacity-1 step 0 routes nothing
    _, _, cand, sel = out.stats["router_trace"][0]
    assert sel.sum().item() == 2 * int(24 * 2 / 3) and bool((sel <= cand).all())
    m.record_router = False
    assert "router_trace" not in m(torch.randint(0, 211, (2, 24))).stats
