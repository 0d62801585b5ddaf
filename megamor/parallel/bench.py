"""Step time of a TP x DP layout with the time spent in communication, measured for real
(gloo processes on this machine). Used by evals/bench_tp.py.

One step = forward + backward of one micro-batch through the tensor-parallel model (the
vocab-parallel loss included) + an all-reduce of every gradient over the data-parallel group
(what DeepSpeed's ZeRO-0/1 reduction does, without DeepSpeed's start-up) + AdamW. Time inside
torch.distributed collectives is summed by wrapping them, so "comm" counts both the TP
all-reduces/all-gathers of every layer and the DP gradient reduction (wait time included: on an
oversubscribed CPU a collective also waits for the slowest rank).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

_COMM = {"s": 0.0}
_WRAPPED = ("all_reduce", "all_gather", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast")


def _wrap_collectives() -> None:
    for name in _WRAPPED:
        fn = getattr(dist, name)
        if getattr(fn, "_timed", False):
            continue

        def timed(*a, _fn=fn, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                _COMM["s"] += time.perf_counter() - t

        timed._timed = True  # type: ignore[attr-defined]
        setattr(dist, name, timed)


def layout_step_worker(rank: int, world: int, model_cfg: dict, tp: int, micro: int, seq: int, steps: int,
                       out: str) -> None:
    """run_distributed target: times `steps` training steps; rank 0 writes a JSON line to out."""
    import json

    from omegaconf import OmegaConf

    from megamor.config import from_node
    from megamor.model import ModelConfig, MoRLM
    from megamor.parallel.tensor_parallel import apply_tensor_parallel
    from megamor.train.parallelize import build_layout

    torch.manual_seed(0)
    cfg = from_node(ModelConfig, OmegaConf.create(model_cfg))
    layout = build_layout(tp, world, rank)
    model = MoRLM(cfg)
    if tp > 1:
        apply_tensor_parallel(model, layout.tp_group)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _wrap_collectives()
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
        res: dict[str, Any] = {"tp": tp, "dp": world // tp, "world": world, "step_s": stats[0].item(),
                               "comm_s": stats[1].item(), "tokens_per_step": micro * seq * (world // tp)}
        with open(out, "a") as f:
            f.write(json.dumps(res) + "\n")
