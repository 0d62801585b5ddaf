"""The official code's router knobs, each against the official computation written out on a
small tensor example (model/mor_model/expert_choice_router.py, token_choice_router.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from megamor.model.routing import CAUSAL, TOPK, trace_agreement, warm_capacity
from tests.model.helpers import mor, refused

X = torch.randint(1, 200, (2, 12), generator=torch.Generator().manual_seed(0))


def expert(**router):
    """Expert choice with the official soft gate (megamor's default is straight-through)."""
    return mor("expert_choice", sharing="cycle", n_layers=6, seed=1,
               router={"type": "expert_choice", "gate_straight_through": False, **router})


def token(**router):
    return mor("token_choice", sharing="cycle", seed=1, router={"type": "token_choice", **router})


def first_step(model, mode=TOPK, training=False):
    """(routing pass, step 0's decision, the hidden states it saw)."""
    h = torch.randn(2, 12, model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    rp = model.routing.start(model, mode, training=training)
    return rp, rp.step(0, h, torch.ones(2, 12, dtype=torch.bool)), h


# -- capacity warmup ---------------------------------------------------------------------
def official_capacity(target: float, training_step: int, warmup: int) -> float:
    step_ratio = min(1.0, training_step / warmup)
    decay = 0.5 * (1.0 + math.cos(math.pi * step_ratio))
    return target + (1.0 - target) * decay


def test_capacity_warmup_follows_the_official_cosine_and_only_in_training():
    for step in (0, 1, 3, 5, 9, 10, 25):
        assert warm_capacity(1 / 3, step, 10) == pytest.approx(official_capacity(1 / 3, step, 10), abs=0)
    assert warm_capacity(0.5, 4, 0) == 0.5
    model = expert(cap_warmup_step=10)  # capacities 1, 2/3, 1/3 over T = 12
    for step in (1, 5, 10, 40):
        model.set_train_step(step)
        routed = model.train()(X).stats.tokens_per_step
        want = [2 * max(1, int(official_capacity(c, step, 10) * 12)) for c in model.cfg.capacities]
        assert routed == want, step
    plain = copy.deepcopy(model)
    plain.routing.settings.cap_warmup_steps = 0
    model.set_train_step(1)
    with torch.no_grad():  # evaluation never warms
        assert model.eval()(X).stats.tokens_per_step == plain.eval()(X).stats.tokens_per_step


# -- token choice's balancing warmup -----------------------------------------------------
def test_balancing_warmup_sends_every_token_to_full_depth_first():
    model = token(bal_warmup_step=3, balancing="loss_free")
    model.depth_router.bias.fill_(0.5)
    for step, warm in ((1, True), (2, True), (3, False)):
        model.set_train_step(step)
        depth = model.train()(X).stats.depth
        assert bool((depth == 3).all()) == warm, step
    model.set_train_step(1)
    model.train()(X)
    assert model.depth_router.bias.abs().sum() == 0  # the official code zeroes the loss-free bias while warming
    assert not bool((model.eval()(X).stats.depth == 3).all())  # evaluation routes by the router


# -- temperature -------------------------------------------------------------------------
@pytest.mark.parametrize("make", [expert, token])
def test_temperature_divides_the_router_input(make):
    hot = make(temperature=2.0)
    scaled = copy.deepcopy(hot)
    scaled.routing.settings.temperature = 1.0
    for router in (scaled.routers or [scaled.depth_router]):
        router.net.weight.data /= 2.0  # a linear router: W (h / 2) = (W / 2) h
    with torch.no_grad():
        torch.testing.assert_close(hot.eval()(X).logits, scaled.eval()(X).logits, atol=1e-6, rtol=0)
    _, step, h = first_step(hot)
    router = hot.routers[0] if hot.routers is not None else hot.depth_router
    raw = router.net(h / 2.0).float()  # official: self.mor_router(x / self.cfg.mor.temp)
    want = 0.1 * torch.sigmoid(raw.squeeze(-1)) if hot.routers is not None else raw.softmax(-1).max(-1).values
    torch.testing.assert_close(step.gate, want, atol=1e-7, rtol=0)


# -- router functions ----------------------------------------------------------------------
@pytest.mark.parametrize("func", ["sigmoid", "tanh", "none"])
def test_expert_router_function_gate(func):
    model = expert(activation=func)
    _, step, h = first_step(model)
    raw = model.routers[0].net(h).squeeze(-1).float()
    want = {"sigmoid": 0.1 * torch.sigmoid(raw), "tanh": 0.1 * torch.tanh(raw), "none": raw}[func]
    torch.testing.assert_close(step.gate, want, atol=0, rtol=0)


@pytest.mark.parametrize("func", ["softmax", "sigmoid"])
def test_token_router_function_choice_and_weight(func):
    model = token(token_func=func)
    rp, step, h = first_step(model)
    raw = model.depth_router.net(h).float()
    probs = F.sigmoid(raw) * 0.1 if func == "sigmoid" else F.softmax(raw, dim=-1) * 1.0  # the official defaults
    _, top = torch.topk(probs, 1, dim=-1)
    torch.testing.assert_close(step.gate, probs.gather(-1, top).squeeze(-1), atol=1e-7, rtol=0)
    assert torch.equal(rp._choice, top.squeeze(-1))
    rp, _, _ = first_step(model, training=True)
    # official: P_i = sum(router_probs) / (bs * seq_len), f_i = N_r * bincount / (bs * seq_len), sum(P_i * f_i)
    p_i = probs.sum(dim=(0, 1)) / 24
    f_i = 3 * torch.bincount(top.view(-1), minlength=3) / 24
    torch.testing.assert_close(rp.aux["router_balance"], (p_i * f_i).sum(), atol=1e-6, rtol=0)
    torch.testing.assert_close(rp.aux["router_z"], torch.logsumexp(raw, -1).square().mean(), atol=1e-5, rtol=1e-6)


# -- gating ------------------------------------------------------------------------------
def test_unweighted_gating_adds_the_block_output_unscaled():
    model = token(gating="unweighted", token_choice_update="paper")
    _, step, _ = first_step(model)
    assert torch.equal(step.gate, torch.ones(2, 12))  # official: finished_x, not finished_x * w
    _, step, _ = first_step(expert(gating="unweighted"))
    assert torch.equal(step.gate, torch.ones(2, 12))


# -- BCE reduction ---------------------------------------------------------------------------
def test_bce_sum_over_steps_is_the_official_sum():
    mean, total = expert(aux_bce_coef=0.001, bce_label_smoothing=0.0), expert(
        aux_bce_coef=0.001, bce_label_smoothing=0.0, bce_reduction="sum")
    total.load_state_dict(mean.state_dict())
    a, b = mean.train()(X), total.train()(X)
    per_step = [a.aux_losses[f"router_health/r{r}/bce"] for r in (1, 2, 3)]  # each a mean over its candidates
    torch.testing.assert_close(b.aux_losses["router_bce"], sum(per_step), atol=1e-6, rtol=0)
    torch.testing.assert_close(a.aux_losses["router_bce"], sum(per_step) / 3, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.aux_loss, 0.001 * sum(per_step), atol=1e-8, rtol=0)


# -- auxiliary router ------------------------------------------------------------------------
def test_aux_router_learns_the_selection_on_detached_inputs_and_routes_causally():
    model = expert(aux_router=True, learn_threshold=False)
    model.record_router = True
    out = model.train()(X)
    assert "router_bce" not in out.aux_losses and "router_aux_bce" in out.aux_losses
    trace = out.stats["router_trace"]
    # official: BCEWithLogits(sum)(aux(x.detach()), top-k targets) / (bs * candidates), summed
    # over the MoR layers; the trace holds the auxiliary router's logits of the routed steps
    got = sum(F.binary_cross_entropy_with_logits(lg[c], s[c].float(), reduction="sum") / c.sum()
              for _, lg, c, s in trace)
    torch.testing.assert_close(out.aux_losses["router_aux_bce"], got + _capacity_one_bce(model, X), atol=1e-5, rtol=0)
    model.zero_grad()
    out.aux_loss.backward()
    assert model.routers[1].aux.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.layers.parameters())  # detached input
    assert all(p.grad is None or p.grad.abs().sum() == 0 for rt in model.routers for p in rt.net.parameters())
    counts = trace_agreement(model.routers, trace)  # precision/recall of the causal rule, as logged
    for r, lg, c, s in trace:
        both, causal, top = counts[r].tolist()
        assert causal == float((c & (lg > 0)).sum()) and top == float(s.sum())
        assert both == float((c & (lg > 0) & s).sum())
    # causal routing keeps what the auxiliary router predicts (sigmoid > 0.5), not the main router
    rp, _, h = first_step(model, CAUSAL)
    cand = torch.ones(2, 12, dtype=torch.bool)
    step = rp.step(1, h, cand)
    assert torch.equal(step.selected, model.routers[1].aux(h).squeeze(-1) > 0)


def _capacity_one_bce(model, x):
    """The auxiliary router's BCE at the capacity-1 first step (all-ones target, every token),
    which the trace (routed steps only) does not hold."""
    with torch.no_grad():
        m = copy.deepcopy(model).eval()
        h = m.embed_tokens(x)
        cos, sin = m.rope(torch.arange(x.shape[1]).unsqueeze(0))
        from megamor.model.layers import TokenMeta
        for phys in m.prelude:
            h, _ = m.layers[phys](h, TokenMeta(torch.arange(x.shape[1]).unsqueeze(0), causal_exact=True), (cos, sin))
        lg = m.routers[0].aux(h).squeeze(-1).float()
        return F.binary_cross_entropy_with_logits(lg, torch.ones_like(lg))


# -- bad input -------------------------------------------------------------------------------

def test_bad_knobs_are_refused_with_their_key():
    base = {"sharing": "cycle", "num_recursions": 3, "n_layers": 6}
    refused("router.activation", **base, **{"router.type": "expert_choice", "router.activation": "relu"})
    refused("router.token_func", **base, **{"router.type": "token_choice", "router.token_func": "tanh"})
    refused("router.gating", **base, **{"router.type": "expert_choice", "router.gating": "additive"})
    refused("router.bce_reduction", **base, **{"router.type": "expert_choice", "router.bce_reduction": "max"})
    refused("router.temperature", **base, **{"router.type": "expert_choice", "router.temperature": 0})
    refused("router.aux_router", **base, **{"router.type": "token_choice", "router.aux_router": True})


@pytest.mark.parametrize("override, key", [
    ("model.router.cap_warmup_step=11", "model.router.cap_warmup_step"),
    ("model.router.token_choice_update=eq2", "model.router.token_choice_update"),
    ("model.router.aux_router=true", "model.router.aux_router"),
    ("model.router.bal_warmup_step=11", "model.router.bal_warmup_step"),
    ("model.router.token_func=tanh", "model.router.token_func"),
])
def test_train_cli_refuses_bad_router_input_with_one_line_exit_2(override, key, tmp_path, capsys, monkeypatch):
    """The trainer's entry point: one line naming the key, exit 2, nothing started."""
    from megamor.train.__main__ import main
    from megamor.train.signals import EXIT_CONFIG

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    rc = main(["model_config=configs/model/33m/mor_token_3.yaml", "trainer.max_steps=10", "data.train=[x]",
               f"run_dir={tmp_path / 'run'}", override])
    err = capsys.readouterr().err
    assert rc == EXIT_CONFIG == 2 and f"config key '{key}'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


# -- random router ---------------------------------------------------------------------------
def test_random_router_is_top_k_of_seeded_uniform_scores():
    from megamor.model.routing import position_uniform

    model = expert(rand_router=True)
    model.set_train_step(7)
    pos = torch.arange(12).expand(2, 12)
    rp = model.routing.start(model, TOPK, training=True, positions=pos)
    h = torch.randn(2, 12, model.cfg.d_model)
    cand = torch.ones(2, 12, dtype=torch.bool)
    rp.step(0, h, cand)
    step = rp.step(1, h, cand)
    u = position_uniform(pos + torch.arange(2).view(2, 1) * 1_000_003, 1, 7)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0 and not torch.equal(u[0], u[1])
    _, top = torch.topk(u * 0.1, 8, dim=1, sorted=False)  # official: topk(rand * alpha), k = int(2/3 * 12)
    assert torch.equal(step.selected, torch.zeros(2, 12, dtype=torch.bool).scatter(1, top, True))
    torch.testing.assert_close(step.gate, 0.1 * u, atol=0, rtol=0)
    assert rp.aux == {}  # no router loss
    again = model.routing.start(model, TOPK, training=True, positions=pos)
    again.step(0, h, cand)
    assert torch.equal(again.step(1, h, cand).selected, step.selected)  # deterministic
    model.set_train_step(8)
    other = model.routing.start(model, TOPK, training=True, positions=pos)
    other.step(0, h, cand)
    assert not torch.equal(other.step(1, h, cand).selected, step.selected)  # fresh every step


# -- every path follows the knobs -------------------------------------------------------------
KNOBS = {
    "expert_tanh_temp": lambda: expert(activation="tanh", temperature=0.5),
    "expert_none_unweighted": lambda: expert(activation="none", gating="unweighted"),
    "expert_aux_router": lambda: expert(aux_router=True),
    "expert_random": lambda: expert(rand_router=True),
    "token_sigmoid_paper": lambda: token(token_func="sigmoid", token_choice_update="paper"),
    "token_random": lambda: token(rand_router=True),
    "expert_unshared": lambda: mor("expert_choice", sharing="none", n_layers=6, seed=1),
    "token_unshared": lambda: mor("token_choice", sharing="none", n_layers=6, seed=1),
}


@pytest.mark.parametrize("name", sorted(KNOBS))
def test_decoding_and_export_follow_the_knobs(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    from megamor.hf.remote_code import save_model_folder
    from megamor.inference import engine_generate, generate

    model = KNOBS[name]().eval()
    for p in model.parameters():  # a large init: routing decides differently per token
        if p.dim() == 2:
            p.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(9))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5], [40, 41, 42, 43]]
    gen = generate(model, prompts, 5)
    for p, toks in zip(prompts, gen.tokens):  # cached decoding = greedy over the causal forward
        seq = list(p)
        for _ in range(5):
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq]), causal_routing=True).logits[0, -1].argmax()))
        assert toks == seq[len(p):]
    dyn = engine_generate(model, prompts, 5, max_batch=2)
    static = engine_generate(model, prompts, 5, max_batch=2, static=True)
    assert dyn.tokens == gen.tokens and static.tokens == gen.tokens and static.depths == dyn.depths
    save_model_folder(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(X).logits, model(X, causal_routing=True).logits, atol=1e-5, rtol=0)


