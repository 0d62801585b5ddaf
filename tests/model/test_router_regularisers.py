"""Router regularisers (router.entropy_coef, router.target_depth): their values against the plain
formula on small tensors, their weight in the loss, their effect on tiny training runs, and the
config checks."""

from __future__ import annotations

import math

import pytest
import torch

from megamor.config import ConfigError, load_config
from megamor.model import ModelConfig
from megamor.model.routing import (
    EXPERT,
    TOPK,
    RoutingSettings,
    depth_entropy,
    expected_depth,
    gate_entropy,
    masked_mean,
)
from tests.model.helpers import mor

X = torch.randint(1, 200, (2, 12), generator=torch.Generator().manual_seed(0))


def expert(**router):
    return mor("expert_choice", sharing="cycle", n_layers=6, seed=1, router={"type": "expert_choice", **router})


def token(**router):
    return mor("token_choice", sharing="cycle", seed=1, router={"type": "token_choice", **router})


# -- the values, against the plain formula ---------------------------------------------------
def bernoulli_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else 0.0


@pytest.mark.parametrize("act", ["sigmoid", "none", "tanh"])
def test_gate_entropy_is_the_bernoulli_entropy_of_the_gate_probability(act):
    logits = torch.tensor([-30.0, -2.0, -0.5, 0.0, 0.3, 1.7, 30.0])
    got = gate_entropy(RoutingSettings(type=EXPERT, activation=act), logits)
    for x, h in zip(logits.tolist(), got.tolist()):
        p = (1 + math.tanh(x)) / 2 if act == "tanh" else 1 / (1 + math.exp(-x))
        assert h == pytest.approx(bernoulli_entropy(p), abs=1e-6), (act, x)
    assert got[3].item() == pytest.approx(math.log(2), abs=1e-7)  # the gate at 1/2: most uncertain


def test_depth_entropy_and_expected_depth_follow_the_softmax():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [2.0, -1.0, 0.5]], [[-3.0, 4.0, 1.0], [0.0, 0.0, 9.0]]])
    for row, h, d in zip(logits.reshape(-1, 3).tolist(), depth_entropy(logits).reshape(-1).tolist(),
                         expected_depth(logits).reshape(-1).tolist()):
        z = sum(math.exp(v) for v in row)
        p = [math.exp(v) / z for v in row]
        assert h == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-6)
        assert d == pytest.approx(sum((i + 1) * q for i, q in enumerate(p)), abs=1e-6)
    assert depth_entropy(logits)[0, 0].item() == pytest.approx(math.log(3), abs=1e-6)
    valid = torch.tensor([[True, False], [True, True]])
    want = (expected_depth(logits)[0, 0] + expected_depth(logits)[1].sum()) / 3
    torch.testing.assert_close(masked_mean(expected_depth(logits), valid), want)


