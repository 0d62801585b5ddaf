"""One layout's plan: per-rank memory, whether it fits, and its predicted speed.

    plan_layout(exp, Layout(world=32, tp=2, zero_stage=1, micro_batch=8, checkpointing=True), gpu, mfu=0.4)

Memory per rank = parameters + gradients + optimizer states + DeepSpeed buffers (ZeRO-3's
gradient bucket) + ZeRO-3's gathered parameters (the most its coordinator holds gathered at once,
megamor.plan.zero3, plus one prefetch bucket) + activations of one micro-batch (megamor.plan.activations: what the forward
saves for backward) + with checkpointing, one layer application's recompute during the
backward. The layout fits when that total stays under the GPU's memory less `headroom` (default
10%: the CUDA context, the allocator's fragmentation, communication buffers and transient
tensors such as the loss' [chunk, V] logits block are not modelled).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from megamor.config import ConfigError
from megamor.parallel.tensor_parallel import layout_errors
from megamor.plan.activations import ActivationSpec, activation_bytes, recompute_bytes
from megamor.plan.hardware import GPU
from megamor.plan.memory import ZeroSettings, kv_cache_bytes, model_state_bytes
from megamor.plan.speed import DEFAULT_OVERLAP, StepShape, step_time
from megamor.plan.zero3 import zero3_traffic
from megamor.train.config import TP_ZERO_STAGES, ExperimentConfig

DEFAULT_HEADROOM = 0.10


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    zero_stage: int
    micro_batch: int
    checkpointing: bool
    sequence_parallel: bool = False

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @classmethod
    def of(cls, exp: ExperimentConfig, world: int) -> Layout:
        return cls(world, exp.parallel.tensor, exp.deepspeed.zero_stage, exp.batch.micro_batch_size,
                   exp.trainer.activation_checkpointing, bool(getattr(exp.parallel, "sequence", False)))

    def describe(self) -> str:
        sp = "+SP" if self.sequence_parallel else ""
        return (f"TP {self.tp}{sp} x DP {self.dp}, ZeRO-{self.zero_stage}, micro {self.micro_batch}, "
                f"checkpointing {'on' if self.checkpointing else 'off'}")


def check_layout(exp: ExperimentConfig, layout: Layout) -> None:
    """ConfigError (one line, naming the key and the numbers) for a layout that cannot run."""
    if layout.world < 1:
        raise ConfigError("--world", f"must be >= 1, got {layout.world}")
    if layout.tp < 1 or layout.world % layout.tp:
        raise ConfigError("parallel.tensor", f"{layout.tp} does not divide the world size {layout.world}")
    for k, msg in layout_errors(exp.model, layout.tp):
        raise ConfigError(k, msg)
    if layout.tp > 1 and layout.zero_stage not in TP_ZERO_STAGES:
        raise ConfigError("deepspeed.zero_stage", f"ZeRO-{layout.zero_stage} does not run with parallel.tensor={layout.tp} "
                                                  f"(stages {TP_ZERO_STAGES})")
    per_step = layout.micro_batch * layout.dp
    if exp.batch.global_batch_size % per_step:
        raise ConfigError("batch.global_batch_size", f"{exp.batch.global_batch_size} is not divisible by micro_batch_size "
                                                     f"{layout.micro_batch} x data-parallel size {layout.dp} = {per_step}")


def plan_layout(exp: ExperimentConfig, layout: Layout, gpu: GPU, mfu: float, headroom: float = DEFAULT_HEADROOM,
                attention: str = "sdpa", decode_batch: int | None = None,
                overlap: float = DEFAULT_OVERLAP) -> dict[str, Any]:
    check_layout(exp, layout)
    cfg, precision, T = exp.model, exp.deepspeed.precision, exp.data.seq_len
    zero = ZeroSettings.from_raw(exp.deepspeed.config)
    states = model_state_bytes(cfg, precision, layout.tp, layout.dp, layout.zero_stage, zero)
    gathered = 0.0
    if layout.zero_stage == 3 and layout.dp > 1:
        peak = zero3_traffic(cfg, layout.checkpointing, zero).peak_gathered_elements
        gathered = (peak + zero.prefetch_bucket_size) * (2 if precision == "bf16" else 4)
    # trainer.doc_mask_impl flex keeps no [B, 1, n, n] mask on a GPU (megamor.model.flex)
    dense_mask = exp.data.document_masking and exp.trainer.doc_mask_impl == "dense"
    spec = ActivationSpec(layout.micro_batch, T, precision, layout.checkpointing, layout.tp,
                          layout.sequence_parallel, attention, document_masking=dense_mask)
    acts = activation_bytes(cfg, spec)
    recompute = recompute_bytes(cfg, spec)
    total = states["params"] + states["grads"] + states["optimizer"] + states["buffers"] + gathered + acts["total"] + recompute
    usable = gpu.memory_bytes * (1.0 - headroom)
    shape = StepShape(exp.batch.global_batch_size, layout.micro_batch, T, layout.world, layout.tp, layout.zero_stage,
                      layout.checkpointing, precision)
    speed = step_time(cfg, shape, gpu, mfu, states["n_params"], zero, overlap)
    decode_b = decode_batch or layout.micro_batch
    return {
        "layout": {**asdict(layout), "dp": layout.dp, "accumulation": shape.accumulation},
        "per_rank": {
            "params_bytes": states["params"],
            "grads_bytes": states["grads"],
            "optimizer_bytes": states["optimizer"],
            "buffers_bytes": states["buffers"],
            "gathered_bytes": gathered,
            "activation_bytes": acts["total"],
            "recompute_bytes": recompute,
            "total_bytes": total,
            "activation_parts": {k: v for k, v in acts.items() if k != "total"},
            "params_on_rank": states["n_params"],
        },
        "kv_cache": {"batch": decode_b, "seq_len": T, "bytes_per_rank": kv_cache_bytes(cfg, decode_b, T, layout.tp)},
        "fits": total <= usable,
        "usable_bytes": usable,
        "speed": speed,
    }