# -- routing over unshared layers (the mixture-of-depths ablation) -----------------------------
def test_routing_over_distinct_layers():
    model = mor("expert_choice", sharing="none", n_layers=6, seed=1)
    assert model.prelude == [] and model.coda == [] and model.steps == [[0, 1], [2, 3], [4, 5]]
    assert len(model.layers) == 6 and model.num_params(unique=True) == model.num_params(unique=False)
    out = model.train()(X)
    assert out.stats.tokens_per_step == [24, 16, 8]  # capacities 1, 2/3, 1/3 of 12 tokens, 2 rows
    (out.logits.sum() + out.aux_loss).backward()
    assert all(model.layers[i].mlp.down_proj.weight.grad is not None for i in range(6))


def test_unshared_routing_shapes_are_checked():
    refused("n_layers", sharing="none", num_recursions=4, n_layers=6, **{"router.type": "expert_choice"})
    refused("num_recursions", sharing="none", num_recursions=3, n_layers=6)  # no router: plain vanilla only


def test_paper_configs_sum_the_bce_at_the_papers_coefficient():
    from megamor.env import repo_root
    from megamor.model import load_model_config

    paths = sorted((repo_root() / "configs" / "model").glob("*/mor_expert_*_paper.yaml"))
    assert len(paths) == 15
    for p in paths:
        r = load_model_config(p).router
        assert (r.bce_reduction, r.aux_bce_coef, r.bce_full_capacity_steps) == ("sum", 0.001, True), p
    token = sorted((repo_root() / "configs" / "model").glob("*/mor_token_*.yaml"))
    assert len(token) >= 15
    for p in token:  # Eq. 2 everywhere: mor_token_N since the study evals/results/study_token_rule_cpu
        assert load_model_config(p).router.token_choice_update == "paper", p
