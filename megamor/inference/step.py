"""The decode-time forward: one new token for each of m requests, written against the
model's own modules (embedding, layers, routers, RoPE, norm, head), with a StaticKVCache.

It computes what `MoRLM.forward` computes for a one-token step with a KV cache, with the same
routing policy (`model.routing`, causal mode), but runs by compaction across requests: at
recursion step r only the rows whose token runs step r form the batch (depth-wise batching),
so tokens that exited earlier cost nothing. Keys/values go to
the slot's next free index of each site; attention masks by fill level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from megamor.inference.static_cache import StaticKVCache
from megamor.model.layers import sdpa
from megamor.model.mor import MoRLM
from megamor.model.routing import CAUSAL


@dataclass
class StepResult:
    logits: Tensor  # [m, V] next-token logits
    depth: np.ndarray  # [m] recursion steps each input token ran
    tokens_per_step: list[int]  # rows that ran each recursion step (compute actually spent)


class _Rows:
    """A batch of cache slots, held both on the host (for fill bookkeeping) and on device."""

    def __init__(self, host: np.ndarray, dev: Tensor):
        self.host, self.dev = host, dev

    def take(self, local: np.ndarray, local_t: Tensor) -> _Rows:
        return _Rows(self.host[local], self.dev[local_t])


def layer_query(layer: torch.nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """(normed input, rotated query [m, heads, 1, head_dim]) of one token per row at a layer;
    shared by the dynamic step and the graph step (megamor.inference.graph_step)."""
    attn = layer.self_attn
    xn = layer.input_layernorm(x)
    return xn, attn.project_q(xn.reshape(x.shape[0], 1, -1), cos, sin)


def layer_attend_and_mlp(layer: torch.nn.Module, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """The rest of the layer for one token per row: attention over the cached k/v (mask by
    fill level), output projection, residual, MLP."""
    return layer_output(layer, x, sdpa(q, k.to(q.dtype), v.to(q.dtype), mask, is_causal=False))


def layer_output(layer: torch.nn.Module, x: Tensor, out: Tensor) -> Tensor:
    """Output projection of the attention result out [m, heads, 1, head_dim], residual, MLP
    (the depth-wise scheduler attends per depth group, then finishes the layer on all rows)."""
    attn = layer.self_attn
    h = x + attn.o_proj(out.transpose(1, 2).reshape(x.shape[0], 1, attn.n_heads * attn.head_dim))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _apply_layer(model: MoRLM, cache: StaticKVCache, phys: int, site: int, x: Tensor, rows: _Rows,
                 cos: Tensor, sin: Tensor, memo: dict) -> Tensor:
    layer = model.layers[phys]
    xn, q = layer_query(layer, x, cos, sin)
    source = model.sites.kv_source.get(site)
    if source is None:
        k, v = layer.self_attn.project_kv(xn, cos, sin)
        cache.write_token(site, rows.host, rows.dev, k, v, memo)
        source = site
    k, v, mask = cache.view(source, rows.host, rows.dev, memo)
    return layer_attend_and_mlp(layer, x, q, k, v, mask)


@torch.no_grad()
def decode_step(model: MoRLM, cache: StaticKVCache, slots: np.ndarray, tokens: Tensor, positions: Tensor) -> StepResult:
    """slots: host int array [m] of cache slots; tokens, positions: [m] on the model's device."""
    device = tokens.device
    m = len(slots)
    rows = _Rows(slots, torch.from_numpy(slots).to(device, non_blocking=True))
    memo: dict = {}  # host->device copies of fill levels, shared by the sites of a layer group
    cos, sin = model.rope(positions.unsqueeze(1))
    h = model.embed_tokens(tokens).unsqueeze(1)  # [m, 1, d]
    for phys, site in zip(model.prelude, model.sites.prelude):
        h = _apply_layer(model, cache, phys, site, h, rows, cos, sin, memo)

    depth = np.zeros(m, dtype=np.int64)
    tokens_per_step: list[int] = []
    active = np.arange(m)  # local indices of the rows that ran the previous step
    active_t = torch.from_numpy(active).to(device, non_blocking=True)
    candidates = torch.ones(m, 1, dtype=torch.bool, device=device)
    routing = model.routing.start(model, CAUSAL, positions=positions.unsqueeze(1))
    for r, (layer_ids, site_ids) in enumerate(zip(model.steps, model.sites.steps)):
        step = routing.step(r, h, candidates)  # decided for every row; only candidates can be selected
        if not step.keeps_all:
            kept = step.selected[:, 0].index_select(0, active_t).cpu().numpy()  # the one read-back per routed step
            active, active_t = active[kept], active_t[torch.from_numpy(kept).to(device)]
        candidates = step.selected
        hc = h.index_select(0, active_t)
        tokens_per_step.append(len(active))
        if len(active) == 0:
            break  # routing is hierarchical: nobody runs any later step either
        y = hc
        sub_rows, sub_cos, sub_sin = rows.take(active, active_t), cos[active_t], sin[active_t]
        for phys, site in zip(layer_ids, site_ids):
            y = _apply_layer(model, cache, phys, site, y, sub_rows, sub_cos, sub_sin, memo)
        y = model.routing.update(hc, y, *(None if t is None else t.index_select(0, active_t) for t in (step.gate, step.exits, step.base)))
        h = h.index_copy(0, active_t, y)
        depth[active] += 1
    tokens_per_step += [0] * (len(model.steps) - len(tokens_per_step))

    for phys, site in zip(model.coda, model.sites.coda):
        h = _apply_layer(model, cache, phys, site, h, rows, cos, sin, memo)
    logits = model.lm_head(model.norm(h))[:, 0]
    return StepResult(logits, depth, tokens_per_step)
