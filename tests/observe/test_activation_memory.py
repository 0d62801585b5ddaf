"""SavedTensorMeter counts exactly the live storages autograd keeps for backward: each storage
once, no parameters, nothing a dropped graph held, only the inputs of a checkpointed region."""

import gc

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megamor.observe.activation_memory import ActivationPeak, SavedTensorMeter, measure_forward


def test_a_storage_saved_twice_counts_once_and_views_count_their_storage():
    x = torch.randn(8, 16, requires_grad=True)
    with SavedTensorMeter() as m:
        a = x * 2.0  # saves nothing (the scalar is not a tensor)
        y = a * a  # saves a twice: one storage
        q, k = a.chunk(2, dim=1)  # views of a
        z = q * k  # saves both views: still a's storage
    assert m.bytes == a.untyped_storage().nbytes() == 8 * 16 * 4
    assert m.tensors == 1
    (y.sum() + z.sum()).backward()  # the hooks hand the tensors back unchanged
    assert torch.allclose(x.grad, 2 * (2 * a) + 2 * (torch.cat([k, q], 1)), atol=1e-5)


def test_parameters_are_not_activations():
    lin = nn.Linear(16, 32, bias=False)
    x = torch.randn(2, 4, 16, requires_grad=True) * 1.0  # an activation: its gradient needs the weight
    out, m = measure_forward(lin, x)
    assert m.bytes == x.untyped_storage().nbytes()  # linear keeps its input; its weight is excluded
    # Without the exclusion, the weight's transpose (a view of the parameter) is counted.
    with SavedTensorMeter() as bare:
        out2 = lin(x)
    assert bare.bytes == x.untyped_storage().nbytes() + lin.weight.untyped_storage().nbytes()
    # An output nobody keeps has no graph: what it saved is gone.
    with SavedTensorMeter(exclude=lin) as gone:
        lin(x * 1.0)
    assert gone.bytes == 0
    del out, out2


def test_a_dropped_graph_holds_nothing():
    x = torch.randn(64, 64, requires_grad=True)
    with SavedTensorMeter() as m:
        kept = x.exp()  # exp saves its output
        dropped = x.sin()  # sin saves x (a leaf requiring grad: skipped)
        dropped = dropped.exp()  # saves a [64, 64] output ...
        del dropped  # ... whose graph is gone before the backward
        gc.collect()
    assert m.bytes == kept.untyped_storage().nbytes()


def test_checkpointed_region_keeps_only_its_input():
    lin1, lin2 = nn.Linear(32, 128), nn.Linear(128, 32)
    x = torch.randn(16, 32, requires_grad=True)
    inp = x * 1.0  # a non-leaf input, as a layer input is

    def region(t):
        return lin2(torch.relu(lin1(t)))

    with SavedTensorMeter(exclude=[*lin1.parameters(), *lin2.parameters()]) as plain:
        kept = region(inp)
    with SavedTensorMeter(exclude=[*lin1.parameters(), *lin2.parameters()]) as ck:
        out = checkpoint(region, inp, use_reentrant=False)
    # Plain: lin1's input, relu's output (also lin2's input): 16x32 + 16x128 floats.
    assert plain.bytes == (16 * 32 + 16 * 128) * 4
    assert ck.bytes == 16 * 32 * 4
    out.sum().backward()
    assert x.grad is not None
    del kept


def test_activation_peak_keeps_the_largest_of_a_window():
    peak = ActivationPeak()
    assert peak.take() is None
    for i, n in enumerate((10, 1000, 100)):
        x = torch.randn(n, requires_grad=True) * 1.0
        with peak.meter(None, measure=i != 1):  # the largest is not measured: not reported
            y = x * x
        del y
    assert peak.take() == 100 * 4
    assert peak.take() is None  # taking resets the window


def test_disabled_meter_installs_no_hooks():
    x = torch.randn(10, requires_grad=True) * 1.0
    with SavedTensorMeter(enabled=False) as m:
        (x * x).sum()
    assert m.bytes == 0 and m.tensors == 0
