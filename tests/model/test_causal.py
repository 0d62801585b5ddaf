"""Causal routing: no token's computation depends on later tokens, padding or other rows;
decoding with each KV mode reproduces the full forward pass."""

import pytest
import torch

from .helpers import mor

VARIANTS = [
    ("expert_choice", "middle_cycle", "recursion_wise"),
    ("expert_choice", "middle_cycle", "shared"),
    ("token_choice", "cycle", "recursion_wise"),
    ("token_choice", "cycle", "shared"),
    ("expert_choice", "middle_sequence", "recursion_wise"),
]


def _model(router, sharing, kv):
    m = mor(router, sharing=sharing, nr=3 if sharing != "middle_sequence" else 2, kv_mode=kv, seed=1)
    return m.eval()


@pytest.mark.parametrize("router,sharing,kv", VARIANTS)
def test_future_tokens_do_not_change_past_logits(router, sharing, kv):
    m = _model(router, sharing, kv)
    torch.manual_seed(0)
    x = torch.randint(0, m.cfg.vocab_size, (2, 40))
    y = x.clone()
    t = 23
    y[:, t + 1 :] = torch.randint(0, m.cfg.vocab_size, (2, 40 - t - 1))
    with torch.no_grad():
        a = m(x, causal_routing=True)
        b = m(y, causal_routing=True)
        train_mode = m(x), m(y)
    assert (a.logits[:, : t + 1] - b.logits[:, : t + 1]).abs().max().item() <= 1e-5
    depths = a.stats.depth
    assert depths.min() < depths.max()  # routing is really selective, so the test can fail
    if router == "expert_choice":
        # Training's top-k over the whole sequence does leak the future: the guard is needed.
        leak = (train_mode[0].logits[:, : t + 1] - train_mode[1].logits[:, : t + 1]).abs().max().item()
        assert leak > 1e-4


@pytest.mark.parametrize("router,sharing,kv", VARIANTS)
def test_alone_equals_inside_padded_batch(router, sharing, kv):
    m = _model(router, sharing, kv)
    torch.manual_seed(1)
    seq = torch.randint(0, m.cfg.vocab_size, (1, 17))
    others = torch.randint(0, m.cfg.vocab_size, (2, 31))
    with torch.no_grad():
        alone = m(seq, causal_routing=True).logits[0]
        # Right padding.
        batch = torch.zeros(3, 31, dtype=torch.long)
        mask = torch.zeros(3, 31, dtype=torch.bool)
        batch[0, :17], mask[0, :17] = seq[0], True
        batch[1:], mask[1:] = others, True
        right = m(batch, attention_mask=mask, causal_routing=True).logits[0, :17]
        # Left padding (positions come from the mask).
        batch_l = batch.clone()
        mask_l = torch.zeros_like(mask)
        batch_l[0] = 0
        batch_l[0, 14:], mask_l[0, 14:], mask_l[1:] = seq[0], True, True
        left = m(batch_l, attention_mask=mask_l, causal_routing=True).logits[0, 14:]
    assert (alone - right).abs().max().item() <= 1e-5
    assert (alone - left).abs().max().item() <= 1e-5


@pytest.mark.parametrize("router,sharing,kv", VARIANTS)
def test_decoding_with_cache_reproduces_full_forward(router, sharing, kv):
    m = _model(router, sharing, kv)
    torch.manual_seed(2)
    x = torch.randint(0, m.cfg.vocab_size, (2, 30))
    with torch.no_grad():
        full = m(x, causal_routing=True)
        cache = m.new_kv_cache(2)
        step_logits = [m(x[:, :10], causal_routing=True, kv_cache=cache).logits]
        for t in range(10, 30):
            out = m(x[:, t : t + 1], causal_routing=True, kv_cache=cache)
            step_logits.append(out.logits)
            assert torch.equal(out.stats.depth[:, 0], full.stats.depth[:, t])
    got = torch.cat(step_logits, 1)
    assert (got - full.logits).abs().max().item() <= 1e-5
    # Recursion-wise caching stores keys only for tokens that ran each site.
    stored = cache.nbytes(valid_only=True)
    every_site = cache.nbytes(valid_only=False)
    assert stored < every_site or kv == "shared"
