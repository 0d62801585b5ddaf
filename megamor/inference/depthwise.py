"""Continuous depth-wise batching (Bae et al., 2025, Appendix E): the engine's `schedule="depthwise"`.

Every running request has exactly one token in flight (the next token needs this one's
output), so an *item* is a cache slot: its hidden state `H[slot]`, the recursion steps it has
run `depth[slot]`, and the gate of the step it waits for. Items live in one of two places:

- the block queue (FIFO): items waiting to run recursion step `depth[slot]`;
- the exit buffer: items whose routing ended their recursion (or that ran every step).

Each `tick()` does one of two things:

- *block*: the first `block_batch` items of the queue run their recursion step together, at
  mixed depths. The projections and MLPs run once on the whole batch (grouped by physical
  layer: one group under cycle sharing, where every step is the same block); attention runs per
  depth group, each item reading its own slot's cache at its own depth's site (recursion-wise
  caching: the site of step r holds only the slot's tokens that ran step r; KV sharing: the
  first recursion's site). Then each item's routing decides its next step: queue or exit.
- *flush*: when the exit buffer holds `flush_batch` items, or the queue cannot fill the block
  (nothing else can run), the exit buffer runs the coda, norm, head and sampling; requests
  that go on feed their new token through the embedding and prelude, and it enters at step 1.

Routing is the model's policy (`model.routing`, causal mode), never a copy of it: each batch
of tokens entering together (a *cohort*) opens one routing pass, and an item's step-r decision
is that pass's `step(r, ...)` on its own row (other rows masked as non-candidates), so
per-token state a policy keeps across steps (token choice's depth choice) stays the pass's.

Each token runs the same layers, with the same routing, caches and gate update, as in
`decode_step` (lockstep), so greedy output equals `generate()` on each request alone (tested).
Shapes here are dynamic (CPU, or GPU without graphs); `megamor.inference.depthwise_static` is
the same schedule with fixed shapes and the scheduler's state on the device (CUDA graphs).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor

from megamor.inference.step import _apply_layer, _Rows, layer_output, layer_query
from megamor.model.layers import sdpa
from megamor.model.routing import CAUSAL, EXPERT, TOKEN

if TYPE_CHECKING:
    from megamor.inference.static_cache import StaticKVCache
    from megamor.model.mor import MoRLM


class EngineLike(Protocol):
    """What the scheduler uses of `megamor.inference.engine.Engine` (which imports this module)."""

    model: MoRLM
    cache: StaticKVCache
    max_batch: int
    tokens_per_step_total: np.ndarray
    running: dict  # slot -> Request
    queue: deque  # requests not admitted yet

    def _emit(self, reqs: list, logits: Tensor, greedy: list[int] | None = None) -> list: ...

SERVABLE = ("none", EXPERT, TOKEN)


def check_servable(model: MoRLM) -> None:
    """ValueError (one line) for a model the depth-wise scheduler cannot decode."""
    kind = model.routing.settings.type
    if kind not in SERVABLE:
        raise ValueError(f"schedule='depthwise' cannot serve routing type {kind!r} (serves {', '.join(SERVABLE)})")
    if type(model.seq_layout).__name__ != "SequenceLayout":
        raise ValueError("schedule='depthwise' cannot serve a sequence-parallel layout; decode the TP or merged model")


class _Cohort:
    """The tokens that entered the recursion together: one routing pass over `size` rows."""

    __slots__ = ("routing", "size")

    def __init__(self, routing: Any, size: int):
        self.routing, self.size = routing, size


class DepthwiseScheduler:
    def __init__(self, engine: EngineLike, block_batch: int, flush_batch: int):
        model = engine.model
        check_servable(model)
        if block_batch < 1 or flush_batch < 1:
            raise ValueError(f"block_batch and flush_batch must be >= 1, got {block_batch}, {flush_batch}")
        self.engine, self.model = engine, model
        self.block_batch, self.flush_batch = block_batch, flush_batch
        S, w = engine.max_batch, model.embed_tokens.weight
        self.device = w.device
        self.H = torch.zeros(S, 1, model.cfg.d_model, dtype=w.dtype, device=self.device)
        self.G = torch.ones(S, dtype=torch.float32, device=self.device)
        self.gated = np.zeros(S, dtype=bool)
        # token choice's paper rule: whether the step an item waits for is its exit, and H^1
        self.paper = np.zeros(S, dtype=bool)
        self.E = torch.zeros(S, dtype=torch.bool, device=self.device)
        self.base = torch.zeros_like(self.H)
        self.depth = np.zeros(S, dtype=np.int64)
        self.cohort: list[_Cohort | None] = [None] * S
        self.row = np.zeros(S, dtype=np.int64)
        self.queue: deque[int] = deque()
        self.exit: list[int] = []
        self.n_steps = len(model.steps)
        # occupancy: items per block call; steady = calls made while requests were still waiting
        self.block_calls = self.block_items = 0
        self.steady_calls = self.steady_items = 0
        self.mixed_calls = 0  # block calls that ran items of more than one depth

    # -- the two operations ----------------------------------------------------------------
    def tick(self) -> list:
        if len(self.exit) >= self.flush_batch or (self.exit and len(self.queue) < self.block_batch):
            return self._flush()
        if self.queue:
            n = min(self.block_batch, len(self.queue))
            self._block(np.array([self.queue.popleft() for _ in range(n)], dtype=np.int64))
        return []

    def enter(self, slots: list[int]) -> None:
        """Feed each slot's request's last token through the embedding and the prelude; decide
        its first recursion step."""
        if not slots:
            return
        eng, model = self.engine, self.model
        sl = np.asarray(slots, dtype=np.int64)
        sl_t = torch.from_numpy(sl).to(self.device)
        reqs = [eng.running[s] for s in slots]
        tokens = torch.tensor([r.next_input() for r in reqs], device=self.device)
        pos = torch.tensor([r.position for r in reqs], device=self.device)
        cos, sin = self.model.rope(pos.unsqueeze(1))
        rows, memo = _Rows(sl, sl_t), {}
        h = model.embed_tokens(tokens).unsqueeze(1)
        for phys, site in zip(model.prelude, model.sites.prelude):
            h = _apply_layer(model, eng.cache, phys, site, h, rows, cos, sin, memo)
        self.H[sl_t] = h
        self.depth[sl] = 0
        if self.n_steps == 0:
            self.exit.extend(slots)
            return
        cohort = _Cohort(model.routing.start(model, CAUSAL, positions=pos.unsqueeze(1)), len(slots))
        for i, s in enumerate(slots):
            self.cohort[s] = cohort
            self.row[s] = i
        self._route(sl, 0)

    def idle(self) -> bool:
        return not self.queue and not self.exit

    # -- internals ---------------------------------------------------------------------------
    def _rope(self, reqs: list) -> tuple[Tensor, Tensor]:
        pos = torch.tensor([r.position for r in reqs], device=self.device)
        return self.model.rope(pos.unsqueeze(1))

    def _route(self, slots: np.ndarray, r: int) -> None:
        """Decide step r for items that ran step r-1 (or just entered, r = 0), in FIFO order."""
        if r >= self.n_steps:
            self.exit.extend(slots.tolist())
            return
        keep = np.zeros(len(slots), dtype=bool)
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(slots.tolist()):
            groups.setdefault(id(self.cohort[s]), []).append(i)
        for local in groups.values():
            loc = np.asarray(local, dtype=np.int64)
            sl = slots[loc]
            cohort = self.cohort[int(sl[0])]
            sl_t = torch.from_numpy(sl).to(self.device)
            rows = torch.from_numpy(self.row[sl]).to(self.device)
            h = self.H.new_zeros(cohort.size, *self.H.shape[1:]).index_copy_(0, rows, self.H[sl_t])
            cand = torch.zeros(cohort.size, 1, dtype=torch.bool, device=self.device).index_fill_(0, rows, True)
            step = cohort.routing.step(r, h, cand)  # the model's policy on these rows only
            keep[loc] = True if step.keeps_all else step.selected[rows, 0].cpu().numpy()
            self.gated[sl] = step.gate is not None
            if step.gate is not None:
                self.G[sl_t] = step.gate[rows, 0].float()
            self.paper[sl] = step.exits is not None
            if step.exits is not None:
                self.E[sl_t] = step.exits[rows, 0]
                self.base[sl_t] = step.base[rows]
        for s, k in zip(slots.tolist(), keep.tolist()):
            (self.queue.append if k else self.exit.append)(s)

    def _block(self, slots: np.ndarray) -> None:
        """Each item runs its own recursion step (depth[slot]); one batch for all depths."""
        model = self.model
        m = len(slots)
        sl_t = torch.from_numpy(slots).to(self.device)
        dep = self.depth[slots]
        cos, sin = self._rope([self.engine.running[s] for s in slots.tolist()])
        memo: dict = {}
        x = self.H[sl_t]
        y = x
        n_layers = max(len(model.steps[r]) for r in set(dep.tolist()))
        for j in range(n_layers):
            # physical layer at position j of each item's step (sequence sharing: several)
            phys = np.array([model.steps[r][j] if j < len(model.steps[r]) else -1 for r in dep.tolist()])
            for p in np.unique(phys).tolist():
                if p < 0:
                    continue
                loc = np.flatnonzero(phys == p)
                if len(loc) == m:
                    y = self._layer(p, j, y, slots, dep, cos, sin, memo)
                else:
                    loc_t = torch.from_numpy(loc).to(self.device)
                    out = self._layer(p, j, y[loc_t], slots[loc], dep[loc], cos[loc_t], sin[loc_t], memo)
                    y = y.index_copy(0, loc_t, out)
        gated = self.gated[slots]
        if gated.any():  # the routing's update rule (RoutingPolicy.update), row by row
            paper = self.paper[slots].any()
            upd = model.routing.update(x, y, self.G[sl_t][:, None], self.E[sl_t][:, None] if paper else None,
                         self.base[sl_t] if paper else None)
            y = upd if gated.all() else torch.where(torch.from_numpy(gated).to(self.device)[:, None, None], upd, y)
        self.H[sl_t] = y
        self.depth[slots] = dep + 1
        self.block_calls += 1
        self.block_items += m
        self.mixed_calls += len(np.unique(dep)) > 1
        np.add.at(self.engine.tokens_per_step_total, dep, 1)  # the lockstep counter, per recursion step
        if self.engine.queue:
            self.steady_calls += 1
            self.steady_items += m
        for r in np.unique(dep).tolist():  # next routing decision, per depth (FIFO within each)
            self._route(slots[dep == r], r + 1)

    def _layer(self, phys: int, j: int, x: Tensor, slots: np.ndarray, dep: np.ndarray, cos: Tensor, sin: Tensor,
               memo: dict) -> Tensor:
        """Layer `phys` at position j of each item's step: shared projections and MLP, attention
        per depth group over that depth's site of each item's slot."""
        model, cache = self.model, self.engine.cache
        layer = model.layers[phys]
        xn, q = layer_query(layer, x, cos, sin)
        depths = np.unique(dep).tolist()
        sites = {r: model.sites.steps[r][j] for r in depths}
        owns = {r: model.sites.kv_source.get(sites[r]) is None for r in depths}
        # Keys/values of every item whose site owns them, in one projection (not one per depth)
        own_all = all(owns.values())
        owners = None if own_all else np.flatnonzero(np.isin(dep, [r for r in depths if owns[r]]))
        kv = None
        if own_all:
            kv = layer.self_attn.project_kv(xn, cos, sin)
        elif len(owners):
            o_t = torch.from_numpy(owners).to(self.device)
            kv = layer.self_attn.project_kv(xn[o_t], cos[o_t], sin[o_t])
        out = None if len(depths) == 1 else q.new_empty(q.shape)
        for r in depths:
            loc = np.flatnonzero(dep == r)
            whole = len(loc) == len(dep)
            loc_t = None if whole else torch.from_numpy(loc).to(self.device)
            rows = _Rows(slots[loc], torch.from_numpy(slots[loc]).to(self.device))
            site = sites[r]
            source = model.sites.kv_source.get(site)
            if source is None:
                at = loc if own_all else np.searchsorted(owners, loc)  # this group's rows of the projection
                if len(at) == len(kv[0]):
                    k, v = kv
                else:
                    at_t = torch.from_numpy(at).to(self.device)
                    k, v = kv[0].index_select(0, at_t), kv[1].index_select(0, at_t)
                cache.write_token(site, rows.host, rows.dev, k, v, memo)
                source = site
            k, v, mask = cache.view(source, rows.host, rows.dev, memo)
            qs = q if whole else q.index_select(0, loc_t)
            o = sdpa(qs, k.to(qs.dtype), v.to(qs.dtype), mask, is_causal=False)
            if out is None:
                out = o
            else:
                out.index_copy_(0, loc_t, o)
        return layer_output(layer, x, out)

    def _flush(self) -> list:
        """Coda, head and sampling for the exit buffer; the requests that go on re-enter."""
        eng, model = self.engine, self.model
        slots = np.asarray(self.exit, dtype=np.int64)
        self.exit = []
        sl_t = torch.from_numpy(slots).to(self.device)
        reqs = [eng.running[s] for s in slots.tolist()]
        cos, sin = self._rope(reqs)
        rows, memo = _Rows(slots, sl_t), {}
        h = self.H[sl_t]
        for phys, site in zip(model.coda, model.sites.coda):
            h = _apply_layer(model, eng.cache, phys, site, h, rows, cos, sin, memo)
        logits = model.lm_head(model.norm(h))[:, 0]
        for s, req in zip(slots.tolist(), reqs):
            req.fed(int(self.depth[s]))
            self.cohort[s] = None
        events = eng._emit(reqs, logits)
        self.enter([s for s, req in zip(slots.tolist(), reqs) if not req.done])
        return events

    def occupancy(self, steady: bool = False) -> float:
        """Items per block call / block batch (steady: calls made while requests were queued)."""
        calls, items = (self.steady_calls, self.steady_items) if steady else (self.block_calls, self.block_items)
        return items / (calls * self.block_batch) if calls else float("nan")
