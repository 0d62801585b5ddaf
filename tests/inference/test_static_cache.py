"""Recursion-wise caching holds keys/values only for the tokens routed to each depth."""

from __future__ import annotations

import pytest

from megamor.inference import Engine

from .test_engine import _model, _requests


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("variant,kv", [("mor_expert", "recursion_wise"), ("mor_token", "recursion_wise"), ("mor_expert", "shared")])
def test_kv_bytes_equal_routed_token_counts(variant, kv, static):
    model = _model(variant, kv)
    eng = Engine(model, max_batch=4, max_len=128, static=static)
    handles = [eng.submit(p, 40) for p, _ in _requests(4, seed=2)]
    for _ in range(12):
        eng.step()
    assert len(eng.running) == 4
    sites = model.sites
    owning_steps = [[s for s in ids if s not in sites.kv_source] for ids in sites.steps]
    expected = 0
    full = 0
    # Full-depth caching: every token at every attention site, shared or not.
    n_sites = len(sites.prelude) + len(sites.coda) + sum(len(s) for s in sites.steps)
    for h in handles:
        depths = h.prompt_depths + h.depths  # every token fed through the model so far
        expected += len(depths) * (len(sites.prelude) + len(sites.coda))
        expected += sum(len(ids) * sum(d > r for d in depths) for r, ids in enumerate(owning_steps))
        full += len(depths) * n_sites
    per_token = eng.cache.bytes_per_token()
    assert eng.cache.nbytes() == expected * per_token
    assert eng.cache.nbytes() < full * per_token  # not the full-depth count
    # Routed steps' storage starts at their capacity share, not the full length.
    deepest = owning_steps[-1] if kv == "recursion_wise" else []
    for s in deepest:
        assert eng.cache.capacity(s) < eng.cache.capacity(sites.steps[0][0])


def test_a_request_past_max_len_grows_the_caches_a_few_times_not_per_token():
    """Each growth copies a site (and recaptures CUDA graphs); past max_len the caches used to
    grow by one token per step (19 growths for this request)."""
    model = _model("mor_expert", "recursion_wise")
    eng = Engine(model, max_batch=1, max_len=4)
    req = eng.submit([1, 2, 3], 40)
    site = model.sites.prelude[0]
    caps = {eng.cache.capacity(site)}
    while not eng.idle():
        eng.step()
        caps.add(eng.cache.capacity(site))
    assert len(req.tokens) == 40
    assert 2 <= len(caps) <= 4  # grown once or a few times
    cap = max(caps)
    assert 43 <= cap <= 43 + 16 + 43 // 4  # holds the request; at most one growth step beyond it
