"""ZeRO-3's parameter traffic (megamor.plan.zero3) against a real DeepSpeed ZeRO-3 engine: the
elements its coordinator all-gathers per micro-batch, forward and backward, for a MoR model whose
shared block is reused across recursions or not (stage3_max_reuse_distance), with and without
activation checkpointing; and what the switch does to the planner's traffic."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megamor.plan.memory import ZeroSettings, param_numels
from megamor.plan.speed import StepShape, traffic_bytes
from megamor.plan.zero3 import zero3_traffic
from megamor.testing.distributed import run_distributed
from tests.model.helpers import tiny_config
from tests.plan.engine_bytes import build_engine

VOCAB = 256


def _cfg(router: str = "expert_choice"):
    # A cycle-shared block of 4 layers run twice between a prelude and a coda layer ("vanilla":
    # 10 layers, nothing shared).
    if router == "vanilla":
        return tiny_config(vocab_size=VOCAB, n_layers=10)
    return tiny_config(vocab_size=VOCAB, sharing="middle_cycle", num_recursions=2, n_layers=10,
                       router={"type": router})


def _raw(reuse: int) -> dict:
    # Every parameter partitioned (the tiny model's are all below the 1e5 default), and no
    # prefetching: the prefetch scan's own retention is not what the planner replays.
    return {"zero_optimization": {"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0,
                                  "stage3_max_reuse_distance": reuse, "reduce_bucket_size": 100_000}}


def _count_gathers(engine) -> dict[str, int]:
    """Wrap the coordinator's all-gather (the real one still runs) to count the elements it
    gathers, by pass."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    coord = engine.optimizer.parameter_offload.get_param_coordinator()
    name = "_PartitionedParameterCoordinator__all_gather_params"
    real = getattr(coord, name)
    counts = {"forward": 0, "backward": 0}

    def counting(params, forward):
        counts["forward" if forward else "backward"] += sum(
            p.ds_numel for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE)
        return real(params, forward)

    setattr(coord, name, counting)
    return counts


def _measure(rank: int, world: int, cases: list[tuple[int, bool, str]], out) -> None:
    for reuse, ckpt, router in cases:
        cfg = _cfg(router)
        engine, _exp = build_engine(cfg, 3, "fp32", world, raw=_raw(reuse))
        if ckpt:
            engine.module.enable_activation_checkpointing()
        counts = _count_gathers(engine)
        x = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(3))
        # The coordinator records its trace on the second micro-batch and uses it from the third.
        for _ in range(3):
            counts.update(forward=0, backward=0)
            loss = engine(x[:, :-1], targets=x[:, 1:], return_logits=False)
            engine.backward(loss.loss + loss.aux_loss)
            engine.step()
        if rank == 0:
            out.put(((reuse, ckpt, router), dict(counts)))
        del engine


# Reuse everywhere, nowhere, and in between (the block kept across recursions, part of the
# forward into the backward; with checkpointing, part of the recompute).
# Token choice and a vanilla model at a partial reuse too.
CASES = [(1_000_000_000, False, "expert_choice"), (0, False, "expert_choice"), (0, True, "expert_choice"),
         (1_000_000_000, True, "expert_choice"), (200_000, False, "expert_choice"), (100_000, True, "expert_choice"),
         (200_000, False, "token_choice"), (200_000, False, "vanilla")]


def _block_elements(cfg) -> tuple[int, int]:
    """(elements of the shared block, elements of the whole model)."""
    from megamor.plan.memory import meta_model

    model = meta_model(cfg)
    steps = cfg.layer_plan()[1]
    block = sum(p.numel() for i in steps[0] for p in model.layers[i].parameters())
    return block, sum(param_numels(cfg))


