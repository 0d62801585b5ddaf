"""A static-shape decoding step with no host-device synchronisation, capturable as a CUDA graph.

Every cache slot runs every step (free slots are masked), so all shapes are fixed:

- a key/value write goes to index `fill[slot]` of its site, read from the device-side fill
  levels; slots that do not write keep their old values (`torch.where`), and fills advance on
  the device;
- attention reads a site's whole capacity with a length mask;
- recursion step r runs on a fixed bucket of `buckets[r]` rows: the rows whose token runs step
  r are moved to the front (top-k on the selection), so with buckets sized to the capacities
  c_r x slots an early-exiting token frees its share of compute (depth-wise batching). If more
  tokens than a bucket holds, or than a site's capacity holds, run a step, the step raises an
  `overflow` flag; the engine then restores the fills and redoes that step on the exact
  dynamic path (which grows the caches), so results never depend on bucket sizes.

The step also returns greedy next tokens, depths and per-step counts packed into one tensor, so
the engine reads back one small tensor per step. On CUDA, `GraphStep` captures the step once
(per cache allocation) and replays it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from megamor.inference.static_cache import StaticKVCache
from megamor.inference.step import layer_attend_and_mlp, layer_query
from megamor.model.mor import MoRLM
from megamor.model.routing import CAUSAL


def fixed_shape_layer(model: MoRLM, cache: StaticKVCache, phys: int, site: int, x: Tensor, idx: Tensor, write: Tensor,
                      cos: Tensor, sin: Tensor, in_place: bool = False) -> tuple[Tensor, Tensor]:
    """Layer `phys` at attention site `site` for one token per row, with fixed shapes and no host
    read: rows idx [m] (distinct slots) append their key where `write`, attention reads each
    row's slot masked by fill level (in_place: idx is every slot in order, so the caches are
    read without gathering rows). Returns (output, whether a writing row found its slot full).
    The lockstep graph step and the fixed-shape depth-wise scheduler's prelude and coda use it."""
    layer = model.layers[phys]
    xn, q = layer_query(layer, x, cos, sin)
    source = model.sites.kv_source.get(site)
    full = torch.zeros((), dtype=torch.bool, device=x.device)
    if source is None:
        k, v = layer.self_attn.project_kv(xn, cos, sin)
        full = cache.write_masked(site, idx, write, k, v)
        source = site
    k, v, mask = cache.view_masked(source, None if in_place else idx)
    return layer_attend_and_mlp(layer, x, q, k, v, mask), full


def default_buckets(model: MoRLM, slots: int, slack: float = 1.25) -> list[int]:
    """Rows each recursion step runs per step: its capacity share of the slots, with slack."""
    routed = model.routers is not None or model.depth_router is not None
    caps = model.cfg.capacities if routed else [1.0] * len(model.steps)
    return [slots if c >= 1.0 else min(slots, math.ceil(c * slots * slack) + 1) for c in caps]


class GraphStep:
    def __init__(self, model: MoRLM, cache: StaticKVCache, buckets: list[int] | None = None,
                 cuda_graph: bool | None = None, compile: bool = False):
        """cuda_graph: capture and replay (default: on CUDA); compile: torch.compile the step
        first (fuses its small kernels; one graph, no breaks: tested)."""
        self.model, self.cache = model, cache
        S, dev = cache.slots, cache.device
        self.buckets = buckets or default_buckets(model, S)
        self.tokens = torch.zeros(S, dtype=torch.long, device=dev)
        self.positions = torch.zeros(S, dtype=torch.long, device=dev)
        self.active = torch.zeros(S, dtype=torch.bool, device=dev)
        self.use_graph = dev.type == "cuda" if cuda_graph is None else cuda_graph
        self._graph = None
        self._graph_generation = -1
        self._out: tuple[Tensor, Tensor] | None = None
        self._fn = torch.compile(self.step_fn, fullgraph=True, dynamic=False) if compile else self.step_fn

    # -- the step -------------------------------------------------------------------------
    def _attend(self, phys: int, site: int, x: Tensor, rows: Tensor | None, write: Tensor, cos: Tensor, sin: Tensor,
                overflow: Tensor) -> Tensor:
        idx = rows if rows is not None else torch.arange(self.cache.slots, device=x.device)
        y, full = fixed_shape_layer(self.model, self.cache, phys, site, x, idx, write, cos, sin, in_place=rows is None)
        overflow |= full
        return y

    def step_fn(self) -> tuple[Tensor, Tensor]:
        """(logits [S, V], packed [S + S + 1 + N_r]: greedy next tokens, depths, overflow flag,
        tokens per recursion step)."""
        model, S = self.model, self.cache.slots
        active = self.active
        overflow = torch.zeros((), dtype=torch.bool, device=active.device)
        cos, sin = model.rope(self.positions.unsqueeze(1))
        h = model.embed_tokens(self.tokens).unsqueeze(1)
        for phys, site in zip(model.prelude, model.sites.prelude):
            h = self._attend(phys, site, h, None, active, cos, sin, overflow)
        depth = torch.zeros(S, dtype=torch.long, device=active.device)
        counts = []
        cand = active
        # the model's policy, causal mode: no device reads
        routing = model.routing.start(model, CAUSAL, positions=self.positions.unsqueeze(1))
        for r, (layer_ids, site_ids) in enumerate(zip(model.steps, model.sites.steps)):
            step = routing.step(r, h, cand[:, None])
            sel, gate = step.selected[:, 0], (step.gate[:, 0] if step.gate is not None else None)
            K = self.buckets[r]
            if K >= S:
                rows, valid = None, sel
                x = h
            else:  # the rows that run step r first (distinct indices), a fixed number of them
                rows = torch.topk(sel.to(torch.float32), K).indices
                valid = sel[rows]
                overflow |= sel.sum() > K
                x = h[rows]
            c, s_ = (cos, sin) if rows is None else (cos[rows], sin[rows])
            y = x
            for phys, site in zip(layer_ids, site_ids):
                y = self._attend(phys, site, y, rows, valid, c, s_, overflow)
            exits, base = step.exits, step.base
            if rows is not None:
                gate = None if gate is None else gate[rows]
                exits, base = (None, None) if exits is None else (exits[rows], base[rows])
            y = model.routing.update(x, y, None if gate is None else gate[:, None], exits, base)
            y = torch.where(valid[:, None, None], y, x)
            h = y if rows is None else h.index_copy(0, rows, y)
            depth = depth + sel.long()
            counts.append(sel.sum().reshape(1))
            cand = sel
        for phys, site in zip(model.coda, model.sites.coda):
            h = self._attend(phys, site, h, None, active, cos, sin, overflow)
        logits = model.lm_head(model.norm(h))[:, 0]
        packed = torch.cat([logits.argmax(-1), depth, overflow.long().reshape(1)] + counts)
        return logits, packed

    # -- running it ------------------------------------------------------------------------
    @torch.no_grad()
    def run(self) -> tuple[Tensor, Tensor]:
        if not self.use_graph:
            return self._fn()
        if self._graph is None or self._graph_generation != self.cache.generation:
            self._capture()
        self._graph.replay()
        return self._out  # type: ignore[return-value]

    def _capture(self) -> None:
        """Warm up and capture with every slot inactive (the step then changes nothing)."""
        saved = self.active.clone()
        self.active.zero_()
        _ = self.cache.fill_dev  # bring device fills up to date before capturing reads of them
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._fn()
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._out = self._fn()
        self._graph_generation = self.cache.generation
        self.active.copy_(saved)
