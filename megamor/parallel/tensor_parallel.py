"""Megatron-style tensor parallelism, applied to a built MoRLM from the outside.

`apply_tensor_parallel(model, group)` shards the model in place:
- every physical layer: q/k/v and the SwiGLU gate/up projections become column-parallel (each
  rank holds n_heads/tp query heads, n_kv_heads/tp KV heads and d_ff/tp hidden units), o_proj
  and down_proj row-parallel (their partial outputs are summed with one all-reduce). Shared
  recursion blocks are sharded once, since they are one module object;
- the embedding and the LM head become vocab-parallel (rank r holds rows [r V/tp, (r+1) V/tp);
  tied embeddings stay one parameter), and `model.lm_loss` becomes a vocab-parallel cross
  entropy: all-reduce of the max, of the target logit and of the sum of exponentials, so the
  training loss never materialises [B, T, V] on any rank. Only an explicit `return_logits`
  forward (decoding, scoring) all-gathers the logits.
Norms and routers stay replicated: every TP rank sees the same tokens and the same (all-reduced)
hidden states, so they receive identical gradients and routing decisions agree across ranks
without communication. `megamor.parallel.sequence_parallel` splits them along the sequence
instead (parallel.sequence); the layers here then leave their communication to its hooks
(`sequence_parallel = True`).

Shards are cut from the full weights, so a model built with one seed is the same function at
any TP size. Sharded parameters carry `model_parallel = True` (DeepSpeed's gradient clipping
uses it to count each shard once) and `tp_dim` (the sharded dimension, for consolidation);
`shard_dim(name)` gives the same answer from a state-dict key, for merging saved shards.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from megamor.parallel import collectives
from megamor.parallel.collectives import TPGroup
from megamor.parallel.sequence_parallel import column_linear, gather_for_columns, reduce_scatter_from_tp


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the input gradient backward."""

    @staticmethod
    def forward(ctx, x: Tensor, tp: TPGroup) -> Tensor:
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.tp.all_reduce(grad), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward; identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor, tp: TPGroup) -> Tensor:
        return tp.all_reduce(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T, W sharded along output features. Under sequence parallelism x
    arrives all-gathered (whose backward already reduce-scatters the input gradient)."""

    def __init__(self, weight_shard: Tensor, group):
        super().__init__()
        self.weight = nn.Parameter(weight_shard)
        self.weight.model_parallel = True  # type: ignore[attr-defined]
        self.weight.tp_dim = 0  # type: ignore[attr-defined]
        self.group = group
        self.sequence_parallel = False

    def forward(self, x: Tensor) -> Tensor:
        if self.sequence_parallel:
            return column_linear(x, self.weight, self.group)
        return F.linear(_CopyToTP.apply(x, self.group), self.weight)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local W_local^T, W sharded along input features. Under sequence
    parallelism the partial sums leave unreduced (the block's hook reduce-scatters them)."""

    def __init__(self, weight_shard: Tensor, group):
        super().__init__()
        self.weight = nn.Parameter(weight_shard)
        self.weight.model_parallel = True  # type: ignore[attr-defined]
        self.weight.tp_dim = 1  # type: ignore[attr-defined]
        self.group = group
        self.sequence_parallel = False

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        return y if self.sequence_parallel else _ReduceFromTP.apply(y, self.group)


class _GatherFromTP(torch.autograd.Function):
    """All-gather along the last dimension forward; this rank's slice of the gradient backward."""

    @staticmethod
    def forward(ctx, x: Tensor, tp: TPGroup) -> Tensor:
        ctx.tp = tp
        return collectives.all_gather(x, x.dim() - 1, tp.size, tp.group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.chunk(ctx.tp.size, dim=-1)[ctx.tp.rank].contiguous(), None


def _mark(p: nn.Parameter, dim: int) -> nn.Parameter:
    p.model_parallel = True  # type: ignore[attr-defined]
    p.tp_dim = dim  # type: ignore[attr-defined]
    return p


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + V/tp) of the embedding; ids outside the range contribute zeros and
    one all-reduce sums the ranks' contributions (a reduce-scatter along the sequence under
    sequence parallelism: each rank keeps its slice of the residual stream)."""

    def __init__(self, weight_shard: Tensor, vocab_start: int, group):
        super().__init__()
        self.weight = _mark(nn.Parameter(weight_shard), 0)
        self.weight.is_embedding = True  # type: ignore[attr-defined]  # optimizer: no weight decay
        self.vocab_start, self.group = vocab_start, group
        self.sequence_parallel = False

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_from_tp(out, self.group)
        return _ReduceFromTP.apply(out, self.group)


class VocabParallelLMHead(nn.Module):
    """Logits for this rank's vocabulary slice, all-gathered into [.., V]. Training never calls
    it (the loss goes through `vocab_parallel_cross_entropy`); decoding and scoring do."""

    def __init__(self, weight: nn.Parameter, group):
        super().__init__()
        self.weight = weight  # the embedding's shard when tied
        self.group = group
        self.sequence_parallel = False  # h is this rank's sequence slice: all-gather it first

    def forward(self, h: Tensor) -> Tensor:
        if self.sequence_parallel:
            return _GatherFromTP.apply(column_linear(gather_for_columns(h, self.group), self.weight, self.group), self.group)
        return _GatherFromTP.apply(F.linear(_CopyToTP.apply(h, self.group), self.weight), self.group)


class _VocabParallelCE(torch.autograd.Function):
    """Mean cross entropy over targets != -100 from vocab-sharded fp32 logits [N, V/tp]."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, vocab_start: int, tp: TPGroup) -> Tensor:
        n_local = logits.shape[-1]
        m = tp.all_reduce(logits.max(dim=-1).values, "max")
        z = logits - m.unsqueeze(-1)
        local = targets - vocab_start
        mine = (local >= 0) & (local < n_local)
        local = local.masked_fill(~mine, 0)
        target_logit = z.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        exp = z.exp()
        sum_exp = exp.sum(-1)
        both = tp.all_reduce(torch.stack([target_logit, sum_exp]))
        target_logit, sum_exp = both[0], both[1]
        valid = targets != -100
        count = valid.sum().clamp(min=1).to(logits.dtype)
        loss = ((sum_exp.log() - target_logit) * valid).sum() / count
        exp.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(exp, local, mine & valid, valid, count)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        softmax, local, hit, valid, count = ctx.saved_tensors
        g = softmax
        g.scatter_add_(-1, local.unsqueeze(-1), -hit.unsqueeze(-1).to(g.dtype))
        g.mul_((valid.to(g.dtype) * (grad / count)).unsqueeze(-1))
        return g, None, None, None


