"""Process groups for tensor x data parallelism, in the `mpu` shape DeepSpeed expects.

Tensor-parallel groups are contiguous ranks (keep them inside a node: they talk every layer);
data-parallel groups are strided. With world 4 and tp 2: TP groups {0,1} {2,3}, DP {0,2} {1,3}.
"""

from __future__ import annotations

import torch.distributed as dist


class ModelParallelUnit:
    def __init__(self, tensor_parallel_size: int = 1):
        world, rank = dist.get_world_size(), dist.get_rank()
        tp = tensor_parallel_size
        if tp < 1 or world % tp:
            raise ValueError(f"tensor_parallel_size {tp} must divide the world size {world}")
        self.tp_size, self.dp_size = tp, world // tp
        self.tp_group = self.dp_group = None
        # Every rank must create every group, in the same order.
        for start in range(0, world, tp):
            ranks = list(range(start, start + tp))
            g = dist.new_group(ranks)
            if rank in ranks:
                self.tp_group, self.tp_ranks = g, ranks
        for offset in range(tp):
            ranks = list(range(offset, world, tp))
            g = dist.new_group(ranks)
            if rank in ranks:
                self.dp_group, self.dp_ranks = g, ranks

    # The Megatron/DeepSpeed interface.
    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.tp_group)

    def get_model_parallel_group(self):
        return self.tp_group

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    # Newer DeepSpeed versions also ask for these names.
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
