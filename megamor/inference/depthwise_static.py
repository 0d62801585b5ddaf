"""Continuous depth-wise batching with static shapes: `Engine(schedule="depthwise", static=True)`.

The same schedule as `megamor.inference.depthwise` (read that first): a block call runs the
recursion block once on `block_batch` items at mixed depths, exited items are flushed through
the coda, head and sampling `flush_batch` at a time, and continuing requests re-enter through
the embedding and the prelude. Here every piece of scheduler state lives on the device in
fixed-size per-slot buffers, so each of the three operations (block, flush, enter) has fixed
shapes and no host read inside it; on CUDA each is captured once as a CUDA graph and replayed
(`torch.compile` traces each as one graph: tested).

- Queues without host lists: an item in the block queue or the exit buffer carries a ticket
  (a device counter, bumped when it joins); an operation takes the `block_batch` (or
  `flush_batch`) oldest tickets with one top-k, so both stay FIFO. Rows the top-k fills with
  slots that are not waiting are masked. With a batch of every slot (`block_batch ==
  max_batch`, the paper's fixed setting) everyone waiting goes: the rows are the slots in
  order and the caches are read in place, not gathered.
- Routing is the model's policy (`model.routing`, causal mode) on the block's rows: after a
  block call, `step(r, ...)` is asked for every step r on the items whose next step is r (the
  others masked as non-candidates), and each item keeps the decision of its own step. Token
  choice's depth choice, made at step 0 on entry, is kept per slot (`RoutingPass.carried`) and
  handed back with `resume`, so items that entered in different passes run a step together.
- Attention at a layer position runs once per key/value source among the depths (recursion-
  wise caching: one per depth; KV sharing: one), each over all rows, masked to its depth's
  items: the projections and MLP run once on the whole batch (cycle sharing; under sequence
  sharing once per distinct physical layer), attention reads up to N_r sites per row. That
  is the price of fixed shapes without paged attention.
- Overflow: before writing, each operation checks whether an item's site is full; if any is,
  the operation commits nothing (every write and state update is masked), reports it, and the
  host grows the full sites and runs it again (a grown cache recaptures the graphs).

The host reads back one small tensor per operation (counts, and on a flush the rows, greedy
tokens and depths), which is where it learns what to run next. Greedy output equals
`generate()` on each request alone (tested, fp32, against the same cases as the dynamic
scheduler).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from megamor.inference.depthwise import EngineLike, check_servable
from megamor.inference.graph_step import fixed_shape_layer
from megamor.inference.step import layer_output, layer_query
from megamor.model.layers import sdpa
from megamor.model.routing import CAUSAL

LAST = 2**62  # the ticket of a slot that is not waiting: sorts after every real one


def _any_of(values: Tensor, wanted: list[int]) -> Tensor:
    """values [m] in the Python list `wanted` (fixed shapes)."""
    hit = values == wanted[0]
    for w in wanted[1:]:
        hit = hit | (values == w)
    return hit


def default_buckets(model, block_batch: int, slack: float = 1.25) -> list[int] | None:
    """Rows per depth of a block call: each depth's expected share of the block's items (its
    capacity c_r over the sum of capacities: the tokens that run step r), with slack. Fewer rows
    at the deep steps' attention (each reads its own site, not every depth's), at the price of
    deferring a depth's items past its bucket to the next call. None where buckets save
    nothing: a model without routing (every token runs every depth) or with recursive KV
    sharing (every depth reads the first recursion's sites)."""
    if (model.routers is None and model.depth_router is None) or not _own_sites(model):
        return None
    caps = model.cfg.capacities
    share = [round(c / sum(caps) * block_batch * slack, 6) for c in caps]  # round: 1/3 + 2/3 is not 1 in floats
    return [min(block_batch, math.ceil(x) + 1) for x in share]


def _own_sites(model) -> bool:
    """Whether every depth reads key/value sites of its own (recursion-wise caching)."""
    sites = model.sites
    return not any(s in sites.kv_source for ids in sites.steps for s in ids)


class StaticDepthwiseScheduler:
    def __init__(self, engine: EngineLike, block_batch: int, flush_batch: int, cuda_graph: bool | None = None,
                 compile: bool = False, buckets: list[int] | None = None):
        """buckets: rows per depth of a block call (see `default_buckets`; None: no buckets, every
        row at every depth's key/value source)."""
        model = engine.model
        check_servable(model)
        S = engine.max_batch
        for name, n in (("block_batch", block_batch), ("flush_batch", flush_batch)):
            if not 1 <= n <= S:
                raise ValueError(f"{name} must be between 1 and max_batch ({S}) with static=True, got {n}")
        if len({len(layers) for layers in model.steps}) > 1:
            raise ValueError("schedule='depthwise' with static=True needs recursion steps of equal length")
        self.engine, self.model, self.cache = engine, model, engine.cache
        self.block_batch, self.flush_batch = block_batch, flush_batch
        self.n_steps = len(model.steps)
        if buckets is not None and (len(buckets) != self.n_steps or not all(1 <= b <= block_batch for b in buckets)):
            raise ValueError(f"buckets must give 1..block_batch ({block_batch}) rows for each of the {self.n_steps} "
                             f"recursion steps, got {buckets}")
        if buckets is not None and not _own_sites(model):
            raise ValueError("buckets need each depth's own key/value sites (kv_mode recursion_wise); under KV "
                             "sharing every depth reads the first recursion's")
        self.buckets = buckets
        w = model.embed_tokens.weight
        dev, D = w.device, model.cfg.d_model
        self.device = dev
        # What the policy returns for this model (gate / paper exits present): asked, not re-decided.
        probe = model.routing.start(model, CAUSAL, positions=torch.zeros(1, 1, dtype=torch.long, device=dev))
        with torch.no_grad():
            first = probe.step(0, torch.zeros(1, 1, D, dtype=w.dtype, device=dev), torch.ones(1, 1, dtype=torch.bool, device=dev))
        self.gated, self.paper = first.gate is not None, first.exits is not None
        self.carries = sorted(probe.carried())  # token choice: choice, gate (, base)

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=dev)

        # per-slot state of the item in flight
        self.H, self.base = zeros(S, 1, D, dtype=w.dtype), zeros(S, 1, D, dtype=w.dtype)
        self.depth, self.pos, self.choice = zeros(S), zeros(S), zeros(S)
        self.G = torch.ones(S, dtype=torch.float32, device=dev)  # gate of the step it waits for
        self.E = zeros(S, dtype=torch.bool)  # paper rule: that step is its exit
        self.queued, self.exited = zeros(S, dtype=torch.bool), zeros(S, dtype=torch.bool)
        self.ticket, self.counter = zeros(S), zeros((), dtype=torch.long)
        self.every = torch.arange(S, device=dev)
        # inputs of an enter (host-written)
        F = flush_batch
        self.in_slots, self.in_tokens, self.in_pos = zeros(F), zeros(F), zeros(F)
        self.in_valid = zeros(F, dtype=torch.bool)
        self.n_queue = self.n_exit = 0  # host copies, from each operation's read-back
        self.block_calls = self.block_items = self.steady_calls = self.steady_items = 0
        self.mixed_calls = 0  # block calls that ran items of more than one depth
        self.overflows = 0
        self.deferred = 0  # items a full depth bucket sent back to the queue (they run next call)
        # sites each operation writes (what it may overflow)
        sites, kv = model.sites, model.sites.kv_source
        self._own = {"enter": [s for s in sites.prelude if s not in kv], "flush": [s for s in sites.coda if s not in kv],
                     "block": [s for ids in sites.steps for s in ids if s not in kv]}
        fns: dict[str, Callable[[], tuple[Tensor, ...]]] = {"block": self.block_fn, "flush": self.flush_fn,
                                                             "enter": self.enter_fn}
        if compile:
            fns = {k: torch.compile(f, fullgraph=True, dynamic=False) for k, f in fns.items()}
        self._fns = fns
        self.use_graph = dev.type == "cuda" if cuda_graph is None else cuda_graph
        self._graphs: dict[str, tuple[int, torch.cuda.CUDAGraph, tuple[Tensor, ...]]] = {}

    # -- host side: the schedule (the same rule as the dynamic scheduler) -----------------------
    def tick(self) -> list:
        if self.n_exit >= self.flush_batch or (self.n_exit and self.n_queue < self.block_batch):
            return self._flush()
        if self.n_queue:
            self._block()
        return []

    def idle(self) -> bool:
        return not self.n_queue and not self.n_exit

    def enter(self, slots: list[int]) -> None:
        """Feed each slot's request's last token through the embedding and the prelude; decide
        its first recursion step (flush_batch slots per call)."""
        eng, F, S = self.engine, self.flush_batch, self.engine.max_batch
        for i in range(0, len(slots), F):
            chunk = slots[i : i + F]
            taken = set(chunk)
            pad = [s for s in range(S) if s not in taken][: F - len(chunk)]  # distinct rows
            reqs = [eng.running[s] for s in chunk]
            self.in_slots.copy_(torch.tensor(chunk + pad))
            self.in_tokens.copy_(torch.tensor([r.next_input() for r in reqs] + [0] * len(pad)))
            self.in_pos.copy_(torch.tensor([r.position for r in reqs] + [0] * len(pad)))
            self.in_valid.copy_(torch.tensor([True] * len(chunk) + [False] * len(pad)))
            packed = self._run("enter")
            self.n_queue, self.n_exit = int(packed[1]), int(packed[2])

    def occupancy(self, steady: bool = False) -> float:
        calls, items = (self.steady_calls, self.steady_items) if steady else (self.block_calls, self.block_items)
        return items / (calls * self.block_batch) if calls else float("nan")

    def _block(self) -> None:
        p = self._run("block")
        counts = p[2 : 2 + self.n_steps]
        n = int(p[1])
        self.deferred += int(p[2 + self.n_steps])
        self.n_queue, self.n_exit = int(p[-2]), int(p[-1])
        self.block_calls += 1
        self.block_items += n
        self.mixed_calls += int((counts > 0).sum()) > 1
        self.engine.tokens_per_step_total += counts
        if self.engine.queue:
            self.steady_calls += 1
            self.steady_items += n

    def _flush(self) -> list:
        eng, F = self.engine, self.flush_batch
        logits, packed = self._run("flush")
        p = packed
        rows, valid, greedy, depth = p[1 : 1 + F], p[1 + F : 1 + 2 * F], p[1 + 2 * F : 1 + 3 * F], p[1 + 3 * F : 1 + 4 * F]
        self.n_queue, self.n_exit = int(p[-2]), int(p[-1])
        at = np.flatnonzero(valid)
        reqs = [eng.running[int(rows[i])] for i in at]
        for req, d in zip(reqs, depth[at].tolist()):
            req.fed(int(d))
        events = eng._emit(reqs, logits[torch.from_numpy(at).to(self.device)], greedy[at].tolist())
        self.enter([req.slot for req in reqs if not req.done])
        return events

    def _run(self, name: str):
        """Run one operation (a CUDA graph replay on CUDA); on overflow grow the full sites and
        run it again. Returns its read-back (numpy), with the flush's logits first."""
        while True:
            _ = self.cache.fill_dev  # the host's fill changes (releases, prefills) reach the device
            out = self._replay(name) if self.use_graph else self._fns[name]()
            self.cache.device_changed()
            packed = out[-1].cpu().numpy()
            if not packed[0]:
                return (out[0], packed) if name == "flush" else packed
            self.overflows += 1
            if not self.cache.grow_full(self._own[name]):
                raise RuntimeError(f"depth-wise {name}: overflow reported but no site is full")

    def _replay(self, name: str) -> tuple[Tensor, ...]:
        cached = self._graphs.get(name)
        if cached is None or cached[0] != self.cache.generation:
            self._capture(name)
            cached = self._graphs[name]
        cached[1].replay()
        return cached[2]

    def _capture(self, name: str) -> None:
        """Warm up and capture with nothing waiting and nothing entering: the operation then
        changes nothing."""
        saved = [t.clone() for t in (self.queued, self.exited, self.in_valid)]
        for t in (self.queued, self.exited, self.in_valid):
            t.zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._fns[name]()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._fns[name]()
        self._graphs[name] = (self.cache.generation, graph, out)
        for t, s in zip((self.queued, self.exited, self.in_valid), saved):
            t.copy_(s)

    # -- device side: the three operations (fixed shapes, no host reads) ------------------------
    def _take(self, waiting: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """(rows [n]: the n oldest waiting slots first, distinct; valid [n]) and unmark them.
        With n = every slot, everyone waiting goes: rows are the slots in order (`self.every`),
        and the layers read the caches in place instead of gathering rows."""
        if n == len(waiting):
            valid = waiting.clone()
            waiting.zero_()
            return self.every, valid
        score = torch.where(waiting, self.ticket, torch.full_like(self.ticket, LAST))
        rows = torch.topk(score, n, largest=False).indices
        valid = waiting[rows]
        waiting[rows] = waiting[rows] & ~valid
        return rows, valid

    def _view(self, site: int, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.cache.view_masked(site, None if rows is self.every else rows)

    def _join(self, rows: Tensor, to_queue: Tensor, to_exit: Tensor) -> None:
        """Rows join the block queue or the exit buffer, in row order, with fresh tickets."""
        joins = to_queue | to_exit
        rank = torch.cumsum(joins.long(), 0) - 1
        self.ticket[rows] = torch.where(joins, self.counter + rank, self.ticket[rows])
        self.counter += joins.long().sum()
        self.queued[rows] = self.queued[rows] | to_queue
        self.exited[rows] = self.exited[rows] | to_exit

    def _overflow(self, name: str, rows: Tensor, writes: Callable[[int], Tensor]) -> Tensor:
        """Whether a row that would write one of the operation's sites finds it full."""
        ovf = torch.zeros((), dtype=torch.bool, device=self.device)
        for site in self._own[name]:
            ovf = ovf | (writes(site) & self.cache.full_rows(site, rows)).any()
        return ovf

    def _whole_layer(self, phys: int, site: int, h: Tensor, rows: Tensor, valid: Tensor, cos: Tensor,
                     sin: Tensor) -> Tensor:
        """A prelude or coda layer on every row (valid rows write their key)."""
        return fixed_shape_layer(self.model, self.cache, phys, site, h, rows, valid, cos, sin,
                                 in_place=rows is self.every)[0]

    def _block_layer(self, j: int, x: Tensor, rows: Tensor, dep: Tensor, valid: Tensor, cos: Tensor,
                     sin: Tensor, bucket: dict[int, tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """Position j of each item's recursion step: projections and MLP once per physical layer
        on all rows, attention once per key/value source, each row keeping its own depth's. With
        buckets, a source only one depth reads attends only that depth's bucket of rows."""
        model, cache = self.model, self.cache
        steps, sites = model.steps, model.sites
        by_phys: dict[int, list[int]] = {}
        for r in range(self.n_steps):
            by_phys.setdefault(steps[r][j], []).append(r)
        y = x
        for phys, depths in by_phys.items():
            layer = model.layers[phys]
            xn, q = layer_query(layer, x, cos, sin)
            kv = None
            by_source: dict[int, list[int]] = {}
            for r in depths:
                site = sites.steps[r][j]
                source = sites.kv_source.get(site)
                if source is None:
                    if kv is None:
                        kv = layer.self_attn.project_kv(xn, cos, sin)
                    cache.write_masked(site, rows, valid & (dep == r), *kv)
                    source = site
                by_source.setdefault(source, []).append(r)
            out = None
            for source, rs in by_source.items():
                if bucket is not None and len(rs) == 1:  # only this depth's rows read this source
                    idx, ok = bucket[rs[0]]
                    k, v, mask = cache.view_masked(source, rows[idx])
                    o = sdpa(q[idx], k.to(q.dtype), v.to(q.dtype), mask, is_causal=False)
                    out = torch.zeros_like(q) if out is None else out
                    out[idx] = torch.where(ok[:, None, None, None], o, out[idx])
                    continue
                k, v, mask = self._view(source, rows)
                o = sdpa(q, k.to(q.dtype), v.to(q.dtype), mask, is_causal=False)
                out = o if out is None else torch.where(_any_of(dep, rs)[:, None, None, None], o, out)
            yp = layer_output(layer, x, out)
            y = yp if len(by_phys) == 1 else torch.where(_any_of(dep, depths)[:, None, None], yp, y)
        return y

    def block_fn(self) -> tuple[Tensor]:
        """One call of the recursion block on the block_batch oldest queued items. Returns packed
        [overflow, items, items per depth (N_r), deferred, queued, exited]."""
        model, n = self.model, self.n_steps
        saved = self.queued.clone()
        rows, valid = self._take(self.queued, self.block_batch)
        dep = self.depth[rows]
        bucket, deferred = None, torch.zeros_like(valid)
        if self.buckets is not None:  # a depth's items past its bucket wait for the next call (tickets kept)
            bucket = {}
            order = torch.arange(len(rows), 0, -1, device=rows.device)  # earlier rows first
            for r, size in enumerate(self.buckets):
                mine = valid & (dep == r)
                deferred = deferred | (mine & (torch.cumsum(mine.long(), 0) > size))
                idx = torch.topk(torch.where(mine, order, torch.zeros_like(order)), size).indices
                bucket[r] = (idx, (mine & ~deferred)[idx])
            valid = valid & ~deferred
            self.queued[rows] = self.queued[rows] | deferred
        ovf = self._overflow("block", rows, lambda site: valid & _any_of(dep, self._depths_writing(site)))
        valid = valid & ~ovf
        self.queued.copy_(torch.where(ovf, saved, self.queued))  # an overflow takes nobody
        if bucket is not None:
            bucket = {r: (idx, ok & ~ovf) for r, (idx, ok) in bucket.items()}
        x = self.H[rows]
        pos = self.pos[rows]
        cos, sin = model.rope(pos.unsqueeze(1))
        y = x
        for j in range(len(model.steps[0])):
            y = self._block_layer(j, y, rows, dep, valid, cos, sin, bucket)
        if self.gated:  # the routing's update rule, with the gate (and exits) decided for this step
            y = model.routing.update(x, y, self.G[rows][:, None], self.E[rows][:, None] if self.paper else None,
                       self.base[rows] if self.paper else None)
        new_dep = dep + valid.long()
        # next decisions: the policy's step r on the items whose next step is r
        routing = model.routing.start(model, CAUSAL, positions=pos.unsqueeze(1))
        if self.carries:
            routing.resume(self._carried(rows))
        keep = torch.zeros_like(valid)
        g, e, base = self.G[rows], self.E[rows], self.base[rows]
        for r in range(1, n):
            cand = valid & (new_dep == r)
            step = routing.step(r, y, cand.unsqueeze(1))
            keep = keep | (step.selected[:, 0] & cand)
            if step.gate is not None:
                g = torch.where(cand, step.gate[:, 0].float(), g)
            if step.exits is not None:
                e = torch.where(cand, step.exits[:, 0], e)
                base = torch.where(cand[:, None, None], step.base, base)
        self.H[rows] = torch.where(valid[:, None, None], y, x)
        self.depth[rows] = new_dep
        self.G[rows], self.E[rows], self.base[rows] = g, e, base
        self._join(rows, valid & keep, valid & ~keep)
        counts = [(valid & (dep == r)).sum().reshape(1) for r in range(n)]
        packed = torch.cat([ovf.long().reshape(1), valid.sum().reshape(1), *counts,
                            (deferred & ~ovf).sum().reshape(1), self.queued.sum().reshape(1),
                            self.exited.sum().reshape(1)])
        return (packed,)

    def flush_fn(self) -> tuple[Tensor, Tensor]:
        """Coda, norm and head for the flush_batch oldest exited items. Returns (logits [F, V],
        packed [overflow, rows F, valid F, greedy F, depths F, queued, exited])."""
        model = self.model
        saved = self.exited.clone()
        rows, valid = self._take(self.exited, self.flush_batch)
        ovf = self._overflow("flush", rows, lambda site: valid)
        valid = valid & ~ovf
        self.exited.copy_(torch.where(ovf, saved, self.exited))
        cos, sin = model.rope(self.pos[rows].unsqueeze(1))
        h = self.H[rows]
        for phys, site in zip(model.coda, model.sites.coda):
            h = self._whole_layer(phys, site, h, rows, valid, cos, sin)
        logits = model.lm_head(model.norm(h))[:, 0]
        packed = torch.cat([ovf.long().reshape(1), rows, valid.long(), logits.argmax(-1), self.depth[rows],
                            self.queued.sum().reshape(1), self.exited.sum().reshape(1)])
        return logits, packed

    def enter_fn(self) -> tuple[Tensor]:
        """Embedding, prelude and the step-0 decision for the entering rows (in_*). Returns packed
        [overflow, queued, exited]."""
        model = self.model
        rows, tokens, pos = self.in_slots, self.in_tokens, self.in_pos
        ovf = self._overflow("enter", rows, lambda site: self.in_valid)
        valid = self.in_valid & ~ovf
        cos, sin = model.rope(pos.unsqueeze(1))
        h = model.embed_tokens(tokens).unsqueeze(1)
        for phys, site in zip(model.prelude, model.sites.prelude):
            h = self._whole_layer(phys, site, h, rows, valid, cos, sin)
        routing = model.routing.start(model, CAUSAL, positions=pos.unsqueeze(1))
        step = routing.step(0, h, valid.unsqueeze(1))
        sel = step.selected[:, 0] & valid
        v3 = valid[:, None, None]
        self.H[rows] = torch.where(v3, h, self.H[rows])
        self.depth[rows] = torch.where(valid, torch.zeros_like(pos), self.depth[rows])
        self.pos[rows] = torch.where(valid, pos, self.pos[rows])
        if step.gate is not None:
            self.G[rows] = torch.where(valid, step.gate[:, 0].float(), self.G[rows])
        if step.exits is not None:
            self.E[rows] = torch.where(valid, step.exits[:, 0], self.E[rows])
            self.base[rows] = torch.where(v3, step.base, self.base[rows])
        carried = routing.carried()
        if "choice" in carried:
            self.choice[rows] = torch.where(valid, carried["choice"][:, 0], self.choice[rows])
        self._join(rows, sel, valid & ~sel)
        packed = torch.cat([ovf.long().reshape(1), self.queued.sum().reshape(1), self.exited.sum().reshape(1)])
        return (packed,)

    # -- helpers ----------------------------------------------------------------------------
    def _depths_writing(self, site: int) -> list[int]:
        return [r for r, ids in enumerate(self.model.sites.steps) if site in ids]

    def _carried(self, rows: Tensor) -> dict[str, Tensor]:
        """Token choice's step-0 state of these rows (see `RoutingPass.carried`): depth choice,
        gate (the same at every step, kept in G), and H^1 under the paper rule."""
        state = {"choice": self.choice[rows][:, None], "gate": self.G[rows][:, None]}
        if "base" in self.carries:
            state["base"] = self.base[rows]
        return state