@pytest.mark.launch
def test_replay_matches_a_real_zero3_engine():
    import multiprocessing as mp

    q = mp.get_context("spawn").SimpleQueue()
    run_distributed(_measure, world_size=2, args=(CASES, q))
    got = {}
    while not q.empty():
        case, counts = q.get()
        got[case] = counts
    assert set(got) == set(CASES)
    for reuse, ckpt, router in CASES:
        zero = ZeroSettings(persistence_threshold=0, max_reuse_distance=reuse, prefetch_bucket_size=0)
        plan = zero3_traffic(_cfg(router), ckpt, zero)
        measured = got[(reuse, ckpt, router)]
        # DeepSpeed counts the checkpoint recompute's gathers as forward fetches.
        assert (plan.forward_elements + plan.recompute_elements, plan.backward_elements) == \
            (measured["forward"], measured["backward"]), (reuse, ckpt, router, plan, measured)
        assert (plan.recompute_elements > 0) == (ckpt and reuse < 1_000_000_000)


def test_reuse_switch_changes_the_gathers_by_the_recursions():
    """Reuse off (distance 0) gathers the shared block once per recursion in the forward, and
    everything again in the backward; reuse on (the default), once per micro-batch, and a model
    this small stays gathered into its backward."""
    cfg = _cfg()
    block, total = _block_elements(cfg)
    on = zero3_traffic(cfg, False, ZeroSettings(persistence_threshold=0))
    off = zero3_traffic(cfg, False, ZeroSettings(persistence_threshold=0, max_reuse_distance=0))
    in_use = total + block  # 2 recursions: the block twice
    assert on.forward_elements == total and on.backward_elements == 0
    assert off.forward_elements == in_use and off.backward_elements == in_use
    # Checkpointing, no reuse: the recompute gathers each application a third time.
    ck = zero3_traffic(cfg, True, ZeroSettings(persistence_threshold=0, max_reuse_distance=0))
    assert ck.backward_elements == off.backward_elements and ck.recompute_elements > 0
    # The planner's data-parallel traffic follows: the gathers per micro-batch, plus the
    # gradients' reduce-scatter (once per unique parameter, reuse or not).
    n = float(total)
    shape = StepShape(global_batch=16, micro_batch=2, seq_len=16, world=4, tp=1, zero_stage=3,
                      checkpointing=False, precision="bf16")
    raw_on = traffic_bytes(cfg, shape, n, ZeroSettings(persistence_threshold=0))
    raw_off = traffic_bytes(cfg, shape, n, ZeroSettings(persistence_threshold=0, max_reuse_distance=0))
    assert raw_off["dp_gather"] / raw_on["dp_gather"] == pytest.approx(2 * in_use / total)
    assert raw_off["dp_reduce"] == raw_on["dp_reduce"]


def test_reuse_depends_on_the_block_size():
    """A reuse distance just above the block's other layers keeps the block across recursions;
    just below, it is gathered again."""
    cfg = _cfg()
    block, total = _block_elements(cfg)
    per_layer = block // 4
    # Between two uses of a layer's first module lie the other 3 layers and that layer's own
    # remaining modules, plus the router: a distance of a whole block reaches the reuse.
    keep = zero3_traffic(cfg, False, ZeroSettings(persistence_threshold=0, max_reuse_distance=block + 2 * cfg.d_model))
    drop = zero3_traffic(cfg, False, ZeroSettings(persistence_threshold=0, max_reuse_distance=per_layer))
    assert keep.forward_elements == total
    assert drop.forward_elements == total + block


def test_settings_come_from_the_deepspeed_config():
    z = ZeroSettings.from_raw(_raw(123))
    assert (z.max_reuse_distance, z.prefetch_bucket_size, z.persistence_threshold) == (123, 0, 0)
    assert ZeroSettings().overlaps(3) and not ZeroSettings().overlaps(1)
    assert ZeroSettings.from_raw({"zero_optimization": {"overlap_comm": True}}).overlaps(1)
    assert dataclasses.replace(ZeroSettings(), overlap_comm=False).overlaps(3) is False


def test_settings_read_deepspeeds_field_names_too():
    """DeepSpeed takes `param_persistence_threshold` as well as its `stage3_` alias; both at
    once is a mistake named by key."""
    from megamor.config import ConfigError

    assert ZeroSettings.from_raw({"zero_optimization": {"param_persistence_threshold": 7}}).persistence_threshold == 7
    with pytest.raises(ConfigError) as e:
        ZeroSettings.from_raw({"zero_optimization": {"stage3_max_reuse_distance": 1, "max_reuse_distance": 2}})
    assert e.value.key == "deepspeed.config.zero_optimization.max_reuse_distance"
