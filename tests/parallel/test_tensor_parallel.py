"""Tensor-parallel MoR (2 gloo processes) equals the single-process model in fp32: logits, loss,
router decisions, and each shard's gradient; the training loss never builds full logits."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megamor.inference.generate import generate
from megamor.model import MoRLM
from megamor.testing.distributed import run_distributed
from tests.model.helpers import tiny_config

pytestmark = pytest.mark.launch  # every test here starts processes (docs/testing.md)

VOCAB = 222  # no other dimension of the tiny model has this size: a [.., 222] tensor is full logits
CASES = {
    "mor_expert": {"sharing": "middle_cycle", "num_recursions": 3, "n_layers": 8, "router": {"type": "expert_choice"}},
    "mor_token_kvshare": {"sharing": "cycle", "num_recursions": 2, "n_layers": 4,
                              "router": {"type": "token_choice", "balancing": "loss_free"}, "kv_mode": "shared"},
    "recursive": {"sharing": "middle_cycle", "num_recursions": 2, "n_layers": 6},
    "vanilla": {"n_layers": 3, "tie_embeddings": False},
}


def _build(case: str) -> MoRLM:
    torch.manual_seed(0)
    return MoRLM(tiny_config(n_heads=4, n_kv_heads=2, vocab_size=VOCAB, **CASES[case]))


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (3, 24), generator=g)
    y = torch.roll(x, -1, 1)
    y[0, :5] = -100  # ignored targets
    return x, y


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def _run(model: MoRLM, watch: bool = False) -> dict:
    x, y = _batch()
    shapes = _Shapes()
    with shapes if watch else contextlib.nullcontext():
        out = model(x, targets=y, return_logits=False)
        (out.loss + out.aux_loss).backward()
    res = {"loss": out.loss.detach(), "depth": out.stats.depth, "shapes": shapes.shapes,
           "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    with torch.no_grad():
        res["logits"] = model(x).logits
        model.eval()
        causal = model(x, causal_routing=True)
        res["causal"], res["causal_depth"] = causal.logits, causal.stats.depth
    load = model.loss_free_load()
    res["load"] = load
    return res


def _tp_worker(rank: int, world: int, result_dir: str) -> None:
    from megamor.parallel.tensor_parallel import (
        apply_tensor_parallel,
        gather_full_state_dict,
    )

    for case in sorted(CASES):
        model = apply_tensor_parallel(_build(case))
        res = _run(model, watch=True)
        res["full"] = gather_full_state_dict(model)
        res["param_shapes"] = {n: tuple(p.shape) for n, p in model.named_parameters()}
        torch.save(res, f"{result_dir}/{case}_rank{rank}.pt")
    _decode_worker(rank, world, result_dir)
    _engine_worker(rank, world, result_dir)


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    """Every TP=2 computation of this file but the 4-process one, in one process group:
    starting the 2 processes costs more than the cases (each test reads its own files)."""
    out = tmp_path_factory.mktemp("tp")
    run_distributed(_tp_worker, world_size=2, args=(str(out),))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_tp2_matches_single_process(case, tp_results):
    ran = _build(case)
    ref = _run(ran, watch=True)
    reference_model = _build(case)
    assert any(VOCAB in s for s in ref["shapes"])  # the detector fires on one process's full-vocabulary loss
    for rank in range(2):
        r = torch.load(tp_results / f"{case}_rank{rank}.pt")
        assert torch.allclose(r["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
        assert (r["logits"] - ref["logits"]).abs().max() <= 1e-5
        assert (r["causal"] - ref["causal"]).abs().max() <= 1e-5
        # Routing agrees with one process (so across the TP group), in training and causal mode.
        assert torch.equal(r["depth"], ref["depth"]) and torch.equal(r["causal_depth"], ref["causal_depth"])
        if ref["load"] is not None:
            assert torch.equal(r["load"], ref["load"])
        # The training forward+backward never produced a tensor with the full vocabulary.
        assert not any(VOCAB in s for s in r["shapes"]), sorted(s for s in r["shapes"] if VOCAB in s)
        for name in ("layers.0.self_attn.q_proj.weight", "embed_tokens.weight", "lm_head.weight"):
            assert r["param_shapes"].get(name, (None,))[0] in (None, reference_model.get_parameter(name).shape[0] // 2)
        for name, g in r["grads"].items():
            want = ref["grads"][name]
            if g.shape != want.shape:  # a shard: compare with the matching slice
                dim = 0 if g.shape[1] == want.shape[1] else 1
                want = want.chunk(2, dim=dim)[rank]
            assert torch.allclose(g, want, atol=1e-6, rtol=1e-4), name
        tracked = {n: t for n, t in ran.state_dict().items() if n.endswith((".threshold", ".threshold_updates"))}
        for name, t in reference_model.state_dict().items():
            if name in tracked:  # expert choice's learned threshold moved in the training forward, as in one process
                assert torch.allclose(r["full"][name], tracked[name], atol=1e-5), name
                assert not torch.equal(tracked[name], t) or name.startswith("routers.0."), name
            else:
                assert torch.equal(r["full"][name], t), name  # consolidation restores the full weights


def _mpu_worker(rank: int, world: int, result_dir: str) -> None:
    import torch.distributed as dist

    from megamor.parallel.mpu import ModelParallelUnit

    mpu = ModelParallelUnit(tensor_parallel_size=2)
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=mpu.get_model_parallel_group())
    d = torch.tensor([float(rank)])
    dist.all_reduce(d, group=mpu.get_data_parallel_group())
    torch.save({"tp": mpu.tp_ranks, "dp": mpu.dp_ranks, "tp_sum": t.item(), "dp_sum": d.item(),
                "tp_rank": mpu.get_model_parallel_rank(), "dp_rank": mpu.get_data_parallel_rank()},
               f"{result_dir}/mpu{rank}.pt")


def test_mpu_groups_contiguous_tp_strided_dp(tmp_path):
    run_distributed(_mpu_worker, world_size=4, args=(str(tmp_path),))
    got = [torch.load(tmp_path / f"mpu{r}.pt") for r in range(4)]
    assert [g["tp"] for g in got] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [g["dp"] for g in got] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [g["tp_sum"] for g in got] == [1, 1, 5, 5]  # the collectives really ran in those groups
    assert [g["dp_sum"] for g in got] == [2, 4, 2, 4]
    assert [g["tp_rank"] for g in got] == [0, 1, 0, 1] and [g["dp_rank"] for g in got] == [0, 0, 1, 1]


def _decode_and_score(model: MoRLM) -> dict:
    from megamor.eval.scoring import Scorer

    model.eval()
    prompts = [[5, 17, 40, 99], [7, 8]]
    greedy = generate(model, prompts, max_new_tokens=6).tokens
    sampled = generate(model, prompts, max_new_tokens=6, temperature=1.0, top_k=20, seed=3).tokens
    lls = Scorer(model, batch_size=2).loglikelihood([([5, 17, 40], [99, 3]), ([7], [8, 9, 10])])
    return {"greedy": greedy, "sampled": sampled, "lls": lls}


def _decode_worker(rank: int, world: int, result_dir: str) -> None:
    from megamor.parallel.tensor_parallel import apply_tensor_parallel

    res = _decode_and_score(apply_tensor_parallel(_build("mor_expert")))
    torch.save(res, f"{result_dir}/decode{rank}.pt")


def test_generate_and_scoring_run_with_tp2(tp_results):
    """Decoding (KV cache, causal routing) and the evaluation scorer see gathered logits."""
    ref = _decode_and_score(_build("mor_expert"))
    for rank in range(2):
        r = torch.load(tp_results / f"decode{rank}.pt")
        assert r["greedy"] == ref["greedy"] and r["sampled"] == ref["sampled"]
        for (lp, greedy), (lp_ref, greedy_ref) in zip(r["lls"], ref["lls"]):
            assert abs(lp - lp_ref) <= 1e-4 and greedy == greedy_ref


ENGINE_PROMPTS = [[5, 17, 40, 99], [7, 8], [3, 1, 4, 1, 5, 9, 2, 6]]


def _engine_tokens(model: MoRLM) -> dict:
    from megamor.inference.engine import engine_generate

    # max_batch 2 < 3 prompts: a slot is released and reused mid-run; static: the fixed-shape step
    return {static: engine_generate(model, ENGINE_PROMPTS, 8, max_batch=2, static=static).tokens for static in (False, True)}


def _engine_worker(rank: int, world: int, result_dir: str) -> None:
    from megamor.parallel.tensor_parallel import apply_tensor_parallel

    res = {case: _engine_tokens(apply_tensor_parallel(_build(case))) for case in ("mor_expert", "mor_token_kvshare")}
    torch.save(res, f"{result_dir}/engine{rank}.pt")


def test_decoding_engine_runs_a_tp2_sharded_model(tp_results):
    """megamor.inference's engine (dynamic and static step, continuous batching) on a TP=2 model:
    each rank caches its own KV heads; the greedy tokens are the unsharded engine's."""
    for case in ("mor_expert", "mor_token_kvshare"):
        ref = _engine_tokens(_build(case))
        for rank in range(2):
            assert torch.load(tp_results / f"engine{rank}.pt")[case] == ref, (case, rank)
