"""The DeepSpeed config dict, derived from the experiment config (batch sizes, ZeRO, precision,
clipping) with `deepspeed.config` merged on top for anything else DeepSpeed offers."""

from __future__ import annotations

import copy
from typing import Any

from megamor.train.config import ExperimentConfig, check_world


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def deepspeed_config(cfg: ExperimentConfig, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """world_size: all processes (DeepSpeed divides by the mpu's data-parallel size itself)."""
    gas = check_world(cfg, world_size)
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    ds: dict[str, Any] = {
        "train_batch_size": cfg.batch.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our AdamW subclass (skippable steps)
        "bf16": {"enabled": cfg.deepspeed.precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 1 << 30,  # megamor logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    return _merge(ds, cfg.deepspeed.config)
