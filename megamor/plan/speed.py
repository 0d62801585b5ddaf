"""Predicted step time, tokens/day and communication of a layout.

FLOPs: `megamor.model.flops.forward_flops` (expected routing: expert choice's capacities, token
choice with uniform depths), times 3 for training, times 4 with activation checkpointing (the
recompute runs the forward again; MFU keeps counting 3, the useful work). Compute time is the
hardware FLOPs of one rank over peak x assumed MFU.

Traffic per optimizer step, bytes one rank sends (ring collectives: an all-reduce of S bytes
over g ranks sends 2 (g-1)/g S, a reduce-scatter or all-gather (g-1)/g S), in the parameter dtype
(DeepSpeed communicates gradients in it too):
- data parallel, n parameters per rank: ZeRO-0 all-reduces the gradients once per step, ZeRO-1
  reduce-scatters them and all-gathers the updated weights once per step; ZeRO-2 reduce-scatters
  after every micro-batch (and all-gathers once); ZeRO-3, every micro-batch, all-gathers the
  parameters in the forward and again in the backward (megamor.plan.zero3 replays DeepSpeed's
  gather / release rule: what stays gathered across recursions and into the backward, and the
  recompute's gathers under checkpointing) and reduce-scatters the gradients;
- tensor parallel, per micro-batch: each layer application all-reduces its [B, n, d] activations
  twice forward (o_proj, down_proj) and twice backward (the inputs of the column-parallel
  projections), twice more when checkpointing recomputes the forward; the embedding once
  forward, the loss' input once backward.
Time on the links: TP traffic over NVLink; DP traffic over NVLink inside one node and over the
network beyond. `communication_s` is all of it; `exposed_communication_s` the part the step waits
for, under this overlap assumption:
- overlapped: communication that runs on a side stream during a pass, up to that pass's compute
  time (a micro-batch's forward is 1/3 of its compute, 1/4 with checkpointing; its backward the
  rest). Only the fraction `overlap` (default 0.5, `--overlap`) of it is hidden; the rest is
  added: the collectives' kernels take SMs and memory bandwidth from the compute beside them, and
  a prefetch that lands late stalls the next module. 0.5 is an assumption, not a measurement
  (1.0 is the optimistic bound: overlapped communication free). Overlapped are: ZeRO-1's reduce-scatter during the last micro-batch's backward and ZeRO-2's during every
  one (only with `overlap_comm`, which the shipped configs set), ZeRO-3's prefetched all-gathers
  of the forward during the forward, and its backward all-gathers and reduce-scatter during the
  backward (all-gathers are always prefetched on a side stream; the reduce-scatter with
  `overlap_comm`, ZeRO-3's default);
- exposed: what exceeds that compute; ZeRO-0's all-reduce (DeepSpeed runs it after the
  backward); the all-gather of the updated weights after ZeRO-1/2's optimizer step (nothing runs
  beside it); the first all-gather of every ZeRO-3 forward (nothing is prefetched before it);
  every tensor-parallel collective (the next matmul needs its result).
Until a GPU run measures them, the times and the ranking built on them are this model's.
"""

from __future__ import annotations

from dataclasses import dataclass

from megamor.model.config import ModelConfig
from megamor.model.flops import default_tokens_per_step, forward_flops
from megamor.plan.hardware import GPU
from megamor.plan.memory import ZeroSettings
from megamor.plan.zero3 import zero3_traffic

SECONDS_PER_DAY = 86400.0
DEFAULT_OVERLAP = 0.5  # share of overlapped communication the compute beside it hides


@dataclass(frozen=True)
class StepShape:
    global_batch: int
    micro_batch: int
    seq_len: int
    world: int
    tp: int
    zero_stage: int
    checkpointing: bool
    precision: str

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)


def _applications(cfg: ModelConfig, seq_len: int) -> list[float]:
    """Tokens per row of every layer application (prelude, routed steps, coda)."""
    prelude, steps, coda = cfg.layer_plan()
    counts = default_tokens_per_step(cfg, seq_len)
    apps = [float(seq_len)] * (len(prelude) + len(coda))
    for layer_ids, n in zip(steps, counts):
        apps += [float(n)] * len(layer_ids)
    return apps


def _ring(g: int) -> float:
    return (g - 1) / g if g > 1 else 0.0


