"""Expert-choice and token-choice routing: compute on gathered tokens equals dense references."""

import pytest
import torch

from .helpers import mor
from .reference import dense_expert_choice_logits


@pytest.mark.parametrize("sharing,nr", [("middle_cycle", 3), ("cycle", 2), ("middle_sequence", 2)])
def test_gather_compute_scatter_equals_dense_reference(sharing, nr):
    m = mor("expert_choice", sharing=sharing, nr=nr)
    m.train()
    x = torch.randint(0, m.cfg.vocab_size, (3, 30))
    with torch.no_grad():
        out = m(x)
        ref = dense_expert_choice_logits(m, x, m.cfg.capacities)
    assert (out.logits - ref).abs().max().item() <= 1e-5
    # Top-k per sequence: step r ran exactly k_r tokens of each of the 3 sequences.
    ks = [30 if c >= 1 else max(1, int(c * 30)) for c in m.cfg.capacities]
    assert out.stats.tokens_per_step == [3 * k for k in ks]
    assert ks[-1] < 30  # routing really dropped tokens


def test_capacity_one_equals_recursive_model_with_gating():
    m = mor("expert_choice", nr=3, router={"type": "expert_choice", "capacity": [1.0, 1.0, 1.0],
                                           "gate_straight_through": False})  # the soft gate
    x = torch.randint(0, m.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        got = m(x).logits
        # The recursive model (same layers, no router), with each step's update gated by hand.
        h = m.embed_tokens(x)
        pos = torch.arange(20).expand(2, 20)
        rope = m.rope(pos)
        from megamor.model.layers import TokenMeta

        meta = TokenMeta(pos, causal_exact=True)
        prelude, steps, coda = m.cfg.layer_plan()
        for i in prelude:
            h, _ = m.layers[i](h, meta, rope)
        for r, ids in enumerate(steps):
            g = 0.1 * torch.sigmoid(m.routers[r](h)).unsqueeze(-1)
            y = h
            for i in ids:
                y, _ = m.layers[i](y, meta, rope)
            h = h + g * (y - h)
        for i in coda:
            h, _ = m.layers[i](h, meta, rope)
        ref = m.lm_head(m.norm(h))
    assert (got - ref).abs().max().item() <= 1e-5


def test_straight_through_gate_is_alpha_forward_and_sigmoid_backward():
    from megamor.model.routing import EXPERT, RoutingSettings, standard_gate

    logits = torch.tensor([-3.0, -0.2, 0.0, 1.5, 4.0], requires_grad=True)
    g = standard_gate(RoutingSettings(type=EXPERT, gate_scale=0.1, straight_through=True), EXPERT, logits, 0.1)
    assert torch.allclose(g, torch.full_like(g, 0.1), atol=1e-7, rtol=0)
    g.sum().backward()
    s = torch.sigmoid(logits.detach())
    assert torch.allclose(logits.grad, 0.1 * s * (1 - s), atol=1e-7, rtol=0)


def test_straight_through_model_gates_every_selected_token_by_alpha():
    """Capacity one: the model equals the recursive stack with the constant gate 0.1, and the
    routers still get the LM loss's gradient."""
    m = mor("expert_choice", nr=2, router={"type": "expert_choice", "capacity": [1.0, 1.0],
                                           "gate_straight_through": True})
    x = torch.randint(0, m.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        got = m(x).logits
    # The soft-gated model with the same weights and its router logits forced to +60 by hand
    # (sigmoid = 1 in fp32: the gate is alpha = 0.1).
    soft = mor("expert_choice", nr=2, router={"type": "expert_choice", "capacity": [1.0, 1.0],
                                              "gate_straight_through": False})
    soft.load_state_dict(m.state_dict())
    for r in soft.routers:
        r.forward = lambda h: torch.full(h.shape[:-1], 60.0)
    with torch.no_grad():
        assert (soft(x).logits - got).abs().max().item() <= 1e-5
    out = m(x, targets=x)
    out.loss.backward()
    for r in m.routers:
        assert r.net.weight.grad is not None and r.net.weight.grad.abs().sum() > 0


def test_hierarchical_filtering_and_depth_stats():
    m = mor("expert_choice", nr=3)
    x = torch.randint(0, m.cfg.vocab_size, (2, 30))
    out = m(x)
    d = out.stats.depth
    # depth counts steps run: each token ran step 0, then a prefix of the later steps.
    assert d.min() >= 1 and d.max() == 3
    assert sorted(out.stats.tokens_per_step, reverse=True) == out.stats.tokens_per_step
    assert abs(out.stats.mean_depth - d.float().mean().item()) < 1e-6
    losses = {k for k in out.aux_losses if not k.startswith("router_health/")}
    assert losses == {"router_bce", "router_z"}


def test_router_receives_gradient_through_gate():
    m = mor("expert_choice", nr=2)
    x = torch.randint(0, m.cfg.vocab_size, (2, 16))
    out = m(x, targets=x)
    out.loss.backward()  # LM loss only: no aux term
    for r in m.routers:
        assert r.net.weight.grad is not None and r.net.weight.grad.abs().sum() > 0


def test_aux_losses_weighted_by_config():
    m = mor("expert_choice", nr=2, router={"type": "expert_choice", "aux_bce_coef": 0.5, "z_loss_coef": 0.25})
    out = m(torch.randint(0, 211, (2, 16)))
    expected = 0.5 * out.aux_losses["router_bce"] + 0.25 * out.aux_losses["router_z"]
    assert torch.allclose(out.aux_loss.detach(), expected)


def test_token_choice_runs_only_active_tokens_and_balances():
    m = mor("token_choice", sharing="cycle", nr=3, router={"type": "token_choice", "balancing": "loss"})
    x = torch.randint(0, m.cfg.vocab_size, (2, 40))
    out = m(x)
    n = out.stats.tokens_per_step
    assert n[0] == 80 and n[0] >= n[1] >= n[2]
    assert "router_balance" in out.aux_losses and out.aux_loss.item() > 0
    # Dense check: zeroing the hidden update of inactive tokens is what gathering does.
    assert (out.stats.depth >= 1).all()


def test_token_choice_loss_free_bias_update():
    m = mor("token_choice", sharing="cycle", nr=3, router={"type": "token_choice", "balancing": "loss_free", "bias_update_rate": 0.01})
    m.train()
    m(torch.randint(0, 211, (2, 40)))
    load = m.loss_free_load()
    assert load is not None and load.sum().item() == 80
    before = m.depth_router.bias.clone()
    m.update_loss_free_bias(load)
    delta = m.depth_router.bias - before
    expected = 0.01 * torch.sign(load.mean() - load)
    assert torch.allclose(delta, expected)
    assert m.depth_router.load.sum() == 0  # reset after the update
    # Balancing by bias adds no loss term.
    out = m(torch.randint(0, 211, (1, 8)))
    assert out.aux_losses["router_balance"].item() > 0 and out.aux_loss.item() == 0  # logged, not trained


def test_loss_free_bias_stays_fp32_under_bf16_cast():
    m = mor("token_choice", sharing="cycle", nr=3, router={"type": "token_choice", "balancing": "loss_free"})
    m.depth_router.bias.fill_(0.3)
    m.to(torch.bfloat16)
    assert m.embed_tokens.weight.dtype == torch.bfloat16
    assert m.depth_router.bias.dtype == torch.float32
    m.update_loss_free_bias(torch.tensor([1.0, 2.0, 3.0]))
    assert m.depth_router.bias[0].item() == pytest.approx(0.301, abs=1e-6)  # lost in bf16


@pytest.mark.parametrize("router,causal", [("token_choice", False), ("expert_choice", True)])
def test_bucketed_gather_lengths_change_nothing(monkeypatch, router, causal):
    """Padding a data-dependent gathered length up to its bucket adds slots that are computed
    and discarded: outputs and gradients equal those of the exact length."""
    import megamor.model.mor as mor_module

    m = mor(router, nr=3).train()
    x = torch.randint(0, m.cfg.vocab_size, (3, 40))
    results = []
    for buckets in (4, 40):  # 40 buckets of 1 token: the exact length
        monkeypatch.setattr(mor_module, "BUCKETS", buckets)
        m.zero_grad()
        out = m(x, targets=x, causal_routing=causal)
        out.loss.backward()
        results.append((out.logits.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    (la, ga), (lb, gb) = results
    assert (la - lb).abs().max().item() <= 1e-5
    assert all((a - b).abs().max().item() <= 1e-5 for a, b in zip(ga, gb))


def test_bucket_length_rule():
    from megamor.model.mor import bucket_length

    T = 2048  # buckets of 64 tokens
    assert [bucket_length(n, T) for n in (0, 1, 64, 65, 2000, 2048)] == [0, 64, 64, 128, 2048, 2048]
    assert len({bucket_length(n, T) for n in range(1, T + 1)}) == 32
    assert [bucket_length(n, 20) for n in (1, 7, 20)] == [1, 7, 20]  # T <= 32: exact


@pytest.mark.parametrize("update", ["gated_residual", "paper"])
def test_a_resumed_pass_decides_later_steps_as_the_pass_that_carried_its_state(update):
    """Token choice decides every depth at step 0; the static depth-wise scheduler keeps that
    state per slot (`carried`) and resumes it in a new pass (rows in another order)."""
    from megamor.model.routing import CAUSAL

    m = mor("token_choice", router={"type": "token_choice", "token_choice_update": update}).eval()
    h0, h1 = torch.randn(5, 1, m.cfg.d_model), torch.randn(5, 1, m.cfg.d_model)
    cand = torch.ones(5, 1, dtype=torch.bool)
    first = m.routing.start(m, CAUSAL)
    first.step(0, h0, cand)
    carried = first.carried()
    assert sorted(carried) == (["base", "choice", "gate"] if update == "paper" else ["choice", "gate"])
    order = torch.tensor([3, 0, 4, 1, 2])
    resumed = m.routing.start(m, CAUSAL)
    resumed.resume({k: v[order] for k, v in carried.items()})
    for r in range(1, len(m.steps)):
        want, got = first.step(r, h1, cand), resumed.step(r, h1[order], cand)
        assert torch.equal(got.selected, want.selected[order]) and torch.equal(got.gate, want.gate[order])
        assert (got.exits is None) == (update != "paper")
        if got.exits is not None:
            assert torch.equal(got.exits, want.exits[order]) and torch.equal(got.base, want.base[order])
    expert = mor("expert_choice").eval()
    rp = expert.routing.start(expert, CAUSAL)
    rp.step(0, h0, cand)
    assert rp.carried() == {}  # expert choice decides each step from that step's input: nothing to carry


def test_router_logits_are_computed_in_fp32_in_a_bf16_model():
    """bf16 router logits tie at top-k boundaries (8 bits of mantissa): the router's matmul runs
    in fp32 whatever the model's dtype, also under autocast."""
    model = mor("expert_choice", d_model=256, d_ff=512).to(torch.bfloat16)
    router = model.routers[1]
    h = torch.randn(1, 2048, 256).to(torch.bfloat16)
    want = torch.nn.functional.linear(h.float(), router.net.weight.float()).squeeze(-1)
    for ctx in (torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False)):
        with ctx:
            got = router(h)
        assert got.dtype == torch.float32 and torch.equal(got, want)
    assert got.unique().numel() > 0.99 * got.numel()  # bf16 logits: about half were distinct


def test_fp32_router_layer_gradients_equal_a_plain_linear():
    from megamor.model.routers import Fp32Linear

    torch.manual_seed(0)
    ours, ref = Fp32Linear(16, 3, bias=False), torch.nn.Linear(16, 3, bias=False)
    ref.weight.data.copy_(ours.weight.data)
    x = torch.randn(2, 5, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.testing.assert_close(ours(x), ref(x2))
    ours(x).square().sum().backward()
    ref(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
