"""Plain, independent reference computations the model is checked against.

They run every layer over the full sequence (no gathering) and express routing with
attention masks and `torch.where`, the dense way the paper describes it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megamor.model import MoRLM
from megamor.model.layers import TokenMeta


def virtual_order(sharing: str, n_layers: int, nr: int) -> list[int]:
    """Physical layer of every virtual layer, straight from the paper's definitions."""
    if sharing == "none":
        return list(range(n_layers))
    if sharing == "cycle":
        base = n_layers // nr
        return [v % base for v in range(n_layers)]
    if sharing == "sequence":
        return [v // nr for v in range(n_layers)]
    base = (n_layers - 2) // nr
    mid = [1 + (v % base) for v in range(n_layers - 2)] if sharing == "middle_cycle" else [1 + v // nr for v in range(n_layers - 2)]
    return [0] + mid + [base + 1]


def _full(model: MoRLM, x: Tensor):
    B, T = x.shape
    pos = torch.arange(T).expand(B, T)
    return model.embed_tokens(x), pos, model.rope(pos)


def plain_stack_logits(model: MoRLM, x: Tensor, order: list[int]) -> Tensor:
    h, pos, rope = _full(model, x)
    meta = TokenMeta(pos, causal_exact=True)
    for phys in order:
        h, _ = model.layers[phys](h, meta, rope)
    return model.lm_head(model.norm(h))


def dense_expert_choice_logits(model: MoRLM, x: Tensor, capacities: list[float]) -> Tensor:
    """Every layer runs on all tokens, attention restricted to the step's selected set,
    unselected tokens keep their state; top-k per sequence with hierarchical filtering."""
    cfg = model.cfg
    prelude, steps, coda = cfg.layer_plan()
    h, pos, rope = _full(model, x)
    B, T = x.shape
    full = TokenMeta(pos, causal_exact=True)
    for phys in prelude:
        h, _ = model.layers[phys](h, full, rope)
    cand = torch.ones(B, T, dtype=torch.bool)
    for r, layer_ids in enumerate(steps):
        logits = model.routers[r](h)
        if capacities[r] >= 1:
            sel = cand
        else:
            k = max(1, int(capacities[r] * T))
            top = logits.masked_fill(~cand, float("-inf")).topk(k, dim=1).indices
            sel = torch.zeros_like(cand).scatter(1, top, True) & cand
        act = torch.ones_like(logits) if cfg.router.gate_straight_through else torch.sigmoid(logits)  # forward value
        gate = cfg.router.gate_scale * act
        masked = TokenMeta(pos, valid=sel)  # keys: only selected tokens
        y = h
        for phys in layer_ids:
            y, _ = model.layers[phys](y, masked, rope)
        h = torch.where(sel.unsqueeze(-1), h + gate.unsqueeze(-1) * (y - h), h)
        cand = sel
    for phys in coda:
        h, _ = model.layers[phys](h, full, rope)
    return model.lm_head(model.norm(h))
