"""Token choice's `token_update: paper` (Eq. 2 as the official code runs it) equals a plain
reference that walks each row and each token, in training, causal evaluation, both decoding
steps and the exported transformers model."""

from __future__ import annotations

import copy

import pytest
import torch

from megamor.model.layers import TokenMeta
from tests.model.helpers import assert_decoding_and_export_agree, mor, refused


def paper_model(seed: int = 2, **router):
    return mor("token_choice", sharing="cycle", seed=seed, init_std=0.3,
               router={"type": "token_choice", "token_choice_update": "paper", **router})


def _layers(model, ids, h, pos):
    cos, sin = model.rope(pos)
    for phys in ids:
        h, _ = model.layers[phys](h, TokenMeta(pos, causal_exact=True), (cos, sin))
    return h


@torch.no_grad()
def reference_logits(model, x: torch.Tensor) -> torch.Tensor:
    """The official token-choice layer, one row and one token at a time: each token picks its
    depth from H^1 (the first recursion's input); step i runs on the row's tokens with depth >=
    i (attending to each other, at their positions); a token whose depth is i leaves with H^1 +
    w * (step output), one with a greater depth continues with the step output, ungated."""
    B, T = x.shape
    pos = torch.arange(T).unsqueeze(0)
    h1 = _layers(model, model.prelude, model.embed_tokens(x), pos)
    probs = model.depth_router(h1).softmax(-1)
    choice = (probs + model.depth_router.bias).argmax(-1)
    w = model.cfg.router.gate_scale * probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    out = h1.clone()
    for b in range(B):
        cur = h1[b].clone()
        for i, layer_ids in enumerate(model.steps):
            idx = torch.where(choice[b] >= i)[0]
            if idx.numel() == 0:
                continue
            y = _layers(model, layer_ids, cur[idx].unsqueeze(0), idx.unsqueeze(0))[0]
            nxt = cur.clone()
            for j, t in enumerate(idx.tolist()):
                if choice[b, t] == i:
                    out[b, t] = h1[b, t] + w[b, t] * y[j]
                else:
                    nxt[t] = y[j]
            cur = nxt
    h = _layers(model, model.coda, out, pos)
    return model.lm_head(model.norm(h)), choice


def test_paper_rule_equals_the_per_token_reference_in_training_and_causal_evaluation():
    model = paper_model()
    x = torch.randint(1, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    want, choice = reference_logits(model.eval(), x)
    assert set(choice.flatten().tolist()) == {0, 1, 2}  # every depth taken: the rule is exercised
    with torch.no_grad():
        causal = model(x, causal_routing=True).logits
        train = copy.deepcopy(model).train()(x).logits
    torch.testing.assert_close(causal, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(train, want, atol=1e-5, rtol=0)
    old = copy.deepcopy(model)
    old.routing.settings.token_update = "gated_residual"
    with torch.no_grad():
        assert (old(x, causal_routing=True).logits - want).abs().max() > 1e-2  # the rules differ


def test_paper_rule_backward_reaches_the_router():
    model = paper_model().train()
    x = torch.randint(1, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(x, targets=x)
    (out.loss + out.aux_loss).backward()
    assert model.depth_router.net.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kv", ["recursion_wise", "shared"])
def test_paper_rule_decoding_and_export_agree(kv, tmp_path):
    model = paper_model(seed=3)
    model.cfg.kv_mode = kv
    model = (type(model)(model.cfg) if kv == "shared" else model).eval()

    def next_logits(ids: torch.Tensor) -> torch.Tensor:  # the plain reference; shared KV: the full forward
        logits = reference_logits(model, ids)[0] if kv == "recursion_wise" else model(ids, causal_routing=True).logits
        return logits[0, -1]

    assert_decoding_and_export_agree(model, next_logits, tmp_path)


def test_unknown_update_rule_or_expert_choice_is_refused():
    base = {"sharing": "cycle", "num_recursions": 3, "n_layers": 6}
    refused("router.token_choice_update", **base, **{"router.type": "token_choice", "router.token_choice_update": "eq2"})
    refused("router.token_choice_update", **base, **{"router.type": "expert_choice", "router.token_choice_update": "paper"})


def test_paper_rule_with_padding_equals_each_row_alone():
    model = paper_model(seed=5).eval()
    rows = [[7, 8, 9, 10, 11, 12, 13, 14], [30, 31, 32, 33, 34]]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])  # left padding
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        both = model(ids, attention_mask=mask, causal_routing=True).logits
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r]), causal_routing=True).logits[0]
            torch.testing.assert_close(both[i, T - len(r):], alone, atol=1e-5, rtol=0)
            torch.testing.assert_close(alone, reference_logits(model, torch.tensor([r]))[0][0], atol=1e-5, rtol=0)
