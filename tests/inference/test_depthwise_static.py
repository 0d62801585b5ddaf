"""The fixed-shape depth-wise scheduler (megamor.inference.depthwise_static) beyond its
exactness (tests/inference/test_depthwise.py runs every case on it): each operation traces as
one graph with no host read, the traced operations decode what `generate()` does, and with
nothing waiting an operation changes nothing (what its CUDA-graph capture relies on)."""

from __future__ import annotations

import pytest
import torch

from megamor.inference import Engine, generate

from .test_depthwise import _model, _requests

OPS = ("block", "flush", "enter")


def _engine(variant: str, kv: str, **kw) -> Engine:
    model = _model(variant, kv, "middle_cycle")
    return Engine(model, max_batch=4, max_len=24, schedule="depthwise", static=True, block_batch=3, flush_batch=2, **kw)


@pytest.mark.parametrize("variant,kv", [("mor_expert", "recursion_wise"), ("mor_token_paper", "shared")])
def test_operations_trace_as_one_graph_and_decode_as_generate(variant, kv):
    eng = _engine(variant, kv, packed_linear=False)  # packed weights are a CPU eager path (compile=True turns them off)
    sched = eng.depthwise
    # fullgraph=True fails on any .item(), .cpu(), data-dependent shape or Python branch on a tensor
    sched._fns = {k: torch.compile(f, backend="eager", fullgraph=True) for k, f in sched._fns.items()}
    reqs = _requests(6, seed=3)
    handles = [eng.submit(p, n) for p, n in reqs]
    eng.run()
    assert sched.block_calls > 0 and sched.mixed_calls > 0
    for (prompt, n), h in zip(reqs, handles):
        ref = generate(eng.model, [prompt], n)
        assert h.tokens == ref.tokens[0] and h.depths == ref.depths[0]


@torch.no_grad()
def test_an_operation_with_nothing_waiting_changes_nothing():
    """`_capture` warms up and records each operation with the queue, the exit buffer and the
    entering rows empty; that must leave every buffer, key and fill level as it was."""
    eng = _engine("mor_token_paper", "recursion_wise")
    sched = eng.depthwise
    for p, n in _requests(4, seed=5):
        eng.submit(p, n)
    for _ in range(5):  # mid-run: items queued, exited, caches partly filled
        eng.step()
    assert sched.n_queue + sched.n_exit > 0
    state = {name: getattr(sched, name) for name in ("H", "base", "depth", "pos", "choice", "G", "E", "ticket", "counter")}
    stores = {**{("k", s): t for s, t in eng.cache.k.items()}, **{("v", s): t for s, t in eng.cache.v.items()}}
    fills = eng.cache.fill_dev
    before = {k: t.clone() for k, t in [*state.items(), *stores.items(), *fills.items()]}
    saved = [t.clone() for t in (sched.queued, sched.exited, sched.in_valid)]
    for t in (sched.queued, sched.exited, sched.in_valid):
        t.zero_()
    for op in OPS:
        for _ in range(2):
            packed = sched._fns[op]()[-1]
            assert int(packed[0]) == 0  # no overflow
    after = {**state, **stores, **fills}
    for key, t in before.items():
        assert torch.equal(after[key], t), key
    for t, s in zip((sched.queued, sched.exited, sched.in_valid), saved):
        assert not t.any()
        t.copy_(s)
    eng.run()  # and the run goes on to the end
    assert eng.idle()
