"""The language-model loss without full-precision logits for the whole batch.

`chunked_cross_entropy(h, weight, targets)` equals
`F.cross_entropy((h @ weight.T).float().flatten(0, 1), targets.flatten(), ignore_index=-100)`
in value and gradients, but only ever holds the logits of `chunk_tokens` tokens at a time:
each chunk's logits are computed in the compute dtype (bf16 under autocast), the log-softmax
in fp32, and the loss is accumulated in fp32. When gradients are needed, they are computed
chunk by chunk in the same pass (softmax - one-hot, scaled by 1 / number of targets), so the
backward pass only rescales them by the incoming gradient: no logits are kept for backward and
the LM head is not recomputed. Memory: one [chunk, V] fp32 block plus the gradients of h and
of the weight, instead of [B, T, V] in the compute dtype and again in fp32.

This is the model's `lm_loss`; tensor parallelism swaps in a vocab-parallel version with the
same signature (h [B, T, D] after the final norm, weight [V, D], targets [B, T] with -100 =
ignore) -> scalar mean over the non-ignored targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
# fp32 logits held at once: 256 MiB (1365 tokens at a 49,152 vocabulary).
CHUNK_BYTES = 1 << 28


def default_chunk_tokens(vocab_size: int) -> int:
    return max(128, CHUNK_BYTES // (4 * vocab_size))


def _chunk_terms(h: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logits in fp32 [n, V], log-sum-exp [n], target logit [n], valid [n]) of one chunk."""
    logits = (h @ weight.t()).float()  # the matmul runs in the compute dtype (autocast)
    lse = torch.logsumexp(logits, dim=-1)
    valid = targets != IGNORE_INDEX
    picked = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return logits, lse, picked, valid


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and its gradients in one chunked pass; backward only scales them."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        # At least 1: a micro-batch with every target ignored has loss 0 (its weight in the step is
        # 0 anyway), not 0/0 = NaN, which would skip the whole step. Stays a tensor: no host sync.
        n_targets = (targets != IGNORE_INDEX).sum().float().clamp(min=1)
        inv = 1.0 / n_targets
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s : s + chunk], targets[s : s + chunk]
            logits, lse, picked, valid = _chunk_terms(hc, weight, tc)
            loss_sum = loss_sum + ((lse - picked) * valid).sum()
            # d(mean loss)/d(logits) = (softmax - one_hot(target)) / n_targets, 0 for ignored rows.
            d = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place: one [chunk, V] fp32 block
            d.scatter_add_(1, tc.clamp(min=0).unsqueeze(1), -torch.ones_like(lse).unsqueeze(1))
            d.mul_((valid.float() * inv).unsqueeze(1))
            d = d.to(hc.dtype)  # the gradient matmuls run in the compute dtype too
            if grad_h is not None:
                grad_h[s : s + chunk] = d @ weight
            if grad_w is not None:
                grad_w += (d.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss_sum * inv

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def chunked_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int | None = None) -> Tensor:
    """Mean cross-entropy of the logits h @ weight.T against targets (-100 = ignored).

    h [B, T, D] (after the final norm), weight [V, D], targets [B, T]. fp32 accumulation;
    never more than `chunk_tokens` tokens' logits at once (default: 256 MiB of fp32 logits)."""
    d = h.shape[-1]
    h2, t2 = h.reshape(-1, d), targets.reshape(-1)
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    # Under autocast the matmuls run in the autocast dtype: do the chunk matmuls in it and
    # hand back gradients in the inputs' own dtypes.
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        with torch.autocast(h.device.type, enabled=False):
            return _apply(h2, weight, t2, chunk, dtype)
    return _apply(h2, weight, t2, chunk, None)


def _apply(h: Tensor, weight: Tensor, targets: Tensor, chunk: int, dtype: torch.dtype | None) -> Tensor:
    if dtype is not None:  # autograd casts the gradients back to h's and weight's dtypes
        h, weight = h.to(dtype), weight.to(dtype)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(h, weight, targets, chunk)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk):
        _, lse, picked, valid = _chunk_terms(h[s : s + chunk], weight, targets[s : s + chunk])
        total = total + ((lse - picked) * valid).sum()
    return total / (targets != IGNORE_INDEX).sum().float().clamp(min=1)  # none: 0, as in training


def cross_entropy_from_logits(logits: Tensor, targets: Tensor, chunk_tokens: int | None = None) -> Tensor:
    """Mean cross-entropy of given logits [B, T, V] (-100 = ignored), upcast to fp32 one chunk
    of tokens at a time rather than all at once (the whole saving without autograd; with
    autograd each chunk's fp32 log-softmax is kept for backward)."""
    V = logits.shape[-1]
    flat, t = logits.reshape(-1, V), targets.reshape(-1)
    chunk = chunk_tokens or default_chunk_tokens(V)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for s in range(0, flat.shape[0], chunk):
        total = total + F.cross_entropy(flat[s : s + chunk].float(), t[s : s + chunk], ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (t != IGNORE_INDEX).sum().float().clamp(min=1)  # none: 0, as in training
