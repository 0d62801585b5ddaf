"""Each sharing strategy without a router equals a plain stack of the same module objects."""

import pytest
import torch

from .helpers import mor
from .reference import plain_stack_logits, virtual_order


@pytest.mark.parametrize(
    "sharing,nr,n_layers",
    [("none", 1, 6), ("cycle", 3, 6), ("sequence", 3, 6), ("middle_cycle", 3, 8), ("middle_sequence", 2, 8), ("cycle", 2, 8)],
)
def test_strategy_equals_plain_stack(sharing, nr, n_layers):
    m = mor("none", sharing=sharing, nr=nr, n_layers=n_layers).eval()
    order = virtual_order(sharing, n_layers, nr)
    assert max(order) + 1 == len(m.layers)
    x = torch.randint(0, m.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        got = m(x).logits
        ref = plain_stack_logits(m, x, order)
    assert (got - ref).abs().max().item() <= 1e-5
    # Orders differ between strategies, so this comparison can tell them apart.
    if sharing == "cycle" and nr == 3:
        with torch.no_grad():
            wrong = plain_stack_logits(m, x, virtual_order("sequence", n_layers, nr))
        assert (got - wrong).abs().max().item() > 1e-3
