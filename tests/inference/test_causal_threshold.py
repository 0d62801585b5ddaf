"""A learned causal threshold (router.learn_threshold) is used by every decoding path: the
engine (dynamic and static caches), `generate()` and the transformers remote code route a
model whose thresholds were moved off 0 exactly as megamor's full forward does."""

from __future__ import annotations

import random

import pytest
import torch

from megamor.inference import Engine
from tests.model.helpers import mor


def _with_thresholds(kv: str):
    m = mor("expert_choice", kv_mode=kv, init_std=0.5).eval()
    x = torch.randint(1, 200, (4, 24), generator=torch.Generator().manual_seed(5))
    seen = []
    hooks = [r.register_forward_hook(lambda mod, i, o: seen.append(o.detach())) for r in m.routers]
    with torch.no_grad():
        m(x, causal_routing=True)
    for h in hooks:
        h.remove()
    with torch.no_grad():  # well off 0: the 30% / 60% quantiles of what each router saw
        for r, (router, logits) in enumerate(zip(m.routers, seen)):
            router.threshold.fill_(torch.quantile(logits.flatten(), 0.3 * r).item())
    return m


@torch.no_grad()
def test_thresholds_change_the_routing():
    m = _with_thresholds("recursion_wise")
    x = torch.randint(1, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    a = m(x, causal_routing=True)
    for r in m.routers:
        r.threshold.zero_()
    b = m(x, causal_routing=True)
    assert not torch.equal(a.stats.depth, b.stats.depth)
    assert (a.logits - b.logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("kv,static", [("recursion_wise", False), ("shared", False), ("recursion_wise", True)])
def test_engine_uses_the_thresholds(kv, static):
    model = _with_thresholds(kv)
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
def test_hf_remote_code_uses_the_thresholds(tmp_path):
    transformers = pytest.importorskip("transformers")
    from megamor.hf.remote_code import save_model_folder

    ours = _with_thresholds("recursion_wise")
    save_model_folder(ours, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32).eval()
    assert [float(r.threshold) for r in hf.routers] == [float(r.threshold) for r in ours.routers]
    x = torch.randint(1, 200, (2, 30), generator=torch.Generator().manual_seed(1))
    assert (hf(x).logits - ours(x, causal_routing=True).logits).abs().max().item() <= 1e-5


@torch.no_grad()
def test_hf_export_from_before_the_learned_threshold_loads_the_fixed_cut(tmp_path):
    """An export folder written before routers had a threshold: transformers fills the missing
    buffer with logit(causal_threshold), and the model routes as megamor's fixed rule."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    from megamor.hf.remote_code import save_model_folder

    ours = _with_thresholds("recursion_wise")
    folder = save_model_folder(ours, tmp_path / "hf")
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.endswith(".threshold")}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    for r in ours.routers:
        r.threshold.zero_()
    x = torch.randint(1, 200, (2, 30), generator=torch.Generator().manual_seed(1))
    assert [float(r.threshold) for r in hf.routers] == [0.0, 0.0, 0.0]
    assert (hf(x).logits - ours(x, causal_routing=True).logits).abs().max().item() <= 1e-5
