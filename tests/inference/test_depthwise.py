"""The depth-wise schedule (continuous depth-wise batching): greedy fp32 output of every request
equals `generate()` on that request alone, for every variant, KV mode and sharing strategy,
with requests of mixed lengths joining while others decode; the block really runs mixed depths."""

from __future__ import annotations

import functools
import random

import pytest
import torch

from megamor.inference import Engine, engine_generate, generate
from megamor.model import MoRLM
from tests.model.helpers import mor, tiny_config

VARIANTS = {
    "vanilla": lambda kv, sharing: MoRLM(tiny_config(n_layers=4)),
    "recursive": lambda kv, sharing: mor({"type": "none"}, sharing=sharing, kv_mode=kv, router={"type": "none"}),
    "mor_expert": lambda kv, sharing: mor("expert_choice", sharing=sharing, kv_mode=kv),
    "mor_token": lambda kv, sharing: mor("token_choice", sharing=sharing, kv_mode=kv),
    # token choice's paper update (H^1 + g * f(H^i) at the chosen depth), the random router
    "mor_token_paper": lambda kv, sharing: mor("token_choice", sharing=sharing, kv_mode=kv,
                                               router={"type": "token_choice", "token_choice_update": "paper"}),
    "mor_expert_random": lambda kv, sharing: mor("expert_choice", sharing=sharing, kv_mode=kv,
                                                 router={"type": "expert_choice", "rand_router": True}),
    # causal routing by the auxiliary router (its logit > 0), not the main router's threshold
    "mor_expert_aux": lambda kv, sharing: mor("expert_choice", sharing=sharing, kv_mode=kv,
                                              router={"type": "expert_choice", "aux_router": True}),
}
CASES = [("vanilla", "recursion_wise", "none")] + [
    (v, kv, sh) for v in ("recursive", "mor_expert", "mor_token") for kv in ("recursion_wise", "shared")
    for sh in ("middle_cycle", "cycle")] + [
    (v, "recursion_wise", sh) for v in ("mor_expert", "mor_token") for sh in ("sequence", "middle_sequence")] + [
    (v, kv, "middle_cycle") for v in ("mor_token_paper", "mor_expert_random", "mor_expert_aux")
    for kv in ("recursion_wise", "shared")]


def _model(variant: str, kv: str, sharing: str, seed: int = 1) -> MoRLM:
    torch.manual_seed(seed)
    model = VARIANTS[variant](kv, sharing).eval()
    if model.routers is not None:  # thresholds that split tokens between depths (a random router sends all one way)
        for router in model.routers:
            router.threshold.fill_(0.0)
    return model


