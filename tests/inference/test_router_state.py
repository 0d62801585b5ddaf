"""Router state beyond the router's weights is used by every decoding path: a learned gate
scale (router.learn_alpha), a learned causal threshold (router.learn_threshold) and the
straight-through gate (router.gate_straight_through). For a
model whose alphas or thresholds were moved far from their initial values, the engine (dynamic
and static caches) and the transformers remote code give megamor's outputs."""

from __future__ import annotations

import random

import pytest
import torch

from megamor.inference import Engine, generate
from tests.model.helpers import mor


def _learned_alpha(kv: str):
    # a large init scale: greedy tokens of the random model then depend on every hidden state
    m = mor("expert_choice", kv_mode=kv, router={"type": "expert_choice", "learn_alpha": True}, init_std=0.5)
    with torch.no_grad():
        for i, r in enumerate(m.routers):
            r.scale.alpha.fill_(2.5 + 1.0 * i)  # far from 0.1: greedy tokens change
    return m.eval()


def _thresholds(kv: str):
    m = mor("expert_choice", kv_mode=kv, init_std=0.5).eval()
    x = torch.randint(1, 200, (4, 24), generator=torch.Generator().manual_seed(5))
    seen = []
    hooks = [r.register_forward_hook(lambda mod, i, o: seen.append(o.detach())) for r in m.routers]
    with torch.no_grad():
        m(x, causal_routing=True)
        for h in hooks:
            h.remove()
        for r, (router, logits) in enumerate(zip(m.routers, seen)):  # well off 0: quantiles 0, 0.3, 0.6
            router.threshold.fill_(torch.quantile(logits.flatten(), 0.3 * r).item())
    return m


def _straight_through(kv: str):
    return mor("expert_choice", kv_mode=kv, router={"type": "expert_choice", "gate_straight_through": True},
               init_std=0.5).eval()


MODELS = {"learned_alpha": _learned_alpha, "thresholds": _thresholds, "straight_through": _straight_through}


def _soft_gate(model) -> None:
    model.routing.settings.straight_through = False  # the routing policy every path uses


def _alpha_01(model) -> None:
    for router in model.routers:
        router.scale.alpha.fill_(0.1)


@pytest.mark.parametrize("which,undo", [("straight_through", _soft_gate), ("learned_alpha", _alpha_01)])
@torch.no_grad()
def test_router_state_changes_the_model(which, undo):
    m = MODELS[which]("recursion_wise")
    x = torch.randint(1, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    a = m(x, causal_routing=True).logits
    undo(m)
    assert (a - m(x, causal_routing=True).logits).abs().max().item() > 1e-3


@torch.no_grad()
def test_thresholds_change_the_routing():
    m = _thresholds("recursion_wise")
    x = torch.randint(1, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    a = m(x, causal_routing=True)
    for r in m.routers:
        r.threshold.zero_()
    b = m(x, causal_routing=True)
    assert not torch.equal(a.stats.depth, b.stats.depth)
    assert (a.logits - b.logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("which", sorted(MODELS))
@pytest.mark.parametrize("kv,static", [("recursion_wise", False), ("shared", False), ("recursion_wise", True)])
def test_engine_uses_router_state(which, kv, static):
    model = MODELS[which](kv)
    rng = random.Random(0)
    reqs = [([rng.randrange(1, 200) for _ in range(rng.randrange(2, 10))], 10) for _ in range(4)]
    eng = Engine(model, max_batch=2, max_len=24, static=static)
    handles = [eng.submit(p, n) for p, n in reqs]
    while not eng.idle():
        eng.step()
    for (prompt, n), h in zip(reqs, handles):
        ref = generate(model, [prompt], n)
        assert h.tokens == ref.tokens[0] and h.depths == ref.depths[0]


@pytest.mark.parametrize("which", sorted(MODELS))
@torch.no_grad()
def test_hf_remote_code_uses_router_state(which, tmp_path):
    transformers = pytest.importorskip("transformers")
    from megamor.hf.remote_code import save_model_folder

    ours = MODELS[which]("recursion_wise")
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

    ours = _thresholds("recursion_wise")
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
