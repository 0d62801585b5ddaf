"""Parallelism applied to a built model from outside (torchtitan-style): the tensor x data
process groups, tensor parallelism and sequence parallelism.

The model code holds none of this; the trainer calls `build_layout` once the process group
exists and `parallelize` on the freshly built (full, seeded) model before DeepSpeed wraps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import nn

from megamor.parallel.mpu import ModelParallelUnit
from megamor.parallel.sequence_parallel import apply_sequence_parallel
from megamor.parallel.tensor_parallel import apply_tensor_parallel


@dataclass
class Layout:
    """Where this rank sits in the tensor x data grid. mpu is None without TP (DeepSpeed then
    uses the world as the data-parallel group)."""

    world: int
    tp: int
    dp: int
    tp_rank: int
    dp_rank: int
    mpu: ModelParallelUnit | None
    sequence: bool = False  # parallel.sequence: the residual stream split along the sequence in each TP group

    @property
    def tp_group(self) -> Any:
        return self.mpu.get_model_parallel_group() if self.mpu else None

    @property
    def dp_group(self) -> Any:
        return self.mpu.get_data_parallel_group() if self.mpu else None


def build_layout(tensor: int, world: int, rank: int, sequence: bool = False) -> Layout:
    """TP groups are contiguous ranks (inside a node with srun/torchrun block placement), DP
    groups strided. Every rank must call this (group creation is collective)."""
    if tensor == 1 or not dist.is_initialized():
        return Layout(world, 1, world, 0, rank, None)
    mpu = ModelParallelUnit(tensor_parallel_size=tensor)
    return Layout(world, tensor, mpu.dp_size, mpu.get_model_parallel_rank(), mpu.get_data_parallel_rank(), mpu,
                  sequence)


def parallelize(model: nn.Module, layout: Layout) -> nn.Module:
    """Tensor (and sequence) parallelism on the freshly built (full, seeded) model; activation
    checkpointing, compile and the ZeRO-3 registration follow in megamor.train.engine.prepare_model."""
    if layout.tp > 1:
        apply_tensor_parallel(model, layout.tp_group)
        if layout.sequence:
            apply_sequence_parallel(model, layout.tp_group)
    return model
