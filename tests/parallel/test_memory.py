"""The analytic per-rank memory model counts the parameters a TP rank really holds."""

import pytest

from megamor.model import MoRLM
from megamor.parallel.memory import param_counts, rank_memory
from megamor.parallel.tensor_parallel import shard_dim
from tests.model.helpers import tiny_config


@pytest.mark.parametrize("kw", [
    {"sharing": "middle_cycle", "num_recursions": 3, "n_layers": 8, "router": {"type": "expert_choice"}},
    {"sharing": "cycle", "num_recursions": 2, "n_layers": 4, "router": {"type": "token_choice", "network": "mlp"}},
    {"n_layers": 3, "tie_embeddings": False},
])
def test_param_counts_match_the_model(kw):
    model = MoRLM(tiny_config(vocab_size=222, **kw))
    sharded = replicated = 0
    for name, p in model.named_parameters():  # tied weights once
        if shard_dim(name) is None:
            replicated += p.numel()
        else:
            sharded += p.numel()
    assert param_counts(model.cfg) == (sharded, replicated)


def test_memory_shrinks_with_tp_and_zero():
    cfg = tiny_config(sharing="middle_cycle", num_recursions=3, n_layers=8, router={"type": "expert_choice"})
    m = {tp: rank_memory(cfg, tp, 2, 1, "bf16", 4, 64, True) for tp in (1, 2, 4)}
    assert m[1]["params"] > m[2]["params"] > m[4]["params"] and m[1]["activations"] > m[2]["activations"]
    z1, z2 = (rank_memory(cfg, 2, 4, z, "bf16", 4, 64, True) for z in (1, 2))
    assert z2["grads"] == pytest.approx(z1["grads"] / 4) and z2["optimizer"] == z1["optimizer"]
