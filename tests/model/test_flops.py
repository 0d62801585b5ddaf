"""The FLOPs formula against torch's FlopCounterMode, routed configs included."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megamor.model.flops import forward_flops

from .helpers import mor


@pytest.mark.parametrize(
    "router,sharing,kv,causal",
    [
        ("none", "none", "recursion_wise", False),
        ("none", "middle_cycle", "recursion_wise", False),
        ("expert_choice", "middle_cycle", "recursion_wise", False),
        ("expert_choice", "middle_cycle", "recursion_wise", True),
        ("expert_choice", "middle_cycle", "shared", False),
        ("token_choice", "cycle", "recursion_wise", False),
    ],
)
def test_formula_matches_flop_counter(router, sharing, kv, causal):
    m = mor(router, sharing=sharing, nr=3 if sharing != "none" else 1, kv_mode=kv, vocab_size=512, d_model=128)
    m.train(not causal)
    x = torch.randint(0, 512, (1, 96))
    # The math backend runs attention as matmuls, which FlopCounterMode counts.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        out = m(x, causal_routing=causal)
    measured = counter.get_total_flops()
    formula = forward_flops(m.cfg, 96, out.stats.tokens_per_step, causal=False)
    assert abs(formula - measured) / measured < 0.02
    if router != "none":
        dense = forward_flops(m.cfg, 96, [96] * 3, causal=False)
        assert formula < dense  # routing saves compute the counter sees


def test_causal_counting_halves_attention_only():
    m = mor("none", sharing="none", nr=1)
    full = forward_flops(m.cfg, 64, [], causal=False)
    causal = forward_flops(m.cfg, 64, [], causal=True)
    width = m.cfg.n_heads * m.cfg.head_dim
    attn_full = 4 * width * 64 * 64 * m.cfg.n_layers
    attn_causal = 4 * width * 64 * 65 / 2 * m.cfg.n_layers
    assert full - causal == pytest.approx(attn_full - attn_causal)
