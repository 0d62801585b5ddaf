"""Out-of-place collectives for the tensor- and sequence-parallel autograd Functions.

They call torch's functional c10d ops (`torch.ops._c10d_functional`, what
`torch.distributed._functional_collectives` and DTensor use): eager they run the process
group's collective and wait for it; under torch.compile dynamo traces them into the graph as
ops, so a compiled tensor-parallel layer is one graph instead of being cut at every in-place
`dist.all_reduce` (which returns a Work object dynamo cannot trace). Gloo (CPU) and NCCL both
implement them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

_ops = torch.ops._c10d_functional


def _name(group) -> str:
    return (group or dist.group.WORLD).group_name


def all_reduce(x: Tensor, group, op: str = "sum") -> Tensor:
    return _ops.wait_tensor(_ops.all_reduce(x.contiguous(), op, _name(group)))


def all_gather(x: Tensor, dim: int, size: int, group) -> Tensor:
    """Concatenation along `dim` of every rank's x (rank order)."""
    out = _ops.wait_tensor(_ops.all_gather_into_tensor(x.movedim(dim, 0).contiguous(), size, _name(group)))
    return out.movedim(0, dim)


def reduce_scatter(x: Tensor, dim: int, size: int, group) -> Tensor:
    """This rank's 1/size slice along `dim` of the sum over ranks of x."""
    out = _ops.wait_tensor(_ops.reduce_scatter_tensor(x.movedim(dim, 0).contiguous(), "sum", size, _name(group)))
    return out.movedim(0, dim)


SEQ_DIM = 1


class TPGroup:
    """A tensor-parallel process group with its size and this rank's index, read once (not
    inside compiled code); gather / reduce_scatter / split act along the sequence dimension."""

    def __init__(self, group):
        self.group, self.size, self.rank = group, dist.get_world_size(group), dist.get_rank(group)

    def all_reduce(self, x: Tensor, op: str = "sum") -> Tensor:
        return all_reduce(x, self.group, op)

    def gather(self, x: Tensor) -> Tensor:
        return all_gather(x, SEQ_DIM, self.size, self.group)

    def reduce_scatter(self, x: Tensor) -> Tensor:
        self.check(x)
        return reduce_scatter(x, SEQ_DIM, self.size, self.group)

    def split(self, x: Tensor) -> Tensor:
        self.check(x)
        return x.chunk(self.size, dim=SEQ_DIM)[self.rank].contiguous()

    def check(self, x: Tensor) -> None:
        if x.shape[SEQ_DIM] % self.size:
            raise ValueError(f"sequence parallelism: length {x.shape[SEQ_DIM]} is not divisible by the TP size {self.size}")
