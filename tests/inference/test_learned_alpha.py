"""A learned gate scale (router.learn_alpha, an expert-choice option) is used by every
decoding path: the engine's steps and the transformers remote code give megamor's outputs
for a model whose alphas were moved far from their initial value."""

from __future__ import annotations

import random

import pytest
import torch

from megamor.inference import Engine
from tests.model.helpers import mor


def _learned(kv: str):
    # a large init scale: greedy tokens of the random model then depend on every hidden state
    m = mor("expert_choice", kv_mode=kv, router={"type": "expert_choice", "learn_alpha": True}, init_std=0.5)
    with torch.no_grad():
        for i, r in enumerate(m.routers):
            r.scale.alpha.fill_(2.5 + 1.0 * i)  # far from 0.1: greedy tokens change
    return m.eval()


@torch.no_grad()
def test_learned_alpha_changes_the_model():
    m = _learned("recursion_wise")
    x = torch.randint(1, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    a = m(x, causal_routing=True).logits
    for r in m.routers:
        r.scale.alpha.fill_(0.1)
    assert (a - m(x, causal_routing=True).logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("kv,static", [("recursion_wise", False), ("shared", False), ("recursion_wise", True)])
def test_engine_uses_learned_alpha(kv, static):
    model = _learned(kv)
    rng = random.Random(0)
    reqs = [([rng.randrange(1, 200) for _ in range(rng.randrange(2, 10))], 10) for _ in range(4)]
    eng = Engine(model, max_batch=2, max_len=24, static=static)
    handles = [eng.submit(p, n) for p, n in reqs]
    while not eng.idle():
        eng.step()
    for (prompt, n), h in zip(reqs, handles):
        ref = model.generate([prompt], n)
        assert h.tokens == ref.tokens[0] and h.depths == ref.depths[0]


@torch.no_grad()
def test_hf_remote_code_uses_learned_alpha(tmp_path):
    transformers = pytest.importorskip("transformers")
    from megamor.hf.remote_code import save_model_folder

    ours = _learned("recursion_wise")
    save_model_folder(ours, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32).eval()
    x = torch.randint(1, 200, (2, 30), generator=torch.Generator().manual_seed(1))
    assert (hf(x).logits - ours(x, causal_routing=True).logits).abs().max().item() <= 1e-5
