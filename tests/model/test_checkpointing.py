"""Activation checkpointing of every layer application leaves loss and gradients unchanged."""

import pytest
import torch

from .helpers import mor


@pytest.mark.parametrize("router,kv", [("expert_choice", "recursion_wise"), ("expert_choice", "shared"), ("token_choice", "recursion_wise")])
def test_checkpointing_is_exact(router, kv):
    m = mor(router, sharing="middle_cycle", kv_mode=kv, seed=2)
    x = torch.randint(0, m.cfg.vocab_size, (2, 24))

    def run():
        m.zero_grad()
        out = m(x, targets=x)
        (out.loss + out.aux_loss).backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    loss_a, grads_a = run()
    calls = []

    def counting_checkpoint(fn, *args):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

    m.enable_activation_checkpointing(counting_checkpoint)
    loss_b, grads_b = run()
    assert len(calls) == m.cfg.n_layers  # every layer application was wrapped
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-5), n
    m.enable_activation_checkpointing()  # the default (non-reentrant torch checkpoint)
    loss_c, grads_c = run()
    assert torch.equal(loss_a, loss_c)
    assert grads_a.keys() == grads_c.keys()
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_c[n], atol=1e-6, rtol=1e-5), n