def _step0(model):
    """(training routing pass after step 0, the step's hidden states)."""
    h = torch.randn(2, 12, model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    rp = model.routing.start(model, TOPK, training=True)
    rp.step(0, h, torch.ones(2, 12, dtype=torch.bool))
    return rp, h


def test_token_choice_terms_and_weights_against_the_formula():
    model = token(entropy_coef=0.3, target_depth=1.25, target_depth_coef=2.0, temperature=2.0)
    rp, h = _step0(model)
    logits = model.depth_router.net(h / 2.0).float()  # temperature: the router sees h / 2
    p = logits.softmax(-1)
    entropy = -(p * p.log()).sum(-1).mean()
    mean_depth = (p * torch.tensor([1.0, 2.0, 3.0])).sum(-1).mean()
    torch.testing.assert_close(rp.aux["router_entropy"], entropy, atol=1e-6, rtol=0)
    torch.testing.assert_close(rp.aux["router_target_depth"], (mean_depth - 1.25) ** 2, atol=1e-6, rtol=0)
    torch.testing.assert_close(rp.health["router_expected_depth"], mean_depth, atol=1e-6, rtol=0)
    total, logged = rp.losses(h)
    want = 0.1 * logged["router_balance"] - 0.3 * entropy + 2.0 * (mean_depth - 1.25) ** 2
    torch.testing.assert_close(total, want, atol=1e-6, rtol=0)


def test_expert_choice_entropy_is_a_mean_over_steps_of_candidate_means():
    model = expert(entropy_coef=0.2, aux_bce_coef=0.0, z_loss_coef=0.0)
    model.record_router = True
    out = model.train()(X)
    # every step's logits over its candidates, from the trace (routed steps) and step 0 (all tokens)
    trace = {r: (lg, c) for r, lg, c, _ in out.stats["router_trace"]}
    assert sorted(trace) == [1, 2]
    with torch.no_grad():
        m = model.eval()
        assert not m.prelude  # cycle sharing: step 0's router sees the embeddings
        h = m.embed_tokens(X)
        first = m.routers[0](h)

    def h_bern(lg):
        p = torch.sigmoid(lg)
        return -(p * p.log() + (1 - p) * (1 - p).log())

    per_step = [h_bern(first).mean()] + [h_bern(lg)[c].mean() for lg, c in trace.values()]
    torch.testing.assert_close(out.aux_losses["router_entropy"], torch.stack(per_step).mean(), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.aux_loss, -0.2 * out.aux_losses["router_entropy"], atol=1e-7, rtol=0)


def test_off_by_default_adds_no_term():
    for model in (expert(), token()):
        out = model.train()(X)
        assert not {"router_entropy", "router_target_depth", "router_expected_depth"} & set(out.aux_losses)
    cfg = ModelConfig()
    assert cfg.router.entropy_coef == 0.0 and cfg.router.target_depth is None and cfg.router.target_depth_coef == 0.0


def test_regularisers_at_defaults_leave_the_loss_and_gradients_bit_identical():
    """Explicit defaults vs the keys absent: the same loss and gradients, bit for bit (the stored
    routing reference, tests/model/test_routing_reference.py, pins today's numbers too)."""
    for make in (expert, token):
        a, b = make(), make(entropy_coef=0.0, target_depth=None, target_depth_coef=0.0)
        b.load_state_dict(a.state_dict())
        grads = []
        for m in (a, b):
            out = m.train()(X, targets=X)
            (out.loss + out.aux_loss).backward()
            grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
            assert out.aux_loss.requires_grad
        assert all(torch.equal(x, y) for x, y in zip(*grads)) and len(grads[0]) == len(grads[1])


def test_the_regularisers_read_nothing_off_the_device():
    from tests.model.test_sync_free import _count

    assert _count(expert(entropy_coef=0.1).train()) == []
    assert _count(token(entropy_coef=0.1, target_depth=2.0, target_depth_coef=0.1).train()) == []


# -- they move what they should on a tiny run ------------------------------------------------
def _train(model, steps: int, lr: float = 3e-3, seed: int = 0):
    """A plain torch loop on random tokens: (routing entropy, mean expected depth, chosen mean
    depth) of the final model on held-out tokens, measured the same way for every run."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(1, 200, (steps, 4, 16), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for x in data:
        model.set_train_step(1)
        out = model(x, targets=x)
        opt.zero_grad()
        (out.loss + out.aux_loss).backward()
        opt.step()
    return _measure(model)


def _measure(model):
    held = torch.randint(1, 200, (4, 16), generator=torch.Generator().manual_seed(99))
    m = model.eval()
    with torch.no_grad():
        h = m.embed_tokens(held)
        assert not m.prelude  # cycle sharing: the routers see the embeddings at step 0
        router = m.depth_router if m.depth_router is not None else m.routers[0]
        logits = router(h)
        if m.depth_router is not None:
            ent, depth = depth_entropy(logits).mean(), expected_depth(logits).mean()
        else:
            ent, depth = gate_entropy(m.routing.settings, logits).mean(), torch.tensor(float("nan"))
        chosen = m(held).stats.depth.float().mean()
    return ent.item(), depth.item(), chosen.item()


def _sharp(model, k: float = 300.0):
    """Routers that start decided (large logits, as trained ones are): freshly initialised
    logits are ~1e-3, where the entropy sits at its maximum and 30 steps barely move it."""
    for router in (model.routers if model.routers is not None else [model.depth_router]):
        router.net.weight.data *= k
    return model


@pytest.mark.parametrize("make", [expert, token])
def test_entropy_coef_raises_the_routing_entropy(make):
    start = _measure(_sharp(make()))[0]
    off = _train(_sharp(make()), steps=30)[0]
    on = _train(_sharp(make(entropy_coef=1.0)), steps=30)[0]
    # measured: expert 0.61 -> off 0.40, on 0.65; token 0.88 -> off 0.83, on 1.01 (nats)
    assert on > start > off and on > off + 0.1, (start, off, on)


def test_target_depth_pulls_the_mean_depth_towards_it():
    start = _measure(token())
    off = _train(token(), steps=30, lr=1e-2)
    for target in (1.0, 3.0):
        on = _train(token(target_depth=target, target_depth_coef=10.0), steps=30, lr=1e-2)
        # measured (expected, chosen depth): start (2.00, 2.06), off (2.00, 1.78); target 1:
        # (1.51, 1.00); target 3: (2.29, 2.97). Both move to the target: the expected depth the
        # penalty sees, and the chosen (argmax) depth logged as router/mean_depth.
        assert abs(on[1] - target) < abs(start[1] - target) - 0.2, (target, start, on)
        assert abs(on[1] - target) < abs(off[1] - target) - 0.2, (target, off, on)
        assert abs(on[2] - target) < abs(off[2] - target) - 0.5, (target, off, on)


# -- bad input -------------------------------------------------------------------------------
def _refused(key: str, **overrides) -> None:
    base = {"sharing": "cycle", "num_recursions": 3, "n_layers": 6}
    with pytest.raises(ConfigError) as e:
        load_config(ModelConfig, overrides=[f"{k}={v}" for k, v in {**base, **overrides}.items()])
    assert e.value.key == key, str(e.value)


def test_bad_regulariser_settings_are_refused_with_their_key():
    _refused("router.entropy_coef", **{"router.type": "expert_choice", "router.entropy_coef": "nan"})
    _refused("router.entropy_coef", **{"router.type": "none", "router.entropy_coef": 0.1})
    _refused("router.entropy_coef", **{"router.type": "token_choice", "router.rand_router": True,
                                       "router.entropy_coef": 0.1})
    _refused("router.target_depth", **{"router.type": "expert_choice", "router.target_depth": 2,
                                       "router.target_depth_coef": 0.1})
    _refused("router.target_depth_coef", **{"router.type": "token_choice", "router.target_depth": 2})
    _refused("router.target_depth", **{"router.type": "token_choice", "router.target_depth_coef": 0.1})
    _refused("router.target_depth_coef", **{"router.type": "token_choice", "router.target_depth": 2,
                                            "router.target_depth_coef": -1})
    _refused("router.target_depth", **{"router.type": "token_choice", "router.target_depth": 3.5,
                                       "router.target_depth_coef": 0.1})
    _refused("router.target_depth", **{"router.type": "token_choice", "router.target_depth": 0.5,
                                       "router.target_depth_coef": 0.1})
    ok = load_config(ModelConfig, overrides=["sharing=cycle", "num_recursions=3", "n_layers=6",
                                             "router.type=token_choice", "router.entropy_coef=-0.1",
                                             "router.target_depth=3", "router.target_depth_coef=0.5"])
    assert ok.router.target_depth == 3.0 and ok.router.entropy_coef == -0.1
