"""Megatron-style tensor parallelism, applied to a built MoRLM from the outside.

`apply_tensor_parallel(model, group)` shards every physical layer in place: q/k/v and the
SwiGLU gate/up projections become column-parallel (each rank holds n_heads/tp query heads,
n_kv_heads/tp KV heads and d_ff/tp hidden units), o_proj and down_proj row-parallel (their
partial outputs are summed with one all-reduce). Shared recursion blocks are sharded once,
since they are one module object. Embeddings, norms, routers and the LM head stay replicated:
every TP rank sees the same tokens, so they receive identical gradients, and routing decisions
(made on replicated hidden states) agree across ranks without communication.

Shards are cut from the full weights, so a model built with one seed is the same function at
any TP size. Sharded parameters carry `model_parallel = True` (DeepSpeed's gradient clipping
uses it to count each shard once) and `tp_dim` (the sharded dimension, for consolidation).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the input gradient backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward; identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T, W sharded along output features."""

    def __init__(self, weight_shard: Tensor, group):
        super().__init__()
        self.weight = nn.Parameter(weight_shard)
        self.weight.model_parallel = True  # type: ignore[attr-defined]
        self.weight.tp_dim = 0  # type: ignore[attr-defined]
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(_CopyToTP.apply(x, self.group), self.weight)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local W_local^T, W sharded along input features."""

    def __init__(self, weight_shard: Tensor, group):
        super().__init__()
        self.weight = nn.Parameter(weight_shard)
        self.weight.model_parallel = True  # type: ignore[attr-defined]
        self.weight.tp_dim = 1  # type: ignore[attr-defined]
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        return _ReduceFromTP.apply(F.linear(x, self.weight), self.group)


def _shard(weight: Tensor, dim: int, rank: int, size: int) -> Tensor:
    return weight.detach().chunk(size, dim=dim)[rank].clone().contiguous()


def apply_tensor_parallel(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Shard `model.layers` across the ranks of `group` (default: the world) in place."""
    size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    cfg = model.cfg
    for name, value in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("d_ff", cfg.d_ff)):
        if value % size:
            raise ValueError(f"model.{name} = {value} is not divisible by the tensor-parallel size {size}")
    if size == 1:
        return model
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        hd = attn.head_dim
        for proj in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, proj, ColumnParallelLinear(_shard(getattr(attn, proj).weight, 0, rank, size), group))
        # Heads are contiguous blocks of head_dim rows, so chunking rows keeps heads whole.
        attn.o_proj = RowParallelLinear(_shard(attn.o_proj.weight, 1, rank, size), group)
        attn.n_heads //= size
        attn.n_kv_heads //= size
        assert attn.q_proj.weight.shape[0] == attn.n_heads * hd
        mlp.gate_proj = ColumnParallelLinear(_shard(mlp.gate_proj.weight, 0, rank, size), group)
        mlp.up_proj = ColumnParallelLinear(_shard(mlp.up_proj.weight, 0, rank, size), group)
        mlp.down_proj = RowParallelLinear(_shard(mlp.down_proj.weight, 1, rank, size), group)
    model.tensor_parallel_size = size
    return model


def is_tensor_parallel(param: Tensor) -> bool:
    return bool(getattr(param, "model_parallel", False))


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> dict[str, Tensor]:
    """The unsharded state dict (every rank gets it): shards are all-gathered along tp_dim."""
    params = dict(model.named_parameters())
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        p = params.get(name)
        if p is not None and is_tensor_parallel(p):
            parts = [torch.empty_like(p) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, p.detach().contiguous(), group=group)
            out[name] = torch.cat(parts, dim=p.tp_dim)  # type: ignore[attr-defined]
        else:
            out[name] = t.detach().clone()
    return out
