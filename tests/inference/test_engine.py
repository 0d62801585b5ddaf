"""The engine's greedy output equals `generate()` on each request alone (fp32), for every
variant and KV mode, with requests of mixed lengths joining and leaving a small slot pool."""

from __future__ import annotations

import random

import pytest
import torch

from megamor.inference import Engine, engine_generate, generate
from megamor.model import MoRLM
from tests.model.helpers import mor, tiny_config

VARIANTS = {
    "vanilla": lambda kv: MoRLM(tiny_config(n_layers=4)),
    "recursive": lambda kv: mor({"type": "none"}, kv_mode=kv, router={"type": "none"}),
    "mor_expert": lambda kv: mor("expert_choice", kv_mode=kv),
    "mor_token": lambda kv: mor("token_choice", sharing="cycle", kv_mode=kv),
}
CASES = [("vanilla", "recursion_wise")] + [(v, kv) for v in ("recursive", "mor_expert", "mor_token") for kv in ("recursion_wise", "shared")]


def _model(variant: str, kv: str, seed: int = 1) -> MoRLM:
    torch.manual_seed(seed)
    return VARIANTS[variant](kv).eval()


def _requests(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [([rng.randrange(1, 200) for _ in range(rng.randrange(1, 14))], rng.randrange(1, 12)) for _ in range(n)]


@pytest.mark.parametrize("variant,kv", CASES)
def test_engine_equals_generate_alone(variant, kv):
    model = _model(variant, kv)
    reqs = _requests(9)
    eng = Engine(model, max_batch=3, max_len=12)  # fewer slots than requests; caches must grow
    handles = [eng.submit(p, n) for p, n in reqs[:5]]
    seen_running = set()
    for _ in range(3):
        eng.step()
    handles += [eng.submit(p, n) for p, n in reqs[5:]]  # joining while others decode
    while not eng.idle():
        eng.step()
        seen_running.add(len(eng.running))
    assert max(seen_running) == 3  # requests really shared the batch
    for (prompt, n), h in zip(reqs, handles):
        ref = generate(model, [prompt], n)
        assert h.tokens == ref.tokens[0], (prompt, n)
        assert h.depths == ref.depths[0]
        assert h.prompt_depths == ref.prompt_depths[0]
    assert all(f.sum() == 0 for f in eng.cache.fill.values())  # every slot was released


def test_prefill_runs_every_prompt_token_but_the_last():
    """The last prompt token runs in the decoding step with the running requests (it makes the
    first new token): a one-token prompt (the paper's protocol, no prefix) costs no forward."""
    model = _model("mor_expert", "recursion_wise")
    widths: list[tuple[int, ...]] = []
    hook = model.register_forward_hook(lambda m, args, out: widths.append(tuple(args[0].shape)))
    try:
        eng = Engine(model, max_batch=4, max_len=16)
        reqs = [([5], 3), ([7, 9, 11, 13, 2], 3), ([4], 3), ([8, 6, 3], 3)]
        handles = [eng.submit(p, n) for p, n in reqs]
        eng.run()
        only_short = Engine(model, max_batch=2, max_len=8)
        short = [only_short.submit([3], 4), only_short.submit([9], 4)]
        only_short.run()
    finally:
        hook.remove()
    assert widths == [(2, 4)]  # one prefill: the two longer prompts without their last token
    for (prompt, n), h in zip(reqs + [([3], 4), ([9], 4)], handles + short):
        ref = generate(model, [prompt], n)
        assert (h.tokens, h.depths, h.prompt_depths) == (ref.tokens[0], ref.depths[0], ref.prompt_depths[0])


def test_eos_sampling_and_streaming():
    model = _model("mor_expert", "recursion_wise")
    first = generate(model, [[1, 2, 3]], 1).tokens[0][0]
    eng = Engine(model, max_batch=2, max_len=16)
    a = eng.submit([1, 2, 3], 10, eos_id=first)
    b = eng.submit([4, 5], 4)
    events = list(eng.stream())
    assert a.tokens == [first] and len(b.tokens) == 4
    assert [e.token for e in events if e.request == b.id] == b.tokens
    assert [e.finished for e in events if e.request == a.id] == [True]
    # Seeded sampling does not depend on what else is in the batch.
    x = engine_generate(model, [[1, 2], [7, 8, 9]], 6, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    y = engine_generate(model, [[1, 2]], 6, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert x.tokens[0] == y.tokens[0]


@pytest.mark.parametrize("variant,kv", CASES)
@pytest.mark.parametrize("buckets", ["default", "tiny"])
def test_static_step_equals_generate_alone(variant, kv, buckets):
    """The fixed-shape (CUDA-graph) step: same tokens; with tight buckets ([3, 2, 1] rows for
    3 slots) some steps run bucketed, others overflow and are redone on the dynamic path."""
    model = _model(variant, kv)
    reqs = _requests(7, seed=1)
    tiny = [3, 2, 1][: len(model.steps)] if buckets == "tiny" else None
    eng = Engine(model, max_batch=3, max_len=12, static=True, buckets=tiny)
    handles = [eng.submit(p, n) for p, n in reqs]
    eng.run()
    for (prompt, n), h in zip(reqs, handles):
        ref = generate(model, [prompt], n)
        assert h.tokens == ref.tokens[0], (prompt, n)
        assert h.depths == ref.depths[0]
    if buckets == "tiny" and model.steps:
        assert eng.overflow_steps < eng.static_steps  # bucketed steps ran
        if variant == "recursive":  # every token runs every step: 3 rows overflow a 2-row bucket
            assert eng.overflow_steps > 0
    if buckets == "default":
        assert eng.static_steps > 10
