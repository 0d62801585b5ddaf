"""Decoding with megamor.inference.generate: caches against recomputation, batching, EOS, sampling."""

import pytest
import torch

from megamor.inference.generate import generate, sample_next
from tests.model.helpers import mor


@pytest.mark.parametrize("kv", ["recursion_wise", "shared"])
def test_greedy_with_cache_equals_without(kv):
    m = mor("expert_choice", kv_mode=kv, seed=3).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    a = [s.tokens for s in generate(m, prompts, 12, stream_tokens=True)]
    b = [s.tokens for s in generate(m, prompts, 12, stream_tokens=True, use_cache=False)]
    assert a == b and len(a) == 12


def test_batch_equals_single_prompt_decoding():
    m = mor("token_choice", sharing="cycle", seed=4).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    batch = generate(m, prompts, 8)
    for i, p in enumerate(prompts):
        single = generate(m, [p], 8)
        assert single.tokens[0] == batch.tokens[i]
        assert single.depths[0] == batch.depths[i]
    assert all(len(d) == 7 for d in batch.depths)  # every fed-back token has a depth
    assert all(1 <= d <= 3 for row in batch.depths for d in row)


def test_eos_stops_and_streams():
    m = mor("expert_choice", seed=5).eval()
    first = generate(m, [[1, 2, 3]], 1).tokens[0][0]
    out = generate(m, [[1, 2, 3]], 10, eos_id=first)
    assert out.tokens[0] == [first]
    steps = list(generate(m, [[1, 2, 3], [4]], 4, stream_tokens=True, eos_id=first))
    assert steps[0].tokens[0] == first and steps[0].finished[0]
    assert all(s.tokens[0] == -1 for s in steps[1:])


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits).item() == 1
    assert {sample_next(logits, 1.0, top_k=1, generator=g).item() for _ in range(20)} == {1}
    picks = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picks == {1, 2}
    p = logits.softmax(-1)[0]
    assert p[1] < 0.6 and p[1] + p[2] > 0.9
    picks = {sample_next(logits, 1.0, top_p=0.6, generator=g).item() for _ in range(200)}
    assert picks == {1, 2}  # the smallest set reaching 0.6 holds tokens 1 and 2
    seeded = mor("expert_choice", seed=6).eval()
    a = generate(seeded, [[1, 2]], 6, temperature=1.0, seed=7).tokens
    b = generate(seeded, [[1, 2]], 6, temperature=1.0, seed=7).tokens
    assert a == b


def test_top_p_keeps_the_smallest_set_reaching_p_even_at_a_tie():
    """The mass before a token equal to top_p: that token is not needed (it kept one too many);
    the same set as transformers' TopPLogitsWarper."""
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    for logits, p in ((torch.zeros(1, 4), 0.5), (torch.tensor([[0.5, 0.3, 0.2]]).log(), 0.8)):
        ours = {sample_next(logits, 1.0, top_p=p, generator=g).item() for _ in range(300)}
        kept = transformers.TopPLogitsWarper(p)(None, logits.clone()).isfinite()[0]
        assert len(ours) == int(kept.sum()) == 2, (logits, p, ours)


@pytest.mark.parametrize("kw,message", [
    ({"max_new_tokens": 40}, "exceeds the model's context"),  # ran to position 138 of a 128-token model
    ({"temperature": 1.0, "top_p": 0.0}, "top_p must be in"),  # meant: no filter
    ({"temperature": 1.0, "top_k": -1}, "top_k must be >= 0"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
])
def test_a_request_no_decoder_should_run_is_refused(kw, message):
    from megamor.inference import engine_generate

    model = mor("expert_choice", seed=1).eval()
    assert model.cfg.max_seq_len == 128
    kw = {"max_new_tokens": 4, **kw}
    prompt = [[1] * 100]
    for run in (generate, engine_generate):
        with pytest.raises(ValueError, match=message):
            run(model, prompt, **kw)

