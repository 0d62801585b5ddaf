"""The decoding engine: a FIFO request queue, a fixed number of cache slots, batched prefill
of admitted requests, and continuous depth-wise batching of the decoding steps.

Each `step()` admits queued requests into free slots (one left-padded prefill through the
model's forward of every prompt but its last token; a one-token prompt needs none), then
decodes by one of two schedules, in which each new request's last prompt token runs with the
running requests' tokens and makes its first new token:

- `schedule="lockstep"` (default): every running request advances by one token with
  `decode_step`; at recursion r the tokens of all requests that need it run together
  (depth-wise compaction), so deeper recursions run ever smaller batches.
- `schedule="depthwise"`: the paper's continuous depth-wise batching
  (`megamor.inference.depthwise`): one call of the recursion block per step on a batch of
  tokens at mixed depths, refilled from a FIFO queue as tokens exit; exited tokens are flushed
  through the coda, head, sampling, embedding and prelude together.

A request leaves when it produces EOS or its token budget, and its slot goes to the next in
the queue. Both schedules count the shared block's occupancy (`occupancy()`).

Two decoding paths: the dynamic one (`decode_step`: each recursion step runs exactly the rows
routed to it, read back per step) and, with `static=True`, the fixed-shape `GraphStep` (no
host-device synchronisation inside the step, a CUDA graph on GPU; buckets per recursion step,
falling back to the dynamic path for a step whose routing overflows them).

Sampling is `megamor.inference.generate.sample_next` (greedy, temperature, top-k, top-p); a seeded
request samples from its own generator, so its output does not depend on what it was batched
with. Greedy fp32 output equals `generate()` on each request alone (tested).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from megamor.inference.depthwise import DepthwiseScheduler
from megamor.inference.depthwise_static import StaticDepthwiseScheduler
from megamor.inference.generate import GenerationOutput, check_request, left_pad, sample_next
from megamor.inference.graph_step import GraphStep
from megamor.inference.packed_linear import PackedLinears
from megamor.inference.static_cache import PrefillRecorder, StaticKVCache
from megamor.inference.step import decode_step
from megamor.model.mor import MoRLM

SCHEDULES = ("lockstep", "depthwise")


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    eos_id: int | None = None
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    id: int = -1
    # filled while decoding
    tokens: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)  # depth of each generated token when fed back
    prompt_depths: list[int] = field(default_factory=list)
    done: bool = False
    slot: int = -1
    position: int = 0
    generator: torch.Generator | None = None

    def next_input(self) -> int:
        """The token the next decoding step feeds: the last generated one, else the prompt's last
        (the prefill runs the prompt up to it, so its first token comes from a decoding step)."""
        return self.tokens[-1] if self.tokens else self.prompt[-1]

    def fed(self, depth: int) -> None:
        """The fed token ran `depth` recursion steps (a prompt token's until one was generated)."""
        (self.depths if self.tokens else self.prompt_depths).append(depth)
        self.position += 1


@dataclass
class TokenEvent:
    """One generated token (what streaming yields)."""

    request: int
    token: int
    finished: bool


def _site_shares(model: MoRLM) -> dict[int, float]:
    """Expected fraction of a sequence each key/value-owning site holds."""
    sites = model.sites
    shares = dict.fromkeys(sites.prelude + sites.coda, 1.0)
    caps = model.cfg.capacities if model.routers is not None or model.depth_router is not None else None
    for r, site_ids in enumerate(sites.steps):
        for s in site_ids:
            if s not in sites.kv_source:
                shares[s] = caps[r] if caps is not None else 1.0
    return shares


class Engine:
    def __init__(self, model: MoRLM, max_batch: int = 32, max_len: int | None = None, kv_dtype: torch.dtype | None = None,
                 static: bool = False, buckets: list[int] | None = None, cuda_graph: bool | None = None,
                 compile: bool = False, schedule: str = "lockstep", block_batch: int | None = None,
                 flush_batch: int | None = None, packed_linear: bool | None = None):
        """max_batch: concurrent requests (cache slots); max_len: prompt + generated tokens a
        request is expected to reach (sizes the caches; they grow if exceeded). static: use the
        fixed-shape step (buckets: rows per recursion step, or with the depth-wise schedule rows per
        depth of a block call, default none; cuda_graph: default on CUDA; compile: torch.compile it). schedule: "lockstep" or "depthwise" (block_batch: tokens per call of
        the recursion block, default max_batch; flush_batch: exited tokens that trigger the
        coda/head/prelude, default block_batch; with static=True the depth-wise operations have
        fixed shapes and run as CUDA graphs on CUDA, megamor.inference.depthwise_static). packed_linear: run the
        linears on oneDNN-packed weights (megamor.inference.packed_linear; default on a CPU in
        fp32, where it is faster and scales with the rows of a recursion step)."""
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        self.model = model.eval()
        cfg = model.cfg
        w = model.embed_tokens.weight
        self.device = w.device
        self.max_batch = max_batch
        # KV heads of this process: a tensor-parallel model holds n_kv_heads / tp of them
        kv_heads = model.layers[0].self_attn.n_kv_heads if len(model.layers) else cfg.n_kv_heads
        self.cache = StaticKVCache(_site_shares(model), max_batch, max_len or cfg.max_seq_len, kv_heads,
                                   cfg.head_dim, kv_dtype or w.dtype, self.device)
        self.queue: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self.free = list(range(max_batch))
        self._next_id = 0
        self.steps_run = 0
        self.tokens_per_step_total = np.zeros(len(model.steps), dtype=np.int64)
        lockstep_buckets = buckets if schedule == "lockstep" else None  # depth-wise: the scheduler's
        self.graph_step = GraphStep(model, self.cache, lockstep_buckets, cuda_graph, compile) if static else None
        self.static_steps = 0  # decoding steps taken by the static step
        self.overflow_steps = 0  # of which redone on the dynamic path (bucket or capacity overflow)
        self.schedule = schedule
        self.packed = PackedLinears(model, False if compile and packed_linear is None else packed_linear)
        self.block_calls = self.block_items = 0  # lockstep: calls of recursion steps, rows they ran
        self.steady_calls = self.steady_items = 0  # of which while requests were still queued
        self.depthwise = None
        if schedule == "depthwise":
            bb = block_batch or max_batch
            sched = (StaticDepthwiseScheduler(self, bb, flush_batch or bb, cuda_graph, compile, buckets) if static
                     else DepthwiseScheduler(self, bb, flush_batch or bb))
            # No recursion block (vanilla): nothing to schedule by depth, the two schedules are the
            # same computation, and lockstep's step runs it.
            self.depthwise = sched if sched.n_steps else None

    # -- queue ---------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], max_new_tokens: int, **sampling) -> Request:
        req = Request(list(prompt), max_new_tokens, id=self._next_id, **sampling)
        check_request(self.model, len(prompt), max_new_tokens, req.temperature, req.top_k, req.top_p)
        if req.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(req.seed)
        self._next_id += 1
        if max_new_tokens <= 0:
            req.done = True
        else:
            self.queue.append(req)
        return req

    def idle(self) -> bool:
        return not self.queue and not self.running

    def occupancy(self, steady: bool = False) -> float:
        """The shared block's mean occupancy: items per call of a recursion step / batch size
        (lockstep: max_batch; depthwise: block_batch). steady: only the calls made while requests
        were still queued (no ramp-up or drain)."""
        if self.depthwise is not None:
            return self.depthwise.occupancy(steady)
        calls, items = (self.steady_calls, self.steady_items) if steady else (self.block_calls, self.block_items)
        return items / (calls * self.max_batch) if calls else float("nan")

    # -- one engine step -----------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        with self.packed.active():
            return self._step()

    def _step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        admitted = []
        while self.queue and self.free:
            req = self.queue.popleft()
            req.slot = self.free.pop(0)
            self.running[req.slot] = req
            admitted.append(req)
        if admitted:
            self._prefill(admitted)
        if self.depthwise is not None:
            self.depthwise.enter([r.slot for r in admitted])
            events += self.depthwise.tick()
        elif self.running:
            events += self._decode([self.running[s] for s in sorted(self.running)])
        self.steps_run += 1
        return events

    def _emit(self, reqs: list[Request], logits: Tensor, greedy: list[int] | None = None) -> list[TokenEvent]:
        if all(r.temperature <= 0 for r in reqs):
            nxt = greedy if greedy is not None else logits.argmax(-1).tolist()
        else:
            nxt = [int(sample_next(logits[i : i + 1], r.temperature, r.top_k, r.top_p, r.generator)[0])
                   for i, r in enumerate(reqs)]
        events = []
        for req, t in zip(reqs, nxt):
            req.tokens.append(t)
            if len(req.tokens) >= req.max_new_tokens or (req.eos_id is not None and t == req.eos_id):
                self._finish(req)
            events.append(TokenEvent(req.id, t, req.done))
        return events

    def _finish(self, req: Request) -> None:
        req.done = True
        del self.running[req.slot]
        self.cache.release(req.slot)
        self.free.append(req.slot)
        self.free.sort()
        req.slot = -1

    def _prefill(self, reqs: list[Request]) -> None:
        """Run each prompt but its last token through the model's forward and cache its keys and
        values; the last token is fed by the next decoding step with the running requests, which
        makes the first new token (a one-token prompt, the paper's "no prefix", needs no forward)."""
        for r in reqs:
            r.position = len(r.prompt) - 1
        long = [r for r in reqs if len(r.prompt) > 1]
        if not long:
            return
        ids, mask = left_pad([r.prompt[:-1] for r in long], 0, self.device)
        rec = PrefillRecorder(len(long), self.device)
        out = self.model(ids, attention_mask=mask, causal_routing=True, kv_cache=rec, return_logits=False)  # keys only
        slots = [r.slot for r in long]
        for site, block in rec.entries.items():
            self.cache.write_prefill(site, slots, block.k, block.v, block.meta.valid)
        depth = out.stats.depth
        for i, r in enumerate(long):
            r.prompt_depths = depth[i, mask[i]].tolist()

    def _decode(self, reqs: list[Request]) -> list[TokenEvent]:
        if self.graph_step is None:
            return self._decode_dynamic(reqs)
        gs, S = self.graph_step, self.max_batch
        tok, pos, act = np.zeros(S, np.int64), np.zeros(S, np.int64), np.zeros(S, bool)
        slots = [r.slot for r in reqs]
        tok[slots] = [r.next_input() for r in reqs]
        pos[slots] = [r.position for r in reqs]
        act[slots] = True
        gs.tokens.copy_(torch.from_numpy(tok))
        gs.positions.copy_(torch.from_numpy(pos))
        gs.active.copy_(torch.from_numpy(act))
        snap = self.cache.snapshot_dev()
        self.static_steps += 1
        logits, packed = gs.run()
        self.cache.device_changed()
        p = packed.cpu().numpy()  # the step's one read-back: tokens, depths, overflow, counts
        if p[2 * S]:
            self.cache.restore_dev(snap)
            self.overflow_steps += 1
            return self._decode_dynamic(reqs)
        self.tokens_per_step_total += p[2 * S + 1 :]
        self._count_block(p[2 * S + 1 :])
        for r in reqs:
            r.fed(int(p[S + r.slot]))
        return self._emit(reqs, logits[slots], [int(p[s]) for s in slots])

    def _decode_dynamic(self, reqs: list[Request]) -> list[TokenEvent]:
        slots = np.array([r.slot for r in reqs], dtype=np.int64)
        tokens = torch.tensor([r.next_input() for r in reqs], device=self.device)
        positions = torch.tensor([r.position for r in reqs], device=self.device)
        res = decode_step(self.model, self.cache, slots, tokens, positions)
        if res.tokens_per_step:
            self.tokens_per_step_total += np.asarray(res.tokens_per_step, dtype=np.int64)
            self._count_block(res.tokens_per_step)
        for r, d in zip(reqs, res.depth.tolist()):
            r.fed(d)
        return self._emit(reqs, res.logits)

    def _count_block(self, rows_per_step) -> None:
        ran = [int(n) for n in rows_per_step if n > 0]
        self.block_calls += len(ran)
        self.block_items += sum(ran)
        if self.queue:
            self.steady_calls += len(ran)
            self.steady_items += sum(ran)

    # -- conveniences ----------------------------------------------------------------------
    def stream(self) -> Iterator[TokenEvent]:
        """Run until every submitted request is done, yielding tokens as they are made."""
        while not self.idle():
            yield from self.step()

    def run(self) -> None:
        for _ in self.stream():
            pass


def engine_generate(model: MoRLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, max_batch: int | None = None,
                    max_len: int | None = None, seed: int | None = None, static: bool = False,
                    schedule: str = "lockstep", **sampling) -> GenerationOutput:
    """`generate()`'s interface on the engine: every prompt becomes a request (prompt i seeded
    with seed + i when seed is given); at most max_batch run at once."""
    was_training = model.training
    longest = max(len(p) for p in prompts) + max_new_tokens
    eng = Engine(model, max_batch or len(prompts), max_len or longest, static=static, schedule=schedule)
    try:
        reqs = [eng.submit(p, max_new_tokens, seed=None if seed is None else seed + i, **sampling) for i, p in enumerate(prompts)]
        eng.run()
    finally:
        model.train(was_training)
    return GenerationOutput([r.tokens for r in reqs], [r.depths for r in reqs], [r.prompt_depths for r in reqs])
