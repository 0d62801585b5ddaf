"""The static decoding step has no host-device synchronisation: torch.compile traces it as
one graph (fullgraph=True fails on any .item(), .cpu(), data-dependent shape or Python branch
on a tensor), and the traced step computes what the eager one does."""

from __future__ import annotations

import pytest
import torch

from megamor.inference import Engine

from .test_engine import _model


@pytest.mark.parametrize("variant,kv", [("vanilla", "recursion_wise"), ("mor_expert", "shared"), ("mor_token", "recursion_wise")])
@torch.no_grad()
def test_static_step_traces_as_one_graph(variant, kv):
    model = _model(variant, kv)
    eng = Engine(model, max_batch=3, max_len=32, static=True, buckets=[3, 2, 1][: len(model.steps)])
    for p in ([1, 2, 3], [4, 5], [6]):
        eng.submit(p, 5)
    eng.step()  # prefill
    gs = eng.graph_step
    gs.tokens.copy_(torch.tensor([7, 8, 9]))
    gs.positions.copy_(torch.tensor([3, 2, 1]))
    gs.active.copy_(torch.tensor([True, True, False]))
    snap = eng.cache.snapshot_dev()
    traced = torch.compile(gs.step_fn, backend="eager", fullgraph=True)
    logits_t, packed_t = traced()
    eng.cache.restore_dev(snap)
    logits_e, packed_e = gs.step_fn()
    assert torch.equal(packed_t, packed_e)
    assert torch.allclose(logits_t, logits_e, atol=1e-6, rtol=0)
    assert packed_e[2 * 3].item() == 0  # no overflow: the bucketed path really ran


@torch.no_grad()
def test_full_slot_that_does_not_write_keeps_its_entries():
    """A slot whose site is exactly full and whose token does not run that site this step (or a
    free slot during CUDA-graph warm-up) keeps its fill level and its last key."""
    model = _model("mor_expert", "recursion_wise")
    eng = Engine(model, max_batch=2, max_len=16, static=True)
    eng.submit([1, 2, 3], 4)
    eng.step()
    gs, cache = eng.graph_step, eng.cache
    site = model.sites.prelude[0]
    cap = cache.capacity(site)
    cache.fill_dev[site][1] = cap
    last = cache.k[site][1, :, cap - 1].clone()
    gs.active.copy_(torch.tensor([True, False]))
    gs.tokens.copy_(torch.tensor([5, 0]))
    gs.positions.copy_(torch.tensor([3, 0]))
    gs.step_fn()
    assert int(cache.fill_dev[site][1]) == cap and int(cache.fill_dev[site][0]) == 4
    assert torch.equal(cache.k[site][1, :, cap - 1], last)


@torch.no_grad()
def test_overflowing_step_keeps_the_full_slots_last_key():
    """A request past the caches' length (max_len 4, 23 tokens): the static step overflows and
    is redone on the dynamic path. The overflowing step must not have written the new key over
    the full slot's last one (it did: logits off by 2.5e-4, tokens still equal)."""
    from .test_depthwise import _alone, _trace_logits
    from .test_depthwise import _model as _dw_model

    model = _dw_model("mor_expert", "recursion_wise", "middle_cycle")
    eng = Engine(model, max_batch=2, max_len=4, static=True)
    seen = _trace_logits(eng)
    eng.submit([1, 2, 3], 20)
    eng.submit([5, 6], 20)
    eng.run()
    assert eng.overflow_steps > 0  # the case under test happened
    for i, prompt in enumerate(([1, 2, 3], [5, 6])):
        for got, want in zip(seen[i], _alone(model, prompt, 20), strict=True):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
