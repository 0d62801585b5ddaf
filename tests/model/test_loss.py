"""Chunked cross-entropy equals the plain one (loss and gradients), and the model uses it."""

import pytest
import torch
import torch.nn.functional as F

from megamor.model.loss import chunked_cross_entropy, cross_entropy_from_logits

from .helpers import mor


def _plain(h, w, t):
    logits = h @ w.t()
    return F.cross_entropy(logits.float().flatten(0, 1), t.flatten(), ignore_index=-100)


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 37, 24, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (0.5 * torch.randn(101, 24, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    t = torch.randint(0, 101, (3, 37), generator=g)
    t[0, :5] = -100
    t[2, -3:] = -100
    return h, w, t


def _loss_and_grads(fn, h, w, t):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, t)
    (2.5 * loss).backward()  # a non-unit upstream gradient
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [7, 64, None])
def test_equals_plain_fp32(chunk):
    h, w, t = _inputs()
    got = _loss_and_grads(lambda *a: chunked_cross_entropy(*a, chunk_tokens=chunk), h, w, t)
    ref = _loss_and_grads(_plain, h, w, t)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype
        assert (a - b).abs().max().item() <= 1e-6


def test_equals_plain_bf16_autocast():
    h, w, t = _inputs()
    ref = _loss_and_grads(_plain, h.double(), w.double(), t)  # exact reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss_and_grads(lambda *a: chunked_cross_entropy(*a, chunk_tokens=16), h, w, t)
        plain = _loss_and_grads(_plain, h, w, t)
    for a, b, p in zip(got, ref, plain):
        err, plain_err = (a.double() - b).abs().max().item(), (p.double() - b).abs().max().item()
        assert a.dtype == torch.float32  # gradients in the inputs' dtype
        assert err <= 2 * plain_err + 1e-4  # as close to exact as autocast's own CE
        assert err <= 2e-2 * b.abs().max().item()  # bf16 tolerance


def test_without_grad_and_from_logits():
    h, w, t = _inputs()
    with torch.no_grad():
        ref = _plain(h, w, t)
        assert torch.allclose(chunked_cross_entropy(h, w, t, chunk_tokens=10), ref, atol=1e-6)
        assert torch.allclose(cross_entropy_from_logits(h @ w.t(), t, chunk_tokens=10), ref, atol=1e-6)


def test_model_loss_without_logits_equals_loss_with_logits():
    m = mor("expert_choice", nr=2)
    x = torch.randint(0, m.cfg.vocab_size, (2, 24))
    out = m(x, targets=x, return_logits=False)
    assert out.logits is None
    out.loss.backward()
    g_chunked = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    full = m(x, targets=x)
    full.loss.backward()
    ref = F.cross_entropy(full.logits.detach().flatten(0, 1), x.flatten())
    assert abs(out.loss.item() - ref.item()) <= 1e-6 and abs(full.loss.item() - ref.item()) <= 1e-6
    for a, p in zip(g_chunked, m.parameters()):
        assert (a - p.grad).abs().max().item() <= 1e-6


def test_lm_loss_is_replaceable_from_outside():
    m = mor("expert_choice", nr=2)
    calls = []

    def spy(h, weight, targets):
        calls.append((h.shape, weight is m.lm_head.weight, targets.shape))
        return _plain(h, weight, targets)

    m.lm_loss = spy
    x = torch.randint(0, m.cfg.vocab_size, (2, 12))
    m(x, targets=x, return_logits=False)
    assert calls == [(torch.Size([2, 12, 64]), True, torch.Size([2, 12]))]


def test_a_batch_with_every_target_ignored_has_loss_zero_not_nan():
    """A micro-batch whose targets are all -100: 0/0 made the loss NaN, and step.py's
    token-weighted sum (0 x NaN) skipped the whole optimizer step; now 0 in every path."""
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    t = torch.full((2, 5), -100)
    loss = chunked_cross_entropy(h, w, t)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0
    with torch.no_grad():
        assert chunked_cross_entropy(h, w, t).item() == 0.0
    assert cross_entropy_from_logits(torch.randn(2, 5, 11), t).item() == 0.0
