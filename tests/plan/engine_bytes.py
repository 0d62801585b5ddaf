"""Real DeepSpeed engines built as the trainer builds them, and the bytes of their model-state
tensors (parameters, gradients, optimizer states), counted from the engine's own objects."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor


def build_engine(model_cfg, zero_stage: int, precision: str, world: int, tp: int = 1, micro: int = 2, seq: int = 16,
                 raw: dict | None = None):
    from megamor.train.config import experiment_from_dict
    from megamor.train.engine import build_engine

    exp = experiment_from_dict({
        "model": dataclasses.asdict(model_cfg), "data": {"train": ["unused"], "seq_len": seq},
        "batch": {"global_batch_size": micro * world // tp, "micro_batch_size": micro},
        "trainer": {"max_steps": 2, "compile": "false"},
        "parallel": {"tensor": tp},
        "deepspeed": {"zero_stage": zero_stage, "precision": precision, "config": raw or {}},
    })
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    engine = build_engine(exp, torch.device("cpu"), world=world, rank=rank, seed=0).engine
    return engine, exp


def train_step(engine, vocab: int, micro: int = 2, seq: int = 16) -> None:
    x = torch.randint(0, vocab, (micro, seq + 1), generator=torch.Generator().manual_seed(1))
    out = engine(x[:, :-1], targets=x[:, 1:], return_logits=False)
    engine.backward(out.loss + out.aux_loss)
    engine.step()


# Where DeepSpeed 0.19's optimizer wrappers keep their tensors (FP16_UnfusedOptimizer for bf16
# ZeRO-0, DeepSpeedZeroOptimizer for 1-2, DeepSpeedZeroOptimizer_Stage3).
MASTER_ATTRS = ("fp32_groups", "single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
GRAD_ATTRS = ("averaged_gradients", "grad_partitions_flat_buffer")
BUFFER_ATTRS = ("ipg_buckets",)


def _tensors(obj: Any, depth: int = 0, seen: set[int] | None = None):
    """Every tensor reachable from obj through lists, tuples and dicts (and DeepSpeed bucket objects)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth + 1, seen)
    elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            yield from _tensors(v, depth + 1, seen)


def _storages(ts) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts
            if isinstance(t, Tensor) and t.numel() and t.device.type != "meta"}


def engine_bytes(engine) -> dict[str, int]:
    """Bytes of distinct storages on this rank: params (the module's parameters; ZeRO-3: their
    partitions and the parameters it keeps whole), grads (the module's .grad and the wrapper's
    gradient partitions), optimizer (the base optimizer's states and the wrapper's fp32 master
    copies), buffers (ZeRO-3's gradient bucket). Call between a backward and its step."""
    params = list({id(p): p for p in engine.module.parameters()}.values())
    if engine.zero_optimization_stage() == 3:
        param_ts = [p.ds_tensor for p in params] + [p.data for p in params if p.data.numel()]
    else:
        param_ts = params
    wrapper = engine.optimizer
    base = getattr(wrapper, "optimizer", wrapper)
    attrs = vars(wrapper) if wrapper is not base else {}

    def under(names):
        return [t for k in names if k in attrs for t in _tensors(attrs[k])]

    p_st = _storages(param_ts)
    states = [t for st in base.state.values() for t in st.values() if isinstance(t, Tensor) and t.dim() > 0]
    opt_st = {k: v for k, v in _storages(states + under(MASTER_ATTRS)).items() if k not in p_st}
    grad_st = {k: v for k, v in _storages([p.grad for p in params] + under(GRAD_ATTRS)).items() if k not in p_st}
    buf_st = _storages(under(BUFFER_ATTRS))
    return {"params": sum(p_st.values()), "optimizer": sum(opt_st.values()), "grads": sum(grad_st.values()),
            "buffers": sum(buf_st.values())}
