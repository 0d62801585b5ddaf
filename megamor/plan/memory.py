"""Per-rank bytes of the model states (parameters, gradients, optimizer) and of the decode KV cache.

Parameter shapes come from the model itself, built on the `meta` device (exact, no memory), cut
by tensor parallelism as `megamor.parallel.tensor_parallel` cuts them (`shard_dim`). What the
DeepSpeed engines the trainer builds hold on one rank (DeepSpeed 0.19, measured against real
engines in tests/plan/test_memory.py), with n the parameters on the rank after TP, w the
parameter bytes (2 bf16, 4 fp32) and dp the data-parallel size:

                 parameters                   gradients        optimizer (AdamW)
    ZeRO-0 fp32  4n                           4n               8n    (two fp32 moments)
    ZeRO-0 bf16  2n                           2n               12n   (+ fp32 master copy)
    ZeRO-1       w n                          w n (*)          12n / dp (master + moments; fp32 too)
    ZeRO-2       w n                          w n / dp         12n / dp
    ZeRO-3       w n / dp + persistent        w n / dp         12n / dp

(*) ZeRO-1 holds the full gradients until the accumulation boundary, then keeps its partition.
ZeRO-3 keeps parameters smaller than `stage3_param_persistence_threshold` (default 1e5 elements)
whole on every rank (besides their partition, when dp > 1), and allocates a gradient bucket of `reduce_bucket_size` elements
(default 5e8: 1 GB in bf16) up front: the planner counts that as `buffers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megamor.model.config import ModelConfig
from megamor.model.flops import kv_cache_bytes_per_token
from megamor.model.mor import MoRLM
from megamor.parallel.tensor_parallel import shard_dim
from megamor.train.ds_keys import zero_knobs

PERSISTENCE_DEFAULT = 100_000  # DeepSpeed's stage3_param_persistence_threshold
REDUCE_BUCKET_DEFAULT = 500_000_000  # DeepSpeed's reduce_bucket_size
REUSE_DISTANCE_DEFAULT = 1_000_000_000  # DeepSpeed's stage3_max_reuse_distance
PREFETCH_BUCKET_DEFAULT = 50_000_000  # DeepSpeed's stage3_prefetch_bucket_size


def meta_model(cfg: ModelConfig) -> MoRLM:
    """The model built on the `meta` device (shapes only), once per config: ranking many
    layouts, or a 1.7B model, builds it once (dataclasses are not hashable: keyed by repr)."""
    key = repr(cfg)
    model = _META.get(key)
    if model is None:
        with torch.device("meta"):
            model = _META[key] = MoRLM(cfg)
    return model


_META: dict[str, MoRLM] = {}


def param_numels(cfg: ModelConfig, tp: int = 1) -> list[int]:
    """Elements of every distinct parameter on one TP rank (tied weights once)."""
    # named_parameters drops duplicates: a tied weight once.
    return [p.numel() // tp if shard_dim(name) is not None else p.numel()
            for name, p in meta_model(cfg).named_parameters()]


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed knobs that change the model-state bytes and the ZeRO traffic (from
    `deepspeed.config`; overlap_comm None: DeepSpeed's default, on for ZeRO-3 only)."""

    persistence_threshold: int = PERSISTENCE_DEFAULT
    reduce_bucket_size: int = REDUCE_BUCKET_DEFAULT
    max_reuse_distance: int = REUSE_DISTANCE_DEFAULT
    prefetch_bucket_size: int = PREFETCH_BUCKET_DEFAULT
    overlap_comm: bool | None = None

    @classmethod
    def from_raw(cls, raw: dict[str, Any], where: str = "deepspeed.config") -> ZeroSettings:
        """From a raw `deepspeed.config` (`where` names it in errors): training's own check
        (megamor.train.ds_keys.zero_knobs), so "auto" is DeepSpeed's default here too."""
        knobs = zero_knobs(raw, where)
        knobs["persistence_threshold"] = knobs.pop("param_persistence_threshold")
        return cls(**{k: v for k, v in knobs.items() if v is not None or k == "overlap_comm"})

    def overlaps(self, zero_stage: int) -> bool:
        """Whether gradient reduction runs on a side stream during the backward."""
        return zero_stage == 3 if self.overlap_comm is None else self.overlap_comm


def model_state_bytes(cfg: ModelConfig, precision: str, tp: int, dp: int, zero_stage: int,
                      zero: ZeroSettings | None = None) -> dict[str, float]:
    """{"params", "grads", "optimizer", "buffers", "n_params"} per rank (see the table above)."""
    zero = zero or ZeroSettings()
    numels = param_numels(cfg, tp)
    n = float(sum(numels))
    w = 2 if precision == "bf16" else 4
    buffers = 0.0
    if zero_stage == 3:
        # Small parameters stay whole on every rank, next to their partition (one rank: the
        # partition is the whole parameter, one storage).
        persistent = sum(k for k in numels if k < zero.persistence_threshold) if dp > 1 else 0
        params = w * n / dp + w * persistent
        buffers = float(zero.reduce_bucket_size * w)
    else:
        params = w * n
    grads = w * n / dp if zero_stage >= 2 else w * n
    # AdamW's two fp32 moments, plus a fp32 master copy except in plain fp32 ZeRO-0.
    optimizer = (8 if precision == "fp32" else 12) * n if zero_stage == 0 else 12 * n / dp
    return {"params": params, "grads": grads, "optimizer": optimizer, "buffers": buffers, "n_params": n}


def kv_cache_bytes(cfg: ModelConfig, batch: int, seq_len: int, tp: int = 1, bytes_per_value: int = 2) -> float:
    """Decode KV cache of `batch` sequences of `seq_len` tokens on one TP rank (KV heads split
    over TP), expected over the routed depths (megamor.model.flops.kv_cache_bytes_per_token)."""
    return kv_cache_bytes_per_token(cfg, bytes_per_value) * batch * seq_len / tp