def vocab_parallel_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, vocab_start: int, group: TPGroup,
                                 sequence_parallel: bool = False) -> Tensor:
    """The `MoRLM.lm_loss` of a tensor-parallel model: h [B, T, D] (replicated; with
    sequence_parallel this rank's [B, T/tp, D] slice, all-gathered here), weight this rank's
    [V/tp, D] rows, targets [B, T] (-100 ignored) -> mean loss, equal on every rank."""
    if sequence_parallel:
        logits = column_linear(gather_for_columns(h, group), weight, group).float()
    else:
        logits = F.linear(_CopyToTP.apply(h, group), weight).float()
    return _VocabParallelCE.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), vocab_start, group)


def shard_dim(name: str) -> int | None:
    """The dimension a parameter (by state-dict key) is sharded along under TP; None: replicated."""
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight",
                      "embed_tokens.weight", "lm_head.weight")):
        return 0
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return 1
    return None


def layout_errors(cfg, tp: int) -> list[tuple[str, str]]:
    """(config key, message) for every model dimension a TP size cannot split. The vocabulary is
    never padded to suit TP (the model must be the same function at any TP size)."""
    errors = []
    for name in ("n_heads", "n_kv_heads", "d_ff", "vocab_size"):
        value = getattr(cfg, name)
        if value % tp:
            hint = " (pad the vocabulary to a multiple of 128 in the model config)" if name == "vocab_size" else ""
            errors.append((f"model.{name}", f"{value} is not divisible by the tensor-parallel size parallel.tensor={tp}{hint}"))
    if tp > 1 and getattr(cfg, "qkv_bias", False):
        errors.append(("model.qkv_bias", f"tensor parallelism (parallel.tensor={tp}) does not shard q/k/v biases"))
    if tp > 1 and getattr(cfg, "qk_norm", False):  # each rank's heads would give its replicated norm another gradient
        errors.append(("model.qk_norm", f"tensor parallelism (parallel.tensor={tp}) does not reduce the QK-norm's gradients"))
    return errors


def _shard(weight: Tensor, dim: int, rank: int, size: int) -> Tensor:
    return weight.detach().chunk(size, dim=dim)[rank].clone().contiguous()


def apply_tensor_parallel(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Shard `model` across the ranks of `group` (default: the world) in place."""
    tp = TPGroup(group)
    size, rank = tp.size, tp.rank
    cfg = model.cfg
    errors = layout_errors(cfg, size)
    if errors:
        raise ValueError("; ".join(f"{k} = {msg}" for k, msg in errors))
    if size == 1:
        return model
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        hd = attn.head_dim
        for proj in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, proj, ColumnParallelLinear(_shard(getattr(attn, proj).weight, 0, rank, size), tp))
        # Heads are contiguous blocks of head_dim rows, so chunking rows keeps heads whole.
        attn.o_proj = RowParallelLinear(_shard(attn.o_proj.weight, 1, rank, size), tp)
        attn.n_heads //= size
        attn.n_kv_heads //= size
        assert attn.q_proj.weight.shape[0] == attn.n_heads * hd
        mlp.gate_proj = ColumnParallelLinear(_shard(mlp.gate_proj.weight, 0, rank, size), tp)
        mlp.up_proj = ColumnParallelLinear(_shard(mlp.up_proj.weight, 0, rank, size), tp)
        mlp.down_proj = RowParallelLinear(_shard(mlp.down_proj.weight, 1, rank, size), tp)
    start = rank * cfg.vocab_size // size
    tied = model.lm_head.weight is model.embed_tokens.weight
    model.embed_tokens = VocabParallelEmbedding(_shard(model.embed_tokens.weight, 0, rank, size), start, tp)
    head = model.embed_tokens.weight if tied else _mark(nn.Parameter(_shard(model.lm_head.weight, 0, rank, size)), 0)
    model.lm_head = VocabParallelLMHead(head, tp)
    model.lm_loss = functools.partial(vocab_parallel_cross_entropy, vocab_start=start, group=tp)
    model.tensor_parallel_size = size
    return model


def is_tensor_parallel(param: Tensor) -> bool:
    return bool(getattr(param, "model_parallel", False))


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, group: dist.ProcessGroup | None = None) -> dict[str, Tensor]:
    """The unsharded state dict (every rank gets it): shards are all-gathered along tp_dim."""
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under both names
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


def merge_shards(shards: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """One full state dict from the per-TP-rank state dicts (in TP-rank order) of a checkpoint."""
    if len(shards) == 1:
        return dict(shards[0])
    out: dict[str, Tensor] = {}
    for name, t in shards[0].items():
        if any(name not in s for s in shards):
            continue  # a tied alias (lm_head.weight) some consolidations drop: the loaders re-tie it
        dim = shard_dim(name)
        out[name] = t if dim is None else torch.cat([s[name] for s in shards], dim=dim)
    return out
