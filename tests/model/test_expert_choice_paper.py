"""Expert choice's `expert_choice_update: paper` (the paper's Eq. 1, h <- h + g * step(h), as its
official code runs it) equals a plain reference that walks each row and each recursion step, in
training (top-k), causal evaluation, both decoding schedules and the exported transformers model;
and `init_scaled_residual: false` is the paper's (Hugging Face Llama's) initialisation."""

from __future__ import annotations

import copy

import pytest
import torch

from megamor.model.layers import TokenMeta
from tests.model.helpers import assert_decoding_and_export_agree, mor, refused

PAPER_ROUTER = {"type": "expert_choice", "expert_choice_update": "paper", "activation": "sigmoid", "alpha": 0.1,
                "learn_threshold": False, "gate_straight_through": False}


def paper_model(seed: int = 2, kv_mode: str = "recursion_wise", **router):
    return mor("expert_choice", sharing="middle_cycle", seed=seed, init_std=0.3, kv_mode=kv_mode,
               router={**PAPER_ROUTER, **router})


def _layers(model, ids, h, pos):
    cos, sin = model.rope(pos)
    for phys in ids:
        h, _ = model.layers[phys](h, TokenMeta(pos, causal_exact=True), (cos, sin))
    return h


@torch.no_grad()
def reference_logits(model, x: torch.Tensor, causal: bool) -> tuple[torch.Tensor, list[int]]:
    """Eq. 1 one row at a time: at step r the router scores the row's hidden states; the
    candidates (the tokens that ran step r-1) whose score passes (causal: sigmoid > 0.5; training:
    the top int(c_r T) of them) run the step among themselves at their own positions, and each
    leaves with h + alpha * sigmoid(logit) * (step output). Returns the logits and the tokens per
    step, summed over rows."""
    B, T = x.shape
    pos = torch.arange(T).unsqueeze(0)
    h = _layers(model, model.prelude, model.embed_tokens(x), pos)
    alpha, counts = model.cfg.router.gate_scale, [0] * len(model.steps)
    for b in range(B):
        cur, cand = h[b].clone(), torch.ones(T, dtype=torch.bool)
        for r, layer_ids in enumerate(model.steps):
            logit = model.routers[r](cur.unsqueeze(0))[0].float()
            cap = model.cfg.capacities[r]
            if cap >= 1.0:
                sel = cand
            elif causal:
                sel = cand & (torch.sigmoid(logit) > 0.5)
            else:
                k = max(1, int(cap * T))
                top = logit.masked_fill(~cand, float("-inf")).topk(k).indices
                sel = torch.zeros(T, dtype=torch.bool).index_fill(0, top, True) & cand
            idx = torch.where(sel)[0]
            counts[r] += idx.numel()
            if idx.numel():
                y = _layers(model, layer_ids, cur[idx].unsqueeze(0), idx.unsqueeze(0))[0]
                cur[idx] = cur[idx] + (alpha * torch.sigmoid(logit[idx])).unsqueeze(-1) * y
            cand = sel
        h[b] = cur
    h = _layers(model, model.coda, h, pos)
    return model.lm_head(model.norm(h)), counts


def test_eq1_equals_the_per_row_reference_in_training_and_causal_evaluation():
    model = paper_model().eval()
    x = torch.randint(1, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    want_causal, counts = reference_logits(model, x, causal=True)
    assert 0 < counts[-1] < counts[0] == 48  # the causal threshold keeps some tokens and drops others
    want_train, _ = reference_logits(model, x, causal=False)
    with torch.no_grad():
        causal = model(x, causal_routing=True).logits
        train = copy.deepcopy(model).train()(x).logits
    torch.testing.assert_close(causal, want_causal, atol=1e-5, rtol=0)
    torch.testing.assert_close(train, want_train, atol=1e-5, rtol=0)
    old = copy.deepcopy(model)
    old.routing.settings.expert_update = "gated_residual"  # megamor's rule: h + g * (step(h) - h)
    with torch.no_grad():
        assert (old(x, causal_routing=True).logits - want_causal).abs().max() > 1e-2  # the rules differ


def test_eq1_backward_reaches_the_routers():
    model = paper_model().train()
    x = torch.randint(1, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(x, targets=x)
    (out.loss + out.aux_loss).backward()
    assert all(r.net.weight.grad.abs().sum() > 0 for r in model.routers)


def test_unweighted_gating_under_eq1_is_h_plus_step():
    """The official `gating: unweighted` with Eq. 1: x + f(x), twice the input plus the update."""
    model = paper_model(gating="unweighted").eval()
    x = torch.randint(1, 200, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = model.routing.update(torch.ones(1, 2, 4), torch.full((1, 2, 4), 3.0), torch.ones(1, 2))
        assert torch.equal(h, torch.full((1, 2, 4), 4.0))
        assert torch.isfinite(model(x, causal_routing=True).logits).all()


@pytest.mark.parametrize("kv", ["recursion_wise", "shared"])
def test_eq1_decoding_and_export_agree(kv, tmp_path):
    model = paper_model(seed=3, kv_mode=kv).eval()

    def next_logits(ids: torch.Tensor) -> torch.Tensor:  # the per-row reference; shared KV: the full forward
        logits = reference_logits(model, ids, causal=True)[0] if kv == "recursion_wise" \
            else model(ids, causal_routing=True).logits
        return logits[0, -1]

    gen = assert_decoding_and_export_agree(model, next_logits, tmp_path)
    assert any(d < 3 for ds in gen.depths for d in ds)  # some tokens exit early: the gated steps are exercised


def test_unknown_rule_or_another_router_is_refused():
    base = {"sharing": "cycle", "num_recursions": 3, "n_layers": 6}
    refused("router.expert_choice_update", **base, **{"router.type": "expert_choice",
                                                       "router.expert_choice_update": "eq1"})
    refused("router.expert_choice_update", **base, **{"router.type": "token_choice",
                                                       "router.expert_choice_update": "paper"})


@pytest.mark.parametrize("scaled", [True, False])
def test_init_scaled_residual(scaled):
    model = mor("expert_choice", n_layers=32, d_model=256, d_ff=512, init_scaled_residual=scaled)
    std = model.cfg.init_std
    want = std / (2 * 32) ** 0.5 if scaled else std
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert abs(p.std().item() - want) < 0.1 * want, name
        elif name.endswith("q_proj.weight"):
            assert abs(p.std().item() - std) < 0.1 * std, name
