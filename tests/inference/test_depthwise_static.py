"""The fixed-shape depth-wise scheduler (megamor.inference.depthwise_static) beyond its
exactness (tests/inference/test_depthwise.py runs every case on it): each operation traces as
one graph with no host read, the traced operations decode what `generate()` does, and with
nothing waiting an operation changes nothing (what its CUDA-graph capture relies on)."""

from __future__ import annotations

import pytest
import torch

from megamor.inference import Engine, generate
from megamor.inference.depthwise_static import default_buckets

from .test_depthwise import _alone, _model, _requests, _trace_logits

OPS = ("block", "flush", "enter")


def _engine(variant: str, kv: str, **kw) -> Engine:
    model = _model(variant, kv, "middle_cycle")
    return Engine(model, max_batch=4, max_len=24, schedule="depthwise", static=True, block_batch=3, flush_batch=2, **kw)


@pytest.mark.parametrize("variant,kv,buckets", [("mor_expert", "recursion_wise", [2, 2, 1]),
                                                ("mor_token_paper", "shared", None)])
def test_operations_trace_as_one_graph_and_decode_as_generate(variant, kv, buckets):
    eng = _engine(variant, kv, packed_linear=False, buckets=buckets)  # packed weights are a CPU eager path (compile=True turns them off)
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


@pytest.mark.parametrize("variant,sharing", [("mor_expert", "middle_cycle"), ("mor_token_paper", "middle_cycle"),
                                             ("mor_expert", "sequence")])
@pytest.mark.parametrize("batches,buckets", [((3, 2), [2, 1, 1]), ((4, 4), [2, 2, 1])])
def test_depth_buckets_defer_items_and_decode_as_generate(variant, sharing, batches, buckets):
    """Buckets: each depth's attention runs only its bucket of rows; items past it wait for the
    next block call (they keep their tickets)."""
    model = _model(variant, "recursion_wise", sharing)
    eng = Engine(model, max_batch=4, max_len=12, schedule="depthwise", static=True, block_batch=batches[0],
                 flush_batch=batches[1], buckets=buckets)
    seen = _trace_logits(eng)
    reqs = _requests(9)
    handles = [eng.submit(p, n) for p, n in reqs]
    eng.run()
    assert eng.depthwise.deferred > 0  # the case under test happened
    for (prompt, n), h in zip(reqs, handles):
        ref = generate(model, [prompt], n)
        assert h.tokens == ref.tokens[0] and h.depths == ref.depths[0]
        for got, want in zip(seen[h.id], _alone(model, prompt, n), strict=True):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_default_buckets_and_bad_buckets():
    model = _model("mor_expert", "recursion_wise", "middle_cycle")  # capacities 1, 2/3, 1/3: shares 1/2, 1/3, 1/6
    assert default_buckets(model, 32) == [21, 15, 8]
    assert default_buckets(_model("recursive", "recursion_wise", "middle_cycle"), 32) is None  # no routing
    assert default_buckets(_model("mor_expert", "shared", "middle_cycle"), 32) is None  # one site for all depths
    with pytest.raises(ValueError, match=r"buckets must give 1..block_batch \(4\) rows for each of the 3"):
        Engine(model, max_batch=4, schedule="depthwise", static=True, buckets=[4, 2])
    with pytest.raises(ValueError, match="buckets need each depth's own key/value sites"):
        Engine(_model("mor_expert", "shared", "middle_cycle"), max_batch=4, schedule="depthwise", static=True,
               buckets=[4, 2, 1])