def _requests(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [([rng.randrange(1, 200) for _ in range(rng.randrange(1, 14))], rng.randrange(1, 12)) for _ in range(n)]


def _trace_logits(eng: Engine) -> dict[int, list[torch.Tensor]]:
    """Every request's next-token logits, in order (tokens alone hide small errors in a random model)."""
    seen: dict[int, list[torch.Tensor]] = {}
    emit = eng._emit

    def spy(reqs, logits, greedy=None):
        for i, r in enumerate(reqs):
            seen.setdefault(r.id, []).append(logits[i].clone())
        return emit(reqs, logits, greedy)

    eng._emit = spy
    return seen


def _alone(model: MoRLM, prompt: list[int], n: int) -> list[torch.Tensor]:
    eng = Engine(model, max_batch=1, max_len=len(prompt) + n)
    seen = _trace_logits(eng)
    eng.submit(prompt, n)
    eng.run()
    return seen[0]


# the every-slot path (block and flush batches of every slot) on one sharing, each routing kind
EVERY_SLOT = [(v, kv, "middle_cycle") for v in ("recursive", "mor_expert_aux", "mor_token_paper")
              for kv in ("recursion_wise", "shared")]
SCHEDULERS = [(False, (3, 2)), (True, (3, 2))]


@functools.cache
def _references(variant: str, kv: str, sharing: str, prompt: tuple[int, ...], n: int):
    """`generate()` and the engine's logits for one request alone, computed once per model and
    request for the schedulers that are compared against them (models are rebuilt from seeds)."""
    model = _model(variant, kv, sharing)
    return generate(model, [list(prompt)], n), _alone(model, list(prompt), n)


@pytest.mark.parametrize("variant,kv,sharing,static,batches",
                         [(*case, *sched) for case in CASES for sched in SCHEDULERS]
                         + [(*case, True, (4, 4)) for case in EVERY_SLOT],
                         ids=[f"{'-'.join(c)}-{n}" for c in CASES for n in ("dynamic", "static")]
                         + [f"{'-'.join(c)}-static_every_slot" for c in EVERY_SLOT])
def test_depthwise_equals_generate_alone(variant, kv, sharing, static, batches):
    """static: the fixed-shape scheduler (megamor.inference.depthwise_static); max_len 12 is
    shorter than most requests, so its caches overflow and grow mid-run (the redo path).
    every_slot: block and flush batches of every slot (no top-k, caches read in place)."""
    model = _model(variant, kv, sharing)
    reqs = _requests(9)
    eng = Engine(model, max_batch=4, max_len=12, schedule="depthwise", block_batch=batches[0], flush_batch=batches[1],
                 static=static)
    assert (eng.depthwise is None) == (not model.steps)  # vanilla: no block, lockstep's step runs it
    logits = _trace_logits(eng)
    handles = [eng.submit(p, n) for p, n in reqs[:5]]
    for _ in range(4):
        eng.step()
    handles += [eng.submit(p, n) for p, n in reqs[5:]]  # joining while others decode
    running = set()
    while not eng.idle():
        eng.step()
        running.add(len(eng.running))
    assert max(running) == 4
    for (prompt, n), h in zip(reqs, handles):
        ref, alone = _references(variant, kv, sharing, tuple(prompt), n)
        assert h.tokens == ref.tokens[0], (prompt, n)
        assert h.depths == ref.depths[0]
        assert h.prompt_depths == ref.prompt_depths[0]
        assert len(logits[h.id]) == len(alone)
        for got, want in zip(logits[h.id], alone):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert all(f.sum() == 0 for f in eng.cache.fill.values())  # every slot was released
    if model.steps:
        if variant.startswith("mor") or batches[0] < 4:  # recursive with every slot per call: all move together
            assert eng.depthwise.mixed_calls > 0  # the block ran tokens of different depths in one call
        if static:
            assert eng.depthwise.overflows > 0  # a full site was grown and the operation redone
        depths = {d for h in handles for d in h.depths}
        if variant.startswith("mor"):
            assert len(depths) > 1  # routing really sent tokens to different depths


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_eos_budget_and_seeded_sampling(static):
    model = _model("mor_expert", "recursion_wise", "middle_cycle")
    first = generate(model, [[1, 2, 3]], 1).tokens[0][0]
    eng = Engine(model, max_batch=2, max_len=16, schedule="depthwise", static=static)
    a = eng.submit([1, 2, 3], 10, eos_id=first)
    b = eng.submit([4, 5], 4)
    c = eng.submit([6], 1)
    events = list(eng.stream())
    assert a.tokens == [first] and len(b.tokens) == 4 and len(c.tokens) == 1
    assert [e.token for e in events if e.request == b.id] == b.tokens
    assert [e.finished for e in events if e.request == a.id] == [True]
    # Seeded sampling does not depend on what else is in the batch, nor on the schedule.
    kw = {"temperature": 1.0, "top_k": 20, "top_p": 0.9, "seed": 3}
    x = engine_generate(model, [[1, 2], [7, 8, 9], [4]], 6, schedule="depthwise", static=static, **kw)
    y = engine_generate(model, [[1, 2]], 6, schedule="depthwise", static=static, **kw)
    z = engine_generate(model, [[1, 2]], 6, **kw)
    assert x.tokens[0] == y.tokens[0] == z.tokens[0]


def test_occupancy_full_block_vs_lockstep():
    """With more requests in flight than the block holds, every block call at steady state is
    full; lockstep's deeper recursions run ever smaller batches."""
    model = _model("mor_expert", "recursion_wise", "middle_cycle")
    prompts = _requests(24, seed=2)
    occ, shares = {}, {}
    for schedule, static in (("lockstep", False), ("depthwise", False), ("depthwise_static", True)):
        eng = Engine(model, max_batch=8, max_len=32, schedule=schedule.split("_")[0], block_batch=4, static=static)
        for p, _ in prompts:
            eng.submit(p, 10)
        eng.run()
        occ[schedule] = eng.occupancy(steady=True)
        shares[schedule] = eng.tokens_per_step_total.tolist()
        assert eng.occupancy() <= 1.0
    assert occ["depthwise"] == occ["depthwise_static"] == 1.0
    assert shares["depthwise"] == shares["lockstep"] == shares["depthwise_static"]  # the same tokens ran each step
    assert occ["lockstep"] < 0.9


def test_bad_input_one_line():
    model = _model("mor_expert", "recursion_wise", "middle_cycle")
    with pytest.raises(ValueError, match="schedule must be one of lockstep, depthwise, got 'depth'"):
        Engine(model, schedule="depth")
    with pytest.raises(ValueError, match=r"block_batch must be between 1 and max_batch \(2\) with static=True, got 3"):
        Engine(model, max_batch=2, schedule="depthwise", static=True, block_batch=3)
    eng = Engine(model, max_batch=2, schedule="depthwise")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        eng.submit([1] * 100, 29)
    assert eng.idle()  # nothing was queued
    model.routing.settings.type = "mixture_of_depths"  # a routing the scheduler does not know
    with pytest.raises(ValueError, match="cannot serve routing type 'mixture_of_depths'"):
        Engine(model, schedule="depthwise")
