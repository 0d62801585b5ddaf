"""Tensor + sequence parallel MoR (2 gloo processes) equals the single-process model in fp32:
loss, logits, causal-routing logits, routing decisions, router statistics and every gradient
(each shard against its slice), for vanilla, recursive, MoR expert choice and token choice,
with and without activation checkpointing, with padding and document masking. One launch
runs every variant (process start-up dominates on CPU)."""

import pytest
import torch

from megamor.model import MoRLM
from megamor.testing.distributed import run_distributed
from tests.model.helpers import tiny_config

pytestmark = pytest.mark.launch  # every test here starts processes (docs/testing.md)

VOCAB = 222
T = 22  # even (SP=2) but k_r = int(c_r T) odd for some steps: routed slots get padded to a multiple of 2
CASES = {
    "vanilla": {"n_layers": 3, "tie_embeddings": False},
    "recursive": {"sharing": "middle_cycle", "num_recursions": 2, "n_layers": 6},
    "mor_expert": {"sharing": "middle_cycle", "num_recursions": 3, "n_layers": 8,
                   "router": {"type": "expert_choice", "learn_alpha": True}},
    "mor_token_kvshare": {"sharing": "cycle", "num_recursions": 2, "n_layers": 4,
                          "router": {"type": "token_choice", "balancing": "loss_free"}, "kv_mode": "shared"},
    "mor_token_paper": {"sharing": "cycle", "num_recursions": 2, "n_layers": 4,
                        "router": {"type": "token_choice", "token_choice_update": "paper"}},
}
# (case, activation checkpointing, batch extras)
VARIANTS = [
    ("vanilla", False, ""), ("recursive", False, ""), ("mor_expert", False, ""), ("mor_token_kvshare", False, ""),
    ("vanilla", True, ""), ("mor_expert", True, ""), ("mor_token_kvshare", True, ""),
    ("mor_expert", False, "docs_pad"), ("mor_token_paper", False, ""),
]
TOL = 1e-5


def _build(case: str, ckpt: bool) -> MoRLM:
    torch.manual_seed(0)
    model = MoRLM(tiny_config(n_heads=4, n_kv_heads=2, vocab_size=VOCAB, **CASES[case]))
    if ckpt:
        model.enable_activation_checkpointing()
    return model


def _batch(extras: str) -> dict:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (3, T), generator=g)
    y = torch.roll(x, -1, 1)
    y[0, :5] = -100
    kw: dict = {}
    if extras == "docs_pad":
        kw["doc_ids"] = (torch.arange(T) >= 9).long().unsqueeze(0).expand(3, T).contiguous()
        mask = torch.ones(3, T, dtype=torch.long)
        mask[1, 17:] = 0  # right padding
        kw["attention_mask"] = mask
    return {"x": x, "y": y, "kw": kw}


def _run(model: MoRLM, extras: str) -> dict:
    b = _batch(extras)
    seen: list[tuple[int, ...]] = []
    handle = model.norm.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    out = model(b["x"], targets=b["y"], return_logits=False, **b["kw"])
    (out.loss + out.aux_loss).backward()
    handle.remove()
    res = {"loss": out.loss.detach(), "aux": out.aux_loss.detach(), "depth": out.stats.depth,
           "routed": out.stats.routed, "norm_input": seen[0],
           "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
           "buffers": {n: t.clone() for n, t in model.named_buffers()}}
    with torch.no_grad():
        res["logits"] = model(b["x"], **b["kw"]).logits
        model.eval()
        causal = model(b["x"], causal_routing=True, **b["kw"])
        res["causal"], res["causal_depth"] = causal.logits, causal.stats.depth
    return res


def _sp_worker(rank: int, world: int, result_dir: str) -> None:
    from megamor.parallel.sequence_parallel import apply_sequence_parallel
    from megamor.parallel.tensor_parallel import apply_tensor_parallel

    for i, (case, ckpt, extras) in enumerate(VARIANTS):
        model = apply_sequence_parallel(apply_tensor_parallel(_build(case, ckpt)))
        torch.save(_run(model, extras), f"{result_dir}/v{i}_rank{rank}.pt")


@pytest.fixture(scope="module")
def sp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp")
    run_distributed(_sp_worker, world_size=2, args=(str(out),))
    return out


@pytest.mark.parametrize("i", range(len(VARIANTS)), ids=[f"{c}{'-ckpt' if k else ''}{'-' + e if e else ''}"
                                                         for c, k, e in VARIANTS])
def test_tp2_sequence_parallel_matches_single_process(sp_results, i):
    case, ckpt, extras = VARIANTS[i]
    ref = _run(_build(case, ckpt), extras)
    assert ref["norm_input"] == (3, T, 64)
    for rank in range(2):
        r = torch.load(sp_results / f"v{i}_rank{rank}.pt")
        assert r["norm_input"] == (3, T // 2, 64)  # the residual stream really was split along the sequence
        assert (r["loss"] - ref["loss"]).abs() <= TOL and (r["aux"] - ref["aux"]).abs() <= TOL
        assert (r["logits"] - ref["logits"]).abs().max() <= TOL
        assert (r["causal"] - ref["causal"]).abs().max() <= TOL
        assert torch.equal(r["depth"], ref["depth"]) and torch.equal(r["causal_depth"], ref["causal_depth"])
        assert torch.equal(r["routed"], ref["routed"])
        for name, t in ref["buffers"].items():  # learned thresholds, balancing load: as in one process
            assert torch.allclose(r["buffers"][name], t, atol=1e-6), name
        for name, g in r["grads"].items():
            want = ref["grads"][name]
            if g.shape != want.shape:  # a TP shard: compare with the matching slice
                dim = 0 if g.shape[1] == want.shape[1] else 1
                want = want.chunk(2, dim=dim)[rank]
            assert (g - want).abs().max() <= TOL, (name, (g - want).abs().max())
