"""Llama-style building blocks: RMSNorm, RoPE, grouped-query attention, SwiGLU, the block.

Attention works on *gathered* token subsets: every call carries the original positions of its
tokens (for RoPE and causality) and, when needed, validity and document ids. When a call is
plain causal self-attention over contiguous tokens, it takes the fast `is_causal` path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megamor.model.config import ModelConfig
from megamor.model.flex import flex_attend

try:  # optional GPU kernel
    from flash_attn import flash_attn_func  # type: ignore
except Exception:  # noqa: BLE001  # pragma: no cover - a broken CUDA build raises OSError/RuntimeError, not ImportError
    flash_attn_func = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 as HF Llama does, so bf16 runs match it.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables indexed by absolute position (rotate-half convention of HF Llama).

    Frequencies are recomputed in fp32 on every call rather than kept in a buffer, so casting
    the model to bf16 (`.to`, DeepSpeed) never rounds them."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.theta, self.max_seq_len = head_dim, theta, max_seq_len

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        freqs = positions.float().unsqueeze(-1) * inv_freq  # [B, n, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, n, hd]; cos/sin: [B, n, hd]."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class TokenMeta:
    """Where a (possibly gathered) run of tokens sits in the original sequences.

    positions: [B, n] absolute positions (RoPE, causality).
    valid:     [B, n] bool, False for padding slots; None means all valid.
    doc_ids:   [B, n] document ids; attention never crosses documents. None: no masking.
    causal_exact: as self-attention, a plain causal mask over the slot order gives every valid
                query exactly its allowed keys (contiguous unpadded tokens, or gathered tokens
                left-aligned in positional order with padding slots last, no documents).
    doc_mask_impl: how document masking runs: dense (a [B, 1, nq, nk] mask) or flex
                (FlexAttention, `megamor.model.flex`); gathered tokens keep their parent's.
    block_mask: the FlexAttention BlockMask this call attends with (set by the model for the
                call's key set, `flex.block_mask_for`); None: SDPA.
    """

    positions: Tensor
    valid: Tensor | None = None
    doc_ids: Tensor | None = None
    causal_exact: bool = False
    doc_mask_impl: str = "dense"
    block_mask: Any = None
    # flex.block_mask_for's cache, by key set; shared by dataclasses.replace copies
    block_masks: dict = field(default_factory=dict, repr=False, compare=False)

    def take(self, idx: Tensor, valid: Tensor | None) -> TokenMeta:
        """The meta of tokens gathered at idx [B, n]: left-aligned, in positional order, and
        never a slot that was invalid here (the router masks those out before gathering)."""
        pos = self.positions.gather(1, idx)
        v = valid
        if self.valid is not None:
            sv = self.valid.gather(1, idx)
            v = sv if v is None else (v & sv)
        doc = self.doc_ids.gather(1, idx) if self.doc_ids is not None else None
        return TokenMeta(pos, v, doc, causal_exact=doc is None, doc_mask_impl=self.doc_mask_impl)


@dataclass
class KVBlock:
    """Keys/values with the meta of the tokens they came from (attention context)."""

    k: Tensor  # [B, Hkv, n, hd]
    v: Tensor
    meta: TokenMeta


def attention_mask(q: TokenMeta, kv: TokenMeta) -> Tensor | None:
    """Boolean [B, 1, nq, nk] mask, or None when a plain causal mask is exact."""
    if q is kv and q.causal_exact:
        return None
    allowed = kv.positions.unsqueeze(1) <= q.positions.unsqueeze(2)
    if kv.valid is not None:
        allowed = allowed & kv.valid.unsqueeze(1)
    if q.doc_ids is not None and kv.doc_ids is not None:
        allowed = allowed & (q.doc_ids.unsqueeze(2) == kv.doc_ids.unsqueeze(1))
    # A query with nothing to attend to (a padding slot) would produce NaN; let it attend
    # everywhere instead. Its output is never used.
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed.unsqueeze(1)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
    if (
        flash_attn_func is not None
        and q.is_cuda
        and mask is None
        and q.dtype in (torch.float16, torch.bfloat16)
    ):
        # flash-attn wants [B, n, H, hd] and handles GQA itself.
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=is_causal)
        return out.transpose(1, 2)
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d = cfg.d_model
        bias = cfg.qkv_bias
        self.q_proj = nn.Linear(d, cfg.n_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, d, bias=False)
        # QK-norm (Qwen3): one RMSNorm over the head dimension, shared by all heads, before RoPE.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def project_q(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotated queries [B, H, n, hd] of x [B, n, D] (every path computes them here)."""
        B, n, _ = x.shape
        q = self.q_proj(x).view(B, n, self.n_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return apply_rope(q.transpose(1, 2), cos, sin)

    def project_kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        B, n, _ = x.shape
        k = self.k_proj(x).view(B, n, self.n_kv_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        v = self.v_proj(x).view(B, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k.transpose(1, 2), cos, sin), v

    def forward(
        self,
        x: Tensor,
        meta: TokenMeta,
        rope: tuple[Tensor, Tensor],
        context: KVBlock | None = None,
    ) -> tuple[Tensor, KVBlock]:
        """Attend from x's tokens. context: keys/values to attend to instead of x's own
        (a decoding cache that already holds x's keys, or a shared first-recursion KV).
        Returns the output and the keys/values x produced (or the context used)."""
        B, n, _ = x.shape
        cos, sin = rope
        q = self.project_q(x, cos, sin)
        if context is None:
            k, v = self.project_kv(x, cos, sin)
            context = KVBlock(k, v, meta)
        if meta.block_mask is not None:
            out = flex_attend(q, context.k, context.v, meta.block_mask)
        else:
            mask = attention_mask(meta, context.meta)
            out = sdpa(q, context.k, context.v, mask, is_causal=mask is None)
        out = out.transpose(1, 2).reshape(B, n, self.n_heads * self.head_dim)
        return self.o_proj(out), context


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(
        self, x: Tensor, meta: TokenMeta, rope: tuple[Tensor, Tensor], context: KVBlock | None = None
    ) -> tuple[Tensor, KVBlock]:
        a, kv = self.self_attn(self.input_layernorm(x), meta, rope, context)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), kv

    def kv_for(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """This layer's keys/values for inputs x (decoding caches call this before attending)."""
        return self.self_attn.project_kv(self.input_layernorm(x), *rope)
