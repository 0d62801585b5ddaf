"""Predicted step time, tokens/day and communication of a layout.

FLOPs: `megamor.model.flops.forward_flops` (expected routing: expert choice's capacities, token
choice with uniform depths), times 3 for training, times 4 with activation checkpointing (the
recompute runs the forward again; MFU keeps counting 3, the useful work). Compute time is the
hardware FLOPs of one rank over peak x assumed MFU.

Traffic per optimizer step, bytes one rank sends (ring collectives: an all-reduce of S bytes
over g ranks sends 2 (g-1)/g S, a reduce-scatter or all-gather (g-1)/g S), in the gradient dtype:
- data parallel, n parameters per rank: ZeRO-0 all-reduces the gradients once per step, ZeRO-1
  reduce-scatters them and all-gathers the updated weights once per step; ZeRO-2 reduce-scatters
  after every micro-batch (and all-gathers once); ZeRO-3 all-gathers the weights for every
  micro-batch's forward and backward and reduce-scatters its gradients;
- tensor parallel, per micro-batch: each layer application all-reduces its [B, n, d] activations
  twice forward (o_proj, down_proj) and twice backward (the inputs of the column-parallel
  projections), twice more when checkpointing recomputes the forward; the embedding once
  forward, the loss' input once backward.
Communication time: TP traffic over NVLink, not overlapped; DP traffic over NVLink inside one
node and over the network beyond, overlapped with the backward pass (two thirds of the compute)
for ZeRO-3 (DeepSpeed's overlap_comm default) and exposed for the other stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from megamor.model.config import ModelConfig
from megamor.model.flops import default_tokens_per_step, forward_flops
from megamor.plan.hardware import GPU

SECONDS_PER_DAY = 86400.0


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


def traffic_bytes(cfg: ModelConfig, s: StepShape, n_params: float) -> dict[str, float]:
    """{"dp": bytes per rank per step over the data-parallel group, "tp": over the TP group}."""
    w = 2 if s.precision == "bf16" else 4
    dp, tp, gas = s.dp, s.tp, s.accumulation
    full = n_params * w
    ring = (dp - 1) / dp if dp > 1 else 0.0
    if s.zero_stage in (0, 1):  # all-reduce = reduce-scatter + all-gather
        dp_bytes = 2 * ring * full
    elif s.zero_stage == 2:
        dp_bytes = gas * ring * full + ring * full
    else:
        dp_bytes = 3 * gas * ring * full
    tp_bytes = 0.0
    if tp > 1:
        t_ring = 2 * (tp - 1) / tp
        per_app = 6 if s.checkpointing else 4
        tokens = sum(_applications(cfg, s.seq_len))
        per_micro = (per_app * tokens + 2 * s.seq_len) * s.micro_batch * cfg.d_model * w * t_ring
        tp_bytes = gas * per_micro
    return {"dp": dp_bytes, "tp": tp_bytes}


def step_time(cfg: ModelConfig, s: StepShape, gpu: GPU, mfu: float, n_params: float) -> dict[str, float]:
    """Seconds per optimizer step (compute, exposed communication, total), tokens/day, FLOPs."""
    fwd = forward_flops(cfg, s.seq_len)
    useful = 3.0 * fwd * s.global_batch
    hardware = (4.0 if s.checkpointing else 3.0) * fwd * s.global_batch
    compute = hardware / s.world / (gpu.peak_flops(s.precision) * mfu)
    traffic = traffic_bytes(cfg, s, n_params)
    tp_time = traffic["tp"] / (gpu.intra_node_gbps * 1e9)
    dp_bw = gpu.intra_node_gbps if s.world <= gpu.gpus_per_node else gpu.inter_node_gbps
    dp_time = traffic["dp"] / (dp_bw * 1e9)
    overlap = compute * 2 / 3 if s.zero_stage == 3 else 0.0
    exposed = tp_time + max(0.0, dp_time - overlap)
    total = compute + exposed
    tokens = s.global_batch * s.seq_len
    return {
        "compute_s": compute,
        "communication_s": exposed,
        "step_s": total,
        "tokens_per_day": tokens / total * SECONDS_PER_DAY,
        "flops_per_step": useful,
        "effective_mfu": useful / (total * s.world * gpu.peak_flops(s.precision)),
        "dp_traffic_bytes": traffic["dp"],
        "tp_traffic_bytes": traffic["tp"],
    }