def traffic_bytes(cfg: ModelConfig, s: StepShape, n_params: float, zero: ZeroSettings | None = None) -> dict[str, float]:
    """Bytes one rank sends per optimizer step: "dp" in all, split into "dp_gather" (parameter
    all-gathers), "dp_reduce" (gradient reductions) and "dp_first_gather" (ZeRO-3's first,
    unprefetched gather, summed over the micro-batches); "tp" over the TP group. ZeRO-3's
    gathers are also given per micro-batch and pass: "z3_forward_gather", "z3_backward_gather"
    (with the checkpoint recompute's)."""
    zero = zero or ZeroSettings()
    w = 2 if s.precision == "bf16" else 4
    gas, ring = s.accumulation, _ring(s.dp)
    full = n_params * w * ring
    out = {"dp_gather": 0.0, "dp_reduce": 0.0, "dp_first_gather": 0.0, "z3_forward_gather": 0.0,
           "z3_backward_gather": 0.0}
    if s.zero_stage == 0:
        out["dp_reduce"] = 2 * full  # all-reduce = reduce-scatter + all-gather
    elif s.zero_stage == 1:
        out["dp_reduce"], out["dp_gather"] = full, full
    elif s.zero_stage == 2:
        out["dp_reduce"], out["dp_gather"] = gas * full, full
    else:
        z3 = zero3_traffic(cfg, s.checkpointing, zero)
        per = w * ring
        out["z3_forward_gather"] = z3.forward_elements * per
        out["z3_backward_gather"] = (z3.recompute_elements + z3.backward_elements) * per
        out["dp_gather"] = gas * z3.gathered_elements * per
        out["dp_first_gather"] = gas * z3.first_elements * per
        out["dp_reduce"] = gas * z3.reduced_elements * per
    out["dp"] = out["dp_gather"] + out["dp_reduce"]
    tp_bytes = 0.0
    if s.tp > 1:
        t_ring = 2 * (s.tp - 1) / s.tp
        per_app = 6 if s.checkpointing else 4
        tokens = sum(_applications(cfg, s.seq_len))
        per_micro = (per_app * tokens + 2 * s.seq_len) * s.micro_batch * cfg.d_model * w * t_ring
        tp_bytes = gas * per_micro
    out["tp"] = tp_bytes
    return out


def _beside(comm: float, compute: float, overlap: float) -> float:
    """Exposed seconds of `comm` run on a side stream beside `compute` seconds of work."""
    behind = min(comm, compute)
    return (comm - behind) + (1.0 - overlap) * behind


def _exposed_dp(s: StepShape, t: dict[str, float], bw: float, fwd_c: float, bwd_c: float, overlap_comm: bool,
                overlap: float) -> float:
    """Seconds of data-parallel communication the step waits for (the module docstring's rules);
    fwd_c / bwd_c: one micro-batch's forward / backward compute seconds."""
    gas = s.accumulation
    if s.zero_stage == 0:
        return t["dp_reduce"] / bw
    if s.zero_stage in (1, 2):
        reductions = 1 if s.zero_stage == 1 else gas  # each in one micro-batch's backward
        rs = t["dp_reduce"] / reductions / bw
        return t["dp_gather"] / bw + reductions * (_beside(rs, bwd_c, overlap) if overlap_comm else rs)
    first = t["dp_first_gather"] / gas / bw
    fwd = t["z3_forward_gather"] / bw - first
    rs = t["dp_reduce"] / gas / bw
    bwd = t["z3_backward_gather"] / bw + (rs if overlap_comm else 0.0)
    per_micro = first + _beside(fwd, fwd_c, overlap) + _beside(bwd, bwd_c, overlap) + (0.0 if overlap_comm else rs)
    return gas * per_micro


def step_time(cfg: ModelConfig, s: StepShape, gpu: GPU, mfu: float, n_params: float,
              zero: ZeroSettings | None = None, overlap: float = DEFAULT_OVERLAP) -> dict[str, float]:
    """Seconds per optimizer step (compute, communication, the exposed part, total),
    tokens/day, FLOPs, traffic."""
    zero = zero or ZeroSettings()
    fwd = forward_flops(cfg, s.seq_len)
    useful = 3.0 * fwd * s.global_batch
    passes = 4.0 if s.checkpointing else 3.0
    hardware = passes * fwd * s.global_batch
    compute = hardware / s.world / (gpu.peak_flops(s.precision) * mfu)
    micro_c = compute / s.accumulation
    fwd_c, bwd_c = micro_c / passes, micro_c * (passes - 1) / passes
    traffic = traffic_bytes(cfg, s, n_params, zero)
    tp_time = traffic["tp"] / (gpu.intra_node_gbps * 1e9)
    dp_bw = (gpu.intra_node_gbps if s.world <= gpu.gpus_per_node else gpu.inter_node_gbps) * 1e9
    dp_time = traffic["dp"] / dp_bw
    exposed = tp_time + _exposed_dp(s, traffic, dp_bw, fwd_c, bwd_c, zero.overlaps(s.zero_stage), overlap)
    total = compute + exposed
    tokens = s.global_batch * s.seq_len
    return {
        "compute_s": compute,
        "communication_s": tp_time + dp_time,
        "exposed_communication_s": exposed,
        "step_s": total,
        "tokens_per_day": tokens / total * SECONDS_PER_DAY,
        "flops_per_step": useful,
        "effective_mfu": useful / (total * s.world * gpu.peak_flops(s.precision)),
        "dp_traffic_bytes": traffic["dp"],
        "dp_gather_bytes": traffic["dp_gather"],
        "dp_reduce_bytes": traffic["dp_reduce"],
        "tp_traffic_bytes": traffic["tp"],
    }
