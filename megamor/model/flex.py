"""Document masking without a dense mask: FlexAttention with a block mask built from the
tokens' document ids, positions and validity (`trainer.doc_mask_impl: flex`).

The dense path (`layers.attention_mask`) builds a boolean [B, 1, nq, nk] mask per layer
application, which SDPA turns into an additive float mask and keeps for backward (about
5 B nq nk per application), and which keeps SDPA off its flash kernel on a GPU. FlexAttention
takes a `BlockMask` instead: per (128 x 128) tile, whether it is empty, full or partial, plus a
`mask_mod` evaluated inside the kernel for the partial tiles. One block mask serves every layer
of a token set: the full sequence (prelude and coda layers, recursion steps every token runs)
or one recursion step's gathered tokens (their positions, document ids and slot validity are
gathered with them, `TokenMeta.take`). `block_mask_for` caches it on the query meta, so a step
of several layers (and the activation-checkpoint recompute) builds it once.

Where FlexAttention cannot serve, the dense path runs (`flex_unusable` says why):
- torch without `torch.nn.attention.flex_attention` (< 2.5);
- CPU with gradients: torch's FlexAttention has no CPU backward (2.11 and 2.13 raise
  "FlexAttention does not support backward on CPU"), so CPU training stays dense and CPU
  evaluation / validation (no gradients) runs flex;
- a decoding cache (queries of one token against a growing cache: nothing to gain, and a
  compile per length). Caches build their own `TokenMeta`, which keeps the dense default.

A query slot with no allowed key (a padding slot of a gathered step, whose output is thrown
away) gets zeros here, where the dense path lets it attend everywhere; every valid token's
output is the same (tests/model/test_flex.py).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from typing import Any, Protocol

import torch
from torch import Tensor

# torch >= 2.5 has it (the GPU image's 2.11 and this machine's 2.13 both do). Imported on first
# use, not here: it imports torch._dynamo, a large share of every process's start-up
# (trainer, evaluation, export CLIs) that most runs never need.
FLEX_MODULE = "torch.nn.attention.flex_attention"

DOC_MASK_IMPLS = ("dense", "flex")


class TokenMeta(Protocol):
    """What this module reads of `layers.TokenMeta` (which imports this module)."""

    positions: Tensor
    valid: Tensor | None
    doc_ids: Tensor | None
    doc_mask_impl: str
    block_masks: dict
_compiled: Any = None
_compiled_mask: Any = None
_own_graph: Any = None
_noted: set[str] = set()


@functools.cache  # asked on every document-masked forward (wants_flex)
def _flex_available() -> bool:
    try:
        return importlib.util.find_spec(FLEX_MODULE) is not None
    except ImportError:  # pragma: no cover - torch without torch.nn.attention
        return False


def flex_unusable(device: torch.device, needs_grad: bool) -> str | None:
    """Why FlexAttention cannot run attention here (None when it can)."""
    if not _flex_available():
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (needs >= 2.5)"
    if device.type == "cpu" and needs_grad:
        return "torch's FlexAttention has no CPU backward"
    return None


def wants_flex(meta: TokenMeta, device: torch.device) -> bool:
    """Whether this forward's attention over meta's tokens runs FlexAttention (the one rule)."""
    if meta.doc_mask_impl != "flex" or meta.doc_ids is None:
        return False
    why = flex_unusable(device, torch.is_grad_enabled())
    if why is not None:
        if why not in _noted:  # once per process and reason
            _noted.add(why)
            print(f"megamor: note: doc_mask_impl flex: {why}; these forwards use the dense mask", file=sys.stderr)
        return False
    return True


def block_mask_for(q: TokenMeta, kv: TokenMeta) -> Any:
    """The BlockMask of q's tokens attending to kv's: same document, key position <= query
    position, valid key (the dense mask's rule). Cached on q per kv token set."""
    hit = q.block_masks.get(id(kv))
    if hit is not None and hit[0] is kv:
        return hit[1]
    assert q.doc_ids is not None and kv.doc_ids is not None
    q_pos, kv_pos, q_doc, kv_doc = q.positions, kv.positions, q.doc_ids, kv.doc_ids
    kv_valid = kv.valid

    def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        ok = (q_doc[b, qi] == kv_doc[b, ki]) & (kv_pos[b, ki] <= q_pos[b, qi])
        return ok & kv_valid[b, ki] if kv_valid is not None else ok

    global _compiled_mask
    if _compiled_mask is None:  # compiled, it never materialises the [B, nq, nk] mask (eager does)
        from torch.nn.attention.flex_attention import create_block_mask

        _compiled_mask = torch.compile(create_block_mask)
    B, nq = q_pos.shape
    mask = _compiled_mask(mask_mod, B, None, nq, kv_pos.shape[1], device=q_pos.device)
    q.block_masks[id(kv)] = (kv, mask)
    return mask


def flex_attend(q: Tensor, k: Tensor, v: Tensor, block_mask: Any) -> Tensor:
    """q [B, H, n, hd], k/v [B, Hkv, m, hd] (GQA handled by the kernel) -> [B, H, n, hd].
    Compiled once per process (eager FlexAttention materialises the scores). Inside a compiled
    layer (`trainer.compile`) on CUDA it joins the layer's graph; on CPU it stays out of it:
    torch 2.13's inductor fails to build the CPU flex template inside a larger graph (a C++
    error, 'cur_qSplitSize5 was not declared'), so the layer graph breaks around it."""
    if q.device.type == "cpu":
        global _own_graph
        if _own_graph is None:  # recursive=False: only this frame is skipped, the kernel inside still compiles
            _own_graph = torch.compiler.disable(_run_compiled, recursive=False)
        return _own_graph(q, k, v, block_mask)
    return _run_compiled(q, k, v, block_mask)


def _run_compiled(q: Tensor, k: Tensor, v: Tensor, block_mask: Any) -> Tensor:
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention)
    return _compiled(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])
