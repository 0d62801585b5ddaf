"""Tensor-parallel MoR layers (2 gloo processes) equal the single-process model in fp32."""

import pytest
import torch

from megamor.model import MoRLM
from megamor.testing.distributed import run_distributed
from tests.model.helpers import tiny_config

CASES = {
    "mor_expert": dict(sharing="middle_cycle", num_recursions=3, n_layers=8, router={"type": "expert_choice"}),
    "mor_token_kvshare": dict(sharing="cycle", num_recursions=2, n_layers=4, router={"type": "token_choice"}, kv_mode="shared"),
    "vanilla": dict(n_layers=3),
}


def _build(case: str) -> MoRLM:
    torch.manual_seed(0)
    return MoRLM(tiny_config(n_heads=4, n_kv_heads=2, **CASES[case]))


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 211, (3, 24), generator=g)
    return x, torch.roll(x, -1, 1)


def _reference(case: str):
    model = _build(case)
    x, y = _batch()
    out = model(x, targets=y)
    (out.loss + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        causal = model(x, causal_routing=True).logits
    return out.loss.detach(), out.logits.detach(), grads, causal


def _tp_worker(rank: int, world: int, case: str, result_dir: str) -> None:
    from megamor.parallel.tensor_parallel import apply_tensor_parallel, gather_full_state_dict

    model = apply_tensor_parallel(_build(case))
    x, y = _batch()
    out = model(x, targets=y)
    (out.loss + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    full = gather_full_state_dict(model)
    model.eval()
    with torch.no_grad():
        causal = model(x, causal_routing=True).logits
    torch.save({"loss": out.loss.detach(), "logits": out.logits.detach(), "grads": grads, "full": full,
                "causal": causal, "shapes": {n: tuple(p.shape) for n, p in model.named_parameters()}},
               f"{result_dir}/rank{rank}.pt")


@pytest.mark.parametrize("case", sorted(CASES))
def test_tp2_matches_single_process(case, tmp_path):
    run_distributed(_tp_worker, world_size=2, args=(case, str(tmp_path)))
    ref_loss, ref_logits, ref_grads, ref_causal = _reference(case)
    reference_model = _build(case)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(r["loss"], ref_loss, rtol=1e-5, atol=1e-6)
        assert (r["logits"] - ref_logits).abs().max() <= 1e-5
        assert (r["causal"] - ref_causal).abs().max() <= 1e-5
        q = "layers.0.self_attn.q_proj.weight"
        assert r["shapes"][q][0] == reference_model.get_parameter(q).shape[0] // 2  # really sharded
        for name, g in r["grads"].items():
            ref = ref_grads[name]
            if g.shape != ref.shape:  # a shard: compare with the matching slice
                dim = 0 if g.shape[1] == ref.shape[1] else 1
                ref = ref.chunk(2, dim=dim)[rank]
            assert torch.allclose(g, ref, atol=1e-6, rtol=1e-4), name
        for name, t in reference_model.state_dict().items():
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
