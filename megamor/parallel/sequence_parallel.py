"""Megatron-style sequence parallelism on top of tensor parallelism, applied from outside.

`apply_sequence_parallel(model, group)` (after `apply_tensor_parallel` with the same group)
splits the residual stream along the sequence across the TP group: between tensor-parallel
regions every rank holds tokens [r T/N, (r+1) T/N) of every sequence, so the norms, the
residual adds, the router networks and the saved activations of all of them cost 1/N per rank.

The boundaries (forward / backward):
- embedding: the vocab-parallel partial sums are reduce-scattered along the sequence (instead
  of all-reduced) / all-gather;
- attention and MLP of every layer application (module hooks, so state-dict keys do not
  change): all-gather of the normed input before the column-parallel projections /
  reduce-scatter of its gradient; reduce-scatter of the row-parallel partial output /
  all-gather. The projections keep the local slice for backward and all-gather it again there
  (Megatron's trade: one more all-gather per projection in backward for 1/N of the saved
  input). Attention itself sees the whole sequence (and the whole TokenMeta: positions for
  RoPE, validity, document ids), as without SP;
- routers: each rank computes its tokens' logits (the router network runs on the local slice)
  and only the logits are all-gathered ([B, T] or [B, T, N_r], tiny), so expert choice's
  per-sequence top-k, token choice's argmax, the causal threshold, the auxiliary losses and
  the learned-threshold / balancing statistics are computed on the full sequence, identically
  on every rank: routing is exactly the one-process routing;
- a recursion step over routed tokens (`MoRLM._run_step` through `model.seq_layout`): `take`
  all-gathers the residual stream, gathers the routed tokens into [B, n] slots in positional
  order (n rounded up to a multiple of N with padding slots, which attention masks and the
  scatter drops) and keeps this rank's n/N slots; the step's layers run sequence-parallel on
  those slots (attention all-gathers them, so each routed token attends to every earlier
  routed token of its sequence, at its original RoPE position); `put` all-gathers the slots,
  scatters them into the full stream at their positions and keeps this rank's slice. The full
  stream is transient (take/put keep only the indices for backward), and only routed tokens
  enter the step's layers;
- loss and logits: the final norm runs on the slice; the vocab-parallel loss (or head)
  all-gathers the normed hidden states first / reduce-scatter.

Gradients: a tensor every rank holds whole carries its full gradient on every rank (the
replicated router, gate and scatter computations run identically everywhere), so the
"replicated" gathers backward to a slice and the splits backward to an all-gather; a gather
feeding column-parallel projections backward to a reduce-scatter (Megatron's rule). The
weights used on sequence slices (every RMSNorm, the router networks) receive partial
gradients per rank: a gradient hook all-reduces them over the TP group before DeepSpeed sees
them, so they stay identical across the group. The gate scale (router.learn_alpha) acts on
the gathered logits and already gets the full gradient.

Not for decoding: a KV-cache forward feeds one token at a time; decode with the TP-only model
(the weights are the same: SP adds no parameters), which the decoding engine runs sharded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megamor.parallel import collectives
from megamor.parallel.collectives import TPGroup


class _GatherToTP(torch.autograd.Function):
    """All-gather along the sequence into a tensor-parallel region; reduce-scatter backward
    (each rank's column-parallel shard contributes part of the input gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, tp: TPGroup) -> Tensor:
        ctx.tp = tp
        return tp.gather(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.tp.reduce_scatter(grad), None


class _ReduceScatterFromTP(torch.autograd.Function):
    """Sum of the row-parallel partial outputs, this rank's sequence slice of it; all-gather backward."""

    @staticmethod
    def forward(ctx, x: Tensor, tp: TPGroup) -> Tensor:
        ctx.tp = tp
        return tp.reduce_scatter(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.tp.gather(grad), None


class _GatherReplicated(torch.autograd.Function):
    """All-gather along the sequence into a computation every rank runs identically; backward:
    this rank's slice of the (full, identical) gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, tp: TPGroup) -> Tensor:
        ctx.tp = tp
        return tp.gather(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.tp.split(grad), None


class _Split(torch.autograd.Function):
    """This rank's sequence slice of a tensor every rank holds whole; all-gather backward (the
    whole tensor's gradient, on every rank)."""

    @staticmethod
    def forward(ctx, x: Tensor, tp: TPGroup) -> Tensor:
        ctx.tp = tp
        return tp.split(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.tp.gather(grad), None


class _RegatherLinear(torch.autograd.Function):
    """y = x_full W^T for a column-parallel projection whose input x_full is the all-gather of
    `local`: keeps `local` (1/N of x_full) for backward and all-gathers it again for the weight
    gradient. The input gradient flows to x_full (whose gather reduce-scatters it)."""

    @staticmethod
    def forward(ctx, full: Tensor, local: Tensor, weight: Tensor, tp: TPGroup) -> Tensor:
        ctx.tp = tp
        ctx.save_for_backward(local, weight)
        return torch.nn.functional.linear(full, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        local, weight = ctx.saved_tensors
        full = ctx.tp.gather(local)
        grad_w = grad.reshape(-1, grad.shape[-1]).t().matmul(full.reshape(-1, full.shape[-1]))
        return grad.matmul(weight), None, grad_w, None


def column_linear(x: Tensor, weight: Tensor, tp: TPGroup) -> Tensor:
    """A sequence-parallel column-parallel projection of x (all-gathered by the block's hook)."""
    local = getattr(x, "sp_local", None)
    if local is None:
        return torch.nn.functional.linear(x, weight)
    return _RegatherLinear.apply(x, local, weight, tp)


def gather_for_columns(x: Tensor, tp: TPGroup) -> Tensor:
    """x all-gathered along the sequence for column-parallel projections (`column_linear`),
    which keep the local slice x for backward and gather it again there (Megatron's rule),
    not the gathered copy. Compiled layers leave what to keep to AOT autograd's partitioner."""
    full = gather_to_tp(x, tp)
    if not torch.compiler.is_compiling():
        full.sp_local = x
    return full


def gather_to_tp(x: Tensor, tp: TPGroup) -> Tensor:
    return _GatherToTP.apply(x, tp)


def reduce_scatter_from_tp(x: Tensor, tp: TPGroup) -> Tensor:
    return _ReduceScatterFromTP.apply(x, tp)


def _rows(idx: Tensor, d: int) -> Tensor:
    return idx.unsqueeze(-1).expand(-1, -1, d)


class _TakeRows(torch.autograd.Function):
    """Routed rows idx [B, n] of the sequence-split stream -> this rank's n/N slots. Saves only
    idx (a plain gather from the all-gathered stream would keep the whole stream for backward)."""

    @staticmethod
    def forward(ctx, h: Tensor, idx: Tensor, tp: TPGroup) -> Tensor:
        ctx.tp, ctx.length = tp, h.shape[1] * tp.size
        ctx.save_for_backward(idx)
        return tp.split(tp.gather(h).gather(1, _rows(idx, h.shape[-1])))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (idx,) = ctx.saved_tensors
        g = ctx.tp.gather(grad)  # every slot's gradient, identical on every rank
        full = g.new_zeros(g.shape[0], ctx.length, g.shape[-1]).scatter_add_(1, _rows(idx, g.shape[-1]), g)
        return ctx.tp.split(full), None, None


class _PutRows(torch.autograd.Function):
    """The sequence-split stream with routed rows idx replaced by the slots y (each rank holding
    n/N of them) -> this rank's slice again. Saves only idx."""

    @staticmethod
    def forward(ctx, h: Tensor, y: Tensor, idx: Tensor, tp: TPGroup) -> Tensor:
        ctx.tp = tp
        ctx.save_for_backward(idx)
        return tp.split(tp.gather(h).scatter(1, _rows(idx, h.shape[-1]), tp.gather(y)))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (idx,) = ctx.saved_tensors
        tp, rows = ctx.tp, _rows(idx, grad.shape[-1])
        g = tp.gather(grad)
        return tp.split(g.scatter(1, rows, 0.0)), tp.split(g.gather(1, rows)), None, None


class ShardedSequence:
    """`MoRLM.seq_layout` under sequence parallelism (see `megamor.model.mor.SequenceLayout`)."""

    def __init__(self, tp: TPGroup):
        self.tp = tp
        self.multiple = tp.size

    def take(self, h: Tensor, idx: Tensor) -> Tensor:
        return _TakeRows.apply(h, idx, self.tp)

    def put(self, h: Tensor, idx: Tensor, y: Tensor) -> Tensor:
        return _PutRows.apply(h, y, idx, self.tp)

    def local(self, x: Tensor) -> Tensor:
        return _Split.apply(x, self.tp)


def _all_reduce_grad(group):
    def hook(grad: Tensor) -> Tensor:
        return collectives.all_reduce(grad, group)

    return hook


def _gather_input_hook(tp: TPGroup):
    def pre(module: nn.Module, args: tuple) -> tuple:
        return (gather_for_columns(args[0], tp), *args[1:])

    return pre


def _scatter_output_hook(tp: TPGroup):
    def post(module: nn.Module, args: tuple, out):
        if isinstance(out, tuple):
            return (reduce_scatter_from_tp(out[0], tp), *out[1:])
        return reduce_scatter_from_tp(out, tp)

    return post


def _gather_logits_hook(tp: TPGroup):
    def post(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        return _GatherReplicated.apply(out, tp)

    return post


def apply_sequence_parallel(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Turn a tensor-parallel model (`apply_tensor_parallel(model, group)`) sequence-parallel
    in place. State-dict keys and parameters are unchanged (hooks and flags only), so
    checkpoints, consolidation and exports are the TP model's."""
    tp = TPGroup(group)
    size = tp.size
    if getattr(model, "tensor_parallel_size", 1) != size or size == 1:
        raise ValueError(f"sequence parallelism needs a tensor-parallel model of size {size} > 1 (apply_tensor_parallel first)")
    synced: dict[int, nn.Parameter] = {}
    for layer in model.layers:
        for block in (layer.self_attn, layer.mlp):
            block.register_forward_pre_hook(_gather_input_hook(tp))
            block.register_forward_hook(_scatter_output_hook(tp))
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                     layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj, layer.self_attn.o_proj):
            proj.sequence_parallel = True  # the hooks do their communication
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            synced[id(norm.weight)] = norm.weight
    synced[id(model.norm.weight)] = model.norm.weight
    routers = list(model.routers or []) + ([model.depth_router] if model.depth_router is not None else [])
    for router in routers:
        router.net.register_forward_hook(_gather_logits_hook(tp))
        for p in router.net.parameters():
            synced[id(p)] = p
    for p in synced.values():
        p.register_hook(_all_reduce_grad(group))
        p.sequence_parallel = True  # type: ignore[attr-defined]
    model.embed_tokens.sequence_parallel = True
    model.lm_head.sequence_parallel = True
    model.lm_loss.keywords["sequence_parallel"] = True  # the vocab-parallel loss (functools.partial)
    model.seq_layout = ShardedSequence(tp)
    model.sequence_parallel = True
    return model


def sequence_length_error(seq_len: int, tp: int) -> str | None:
    if seq_len % tp:
        return f"{seq_len} is not divisible by parallel.tensor={tp} (parallel.sequence splits every sequence across the TP group)"
    return None
