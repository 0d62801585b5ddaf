"""Step time of a TP x DP layout with the time spent in communication, measured for real
(gloo processes on this machine). Used by evals/bench_tp.py.

One step = forward + backward of one micro-batch through the tensor-parallel model (the
vocab-parallel loss included) + an all-reduce of every gradient over the data-parallel group
(what DeepSpeed's ZeRO-0/1 reduction does, without DeepSpeed's start-up) + AdamW. Time inside
torch.distributed collectives and in megamor.parallel.collectives (the functional ops the TP
and SP layers use) is summed by wrapping them, so "comm" counts both the TP all-reduces /
all-gathers / reduce-scatters of every layer and the DP gradient reduction (wait time included:
on an oversubscribed CPU a collective also waits for the slowest rank).

`activation_bytes_worker` measures the bytes one training forward keeps for its backward on
each rank (megamor.observe.activation_memory.SavedTensorMeter), for TP with and without
sequence parallelism.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from megamor.observe.activation_memory import SavedTensorMeter
from megamor.parallel import collectives
from megamor.train.config import experiment_from_dict
from megamor.train.engine import build_model

_COMM = {"s": 0.0}
_WRAPPED = ("all_reduce", "all_gather", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast")


def _wrap_collectives(functional: bool = True) -> None:
    """functional=False: leave megamor.parallel.collectives alone (compiled layers trace them into
    their graphs, where a Python timer would only time the tracing and break the graph)."""
    for mod, name in [*((dist, n) for n in _WRAPPED),
                      *((collectives, n) for n in ("all_reduce", "all_gather", "reduce_scatter") if functional)]:
        fn = getattr(mod, name)
        if getattr(fn, "_timed", False):
            continue

        def timed(*a, _fn=fn, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                _COMM["s"] += time.perf_counter() - t

        timed._timed = True  # type: ignore[attr-defined]
        setattr(mod, name, timed)


def _build(model_cfg: dict, tp: int, world: int, rank: int, sp: bool, ckpt: bool = False, compile_layers: bool = False):
    """The model as the trainer builds it (megamor.train.engine.build_model), without DeepSpeed."""
    exp = experiment_from_dict({
        "model": model_cfg, "data": {"train": ["unused"], "seq_len": model_cfg.get("max_seq_len", 2048)},
        "batch": {"global_batch_size": world // tp, "micro_batch_size": 1},  # unused: no loader here
        "trainer": {"max_steps": 1, "activation_checkpointing": ckpt, "compile": "true" if compile_layers else "false"},
        "parallel": {"tensor": tp, "sequence": sp},
    })
    model, _, _, _, layout = build_model(exp, torch.device("cpu"), world=world, rank=rank, seed=0)
    return exp.model, layout, model


def activation_bytes_worker(rank: int, world: int, model_cfg: dict, tp: int, sp: bool, ckpt: bool, micro: int,
                            seq: int, out: str) -> None:
    """run_distributed target: saved-for-backward bytes of one training forward on each rank
    (max over ranks); rank 0 writes a JSON line to out."""


    cfg, _, model = _build(model_cfg, tp, world, rank, sp, ckpt)
    x = torch.randint(0, cfg.vocab_size, (micro, seq + 1), generator=torch.Generator().manual_seed(1))
    loss_fn, loss_meter = model.lm_loss, SavedTensorMeter(exclude=model)

    def metered_loss(*a, **k):  # the inner hooks take the loss's saved tensors: counted apart
        with loss_meter:
            return loss_fn(*a, **k)

    model.lm_loss = metered_loss
    with SavedTensorMeter(exclude=model) as meter:
        o = model(x[:, :-1], targets=x[:, 1:], return_logits=False)
    (o.loss + o.aux_loss).backward()
    b = torch.tensor([float(meter.bytes + loss_meter.bytes), float(loss_meter.bytes)], dtype=torch.float64)
    dist.all_reduce(b, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(out, "a") as f:
            f.write(json.dumps({"tp": tp, "sp": sp, "ckpt": ckpt, "bytes": b[0].item(), "loss_bytes": b[1].item()}) + "\n")


def layout_step_worker(rank: int, world: int, model_cfg: dict, tp: int, micro: int, seq: int, steps: int,
                       out: str, sp: bool = False, compile_layers: bool = False) -> None:
    """run_distributed target: times `steps` training steps; rank 0 writes a JSON line to out."""


    cfg, layout, model = _build(model_cfg, tp, world, rank, sp, compile_layers=compile_layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _wrap_collectives(functional=not compile_layers)  # compiled: only the eager collectives are timed
    g = torch.Generator().manual_seed(1000 + layout.dp_rank)  # TP ranks share a batch
    times, comms = [], []
    for i in range(steps + 1):  # the first step warms up
        x = torch.randint(0, cfg.vocab_size, (micro, seq + 1), generator=g)
        _COMM["s"] = 0.0
        t = time.perf_counter()
        out_ = model(x[:, :-1], targets=x[:, 1:], return_logits=False)
        (out_.loss + out_.aux_loss).backward()
        if layout.dp > 1:
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=layout.dp_group if layout.mpu else None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
            comms.append(_COMM["s"])
    stats = torch.tensor([statistics.median(times), statistics.median(comms)], dtype=torch.float64)
    dist.all_reduce(stats)  # mean over ranks
    stats /= world
    if rank == 0:
        res: dict[str, Any] = {"tp": tp, "dp": world // tp, "sp": sp, "compiled": compile_layers,
                               "world": world, "step_s": stats[0].item(),
                               "comm_s": stats[1].item(), "tokens_per_step": micro * seq * (world // tp)}
        with open(out, "a") as f:
            f.write(json.dumps(res) + "\n")
