"""Token choice's `token_update: paper` (Eq. 2 as the official code runs it) equals a plain
reference that walks each row and each token, in training, causal evaluation, both decoding
steps and the exported transformers model."""

from __future__ import annotations

import copy

import pytest
import torch

from megamor.config import ConfigError, load_config
from megamor.model import ModelConfig
from megamor.model.layers import TokenMeta
from tests.model.helpers import mor


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
    transformers = pytest.importorskip("transformers")
    from megamor.hf.remote_code import save_model_folder
    from megamor.inference import engine_generate, generate

    model = paper_model(seed=3)
    model.cfg.kv_mode = kv
    model = type(model)(model.cfg) if kv == "shared" else model
    model.eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5], [40, 41, 42, 43]]
    gen = generate(model, prompts, 6)
    for p, toks in zip(prompts, gen.tokens):  # decoding with caches = greedy over the plain reference
        seq = list(p)
        for _ in range(6):
            seq.append(int(reference_logits(model, torch.tensor([seq]))[0][0, -1].argmax()) if kv == "recursion_wise"
                       else int(model(torch.tensor([seq]), causal_routing=True).logits[0, -1].argmax()))
        assert toks == seq[len(p):]
    assert engine_generate(model, prompts, 6, max_batch=2).tokens == gen.tokens
    static = engine_generate(model, prompts, 6, max_batch=2, static=True)
    assert static.tokens == gen.tokens and static.depths == gen.depths
    save_model_folder(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                           dtype=torch.float32).eval()
    x = torch.randint(1, 200, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x, causal_routing=True).logits, atol=1e-5, rtol=0)
    for p, toks in zip(prompts, gen.tokens):
        got = hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False,
                          attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert got[0, len(p):].tolist() == toks


def _refused(key: str, **overrides) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(ModelConfig, overrides=[f"{k}={v}" for k, v in overrides.items()])
    assert e.value.key == key, str(e.value)


def test_unknown_update_rule_or_expert_choice_is_refused():
    base = {"sharing": "cycle", "num_recursions": 3, "n_layers": 6}
    _refused("router.token_choice_update", **base, **{"router.type": "token_choice", "router.token_choice_update": "eq2"})
    _refused("router.token_choice_update", **base, **{"router.type": "expert_choice", "router.token_choice_update": "paper"})


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
