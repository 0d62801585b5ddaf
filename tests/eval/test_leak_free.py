"""Leak-free MoR scoring: a request scores the same alone and inside a padded batch of others,
because evaluation routes causally. The same check with the training-time (top-k over the
sequence) routing fails, which shows the test can fail."""

from __future__ import annotations

import numpy as np
import pytest

from megamor.eval.harness import encode_pair
from megamor.eval.scoring import Scorer, ScoreRequest
from megamor.eval.tasks import get_task


@pytest.fixture(scope="module")
def requests(tok, shared_data):
    task = get_task("hellaswag")
    pairs = []
    for d in task.load(shared_data)[:6]:
        for c, x in task.requests(d):
            pairs.append(encode_pair(tok, c, x, tok.eos_id))
    return [ScoreRequest(c + x, len(x)) for c, x in pairs]


def test_mor_model_routes(mor_model):
    assert mor_model.cfg.router.type == "expert_choice" and mor_model.cfg.num_recursions == 2


def test_alone_equals_in_padded_batch(mor_model, tok, requests):
    lengths = {len(r.tokens) for r in requests}
    assert len(lengths) > 3  # real padding happens in the batch
    alone = [Scorer(mor_model, batch_size=1).score_requests([r])[0] for r in requests]
    batched = Scorer(mor_model, batch_size=len(requests), pad_id=tok.eos_id).score_requests(requests)
    # the same requests in another order and with other pad ids
    rev = Scorer(mor_model, batch_size=5, pad_id=0).score_requests(requests[::-1])[::-1]
    depths = np.concatenate([a.depth for a in alone])
    assert 0 < (depths == 2).mean() < 1  # the router really sends some tokens deeper than others
    for a, b, c in zip(alone, batched, rev):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5, rtol=0)
        np.testing.assert_allclose(a.logprobs, c.logprobs, atol=2e-5, rtol=0)
        assert (a.depth == b.depth).all() and (a.depth == c.depth).all()
        assert (a.greedy == b.greedy).all()
        assert abs(a.total - b.total) < 1e-4


def test_training_time_routing_would_leak(mor_model, tok, requests):
    """Sanity check of the test above: top-k routing over the padded sequence changes scores."""

    def topk_forward(ids, mask):
        out = mor_model(ids, attention_mask=mask, causal_routing=False)
        return out.logits, out.stats.depth

    alone = [Scorer(mor_model, batch_size=1, forward=topk_forward).score_requests([r])[0] for r in requests]
    batched = Scorer(mor_model, batch_size=len(requests), pad_id=tok.eos_id, forward=topk_forward).score_requests(requests)
    worst = max(float(np.abs(a.logprobs - b.logprobs).max()) for a, b in zip(alone, batched))
    assert worst > 1e-3


def test_scorer_is_independent_of_input_order(mor_model, tok, requests):
    pairs = [(list(r.tokens[: len(r.tokens) - r.n_score]), list(r.tokens[len(r.tokens) - r.n_score :])) for r in requests]
    s = Scorer(mor_model, batch_size=7, pad_id=tok.eos_id)
    a = s.loglikelihood(pairs)
    b = s.loglikelihood(pairs[::-1] + pairs[:3])[: len(pairs)][::-1]
    assert a == b  # bitwise: the same unique requests always form the same batches


def test_an_empty_context_without_the_prefix_scores_every_continuation_token(tok):
    """--no-prefix (lm-eval's hf model on an export): an empty context is conditioned on the
    tokenizer's BOS (else EOS), as lm-eval's prefix token; the first continuation token was
    taken as the context and never scored."""
    cont = tok.encode(" the whole answer")
    want = tok.bos_id if getattr(tok, "bos_id", -1) >= 0 else tok.eos_id
    assert encode_pair(tok, "", " the whole answer", None) == ([want], cont)
    assert encode_pair(tok, "", " the whole answer", tok.eos_id) == ([tok.eos_id], cont)
