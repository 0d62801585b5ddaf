"""Parameter counts against the paper's table, and physical sharing."""

import pytest
import torch

from megamor.env import repo_root
from megamor.model import load_model_config
from megamor.model.summary import summarize

from .helpers import mor

PAPER_NON_EMBEDDING = {  # mor-reference.md
    "135m/vanilla": 106e6,
    "360m/vanilla": 315e6,
    "730m/vanilla": 654e6,
    "1_7b/vanilla": 1.61e9,
    "360m/recursive_2": 167e6,
    "360m/mor_expert_3": 118e6,
    "360m/recursive_4": 98e6,
}


@pytest.mark.parametrize("name,expected", sorted(PAPER_NON_EMBEDDING.items()))
def test_paper_parameter_counts(name, expected):
    cfg = load_model_config(repo_root() / "configs" / "model" / f"{name}.yaml")
    got = summarize(cfg, 2048)["non_embedding"]
    assert abs(got - expected) / expected < 0.01, (name, got)


@pytest.mark.parametrize("sharing", ["cycle", "sequence", "middle_cycle", "middle_sequence"])
def test_sharing_is_physical(sharing):
    nr = 2
    m = mor("none", sharing=sharing, nr=nr)
    cfg = m.cfg
    assert len(m.layers) == cfg.num_unique_layers
    ptrs = [p.data_ptr() for p in m.parameters()]
    assert len(ptrs) == len(set(ptrs))  # no parameter is a copy of another
    per_layer = sum(p.numel() for p in m.layers[0].parameters())
    assert m.num_params() == m.num_params(unique=False) - (cfg.n_layers - cfg.num_unique_layers) * per_layer
    # Every virtual layer refers to a physical one; each physical layer is used.
    prelude, steps, coda = cfg.layer_plan()
    used = prelude + [i for s in steps for i in s] + coda
    assert len(used) == cfg.n_layers and set(used) == set(range(cfg.num_unique_layers))


def test_tied_embeddings_share_storage():
    m = mor("none", sharing="cycle", nr=2)
    assert m.lm_head.weight.data_ptr() == m.embed_tokens.weight.data_ptr()
    total = sum(p.numel() for p in m.parameters())  # parameters() yields tied ones once
    assert m.num_params() == total


def test_module_conversions_work():
    m = mor("expert_choice")
    m.to(torch.bfloat16)
    assert m.embed_tokens.weight.dtype == torch.bfloat16
    cos, _ = m.rope(torch.arange(4096).unsqueeze(0))
    assert cos.dtype == torch.float32  # RoPE tables stay fp32 in a bf16 model
    m.float()
    out = m(torch.randint(0, 211, (1, 8)))
    assert out.logits.dtype == torch.float32


@pytest.mark.parametrize("router_type,sharing", [("expert_choice", "middle_cycle"), ("token_choice", "cycle"),
                                                 ("none", "sequence")])
def test_total_counts_each_layer_application(router_type, sharing):
    """Independent reference: run a forward and count how often each physical layer is called."""
    from megamor.model.summary import ParamCounts

    m = mor(router_type, sharing=sharing, nr=3)
    calls = [0] * len(m.layers)
    for i, layer in enumerate(m.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    x = torch.randint(0, m.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m(x)  # training-mode routing: every step runs on its top-k tokens
    size = [sum(p.numel() for p in layer.parameters()) for layer in m.layers]
    outside = sum(p.numel() for p in m.parameters()) - sum(size)
    counts = ParamCounts.of(m)
    assert all(c >= 1 for c in calls) and sum(calls) == m.cfg.n_layers
    assert counts.total == outside + sum(c * s for c, s in zip(calls, size))
    assert counts.unique == sum(p.numel() for p in m.parameters())
    assert counts.total > counts.unique


def test_banner_gives_total_and_unique():
    from megamor.model.summary import ParamCounts

    cfg = load_model_config(repo_root() / "configs" / "model" / "33m" / "mor_expert_3.yaml")
    with torch.device("meta"):
        from megamor.model import MoRLM

        c = ParamCounts.of(MoRLM(cfg))
    assert (round(c.total / 1e5), round(c.unique / 1e5)) == (330, 186)  # the 33M model, 18.6M stored
    assert c.describe() == "33.0M params in use (18.6M unique, shared across recursions), 14.4M non-embedding unique"
    vanilla = load_model_config(repo_root() / "configs" / "model" / "33m" / "vanilla.yaml")
    with torch.device("meta"):
        v = ParamCounts.of(MoRLM(vanilla))
    assert v.describe() == "33.0M params (28.8M non-embedding)"
