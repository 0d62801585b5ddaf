"""oneDNN-packed linears (megamor.inference.packed_linear): same results as torch's linear to
fp32 rounding, weights changed in place are repacked, modules are untouched outside the context,
and the engine really decodes through them (its exactness tests then cover the packed path)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from megamor.inference import Engine, generate
from megamor.inference.packed_linear import PackedLinears, available
from tests.model.helpers import mor

pytestmark = pytest.mark.skipif(not available(nn.Linear(4, 4)), reason="needs oneDNN's linear ops (CPU torch)")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 24, bias=False), nn.Linear(24, 1))


@torch.no_grad()
def test_packed_equals_linear_and_restores_modules():
    net = _net()
    x = torch.randn(11, 1, 32)
    ref = net(x)
    packed = PackedLinears(net)
    assert packed.enabled and len(packed.linears) == 2  # the 1-output linear stays plain
    with packed.active():
        assert "forward" in net[0].__dict__
        out = net(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert all("forward" not in m.__dict__ for m in net)


@torch.no_grad()
def test_weight_changed_in_place_is_repacked():
    net, ref = _net(), _net()
    packed = PackedLinears(net)
    assert packed.repacks == 2  # packed at construction
    x = torch.randn(5, 32)
    with packed.active():
        net(x)
        net[0].weight.mul_(2.0)  # an optimizer step's kind of update
        out = net(x)
    ref[0].weight.mul_(2.0)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
    with packed.active():
        net[1].weight = nn.Parameter(torch.zeros_like(net[1].weight))  # a replaced weight
        zeros = net(x)
    torch.testing.assert_close(zeros, net[2].bias.expand(5, 1))
    assert packed.repacks == 4  # two first packs, then one per changed weight


def test_inactive_with_grad():
    net = _net()
    with PackedLinears(net).active():
        assert "forward" not in net[0].__dict__  # packed ops have no backward: training is untouched


def test_engine_decodes_through_packed_linears():
    torch.manual_seed(1)
    model = mor("expert_choice").eval()
    prompts = [[5, 6, 7], [9], [3, 4]]
    eng = Engine(model, max_batch=3, max_len=16)
    handles = [eng.submit(p, 6) for p in prompts]
    eng.run()
    assert eng.packed.enabled and eng.packed.repacks > 0
    for p, h in zip(prompts, handles):
        assert h.tokens == generate(model, [p], 6).tokens[0]
    plain = Engine(model, max_batch=3, max_len=16, packed_linear=False)
    plain.submit(prompts[0], 6)
    plain.run()
    assert not plain.packed.enabled and plain.packed.repacks == 0
