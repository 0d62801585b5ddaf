"""A training forward/backward never reads single values off the device (on a GPU each read
drains the pipeline and breaks a compiled graph): no `.item()` / `int()` / `bool()` of a
tensor, no boolean-mask indexing, no `nonzero`, no `F.one_hot` (its range check reads the
device). Counted with a dispatch mode that sees every aten call of the passes."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .helpers import mor

aten = torch.ops.aten


class HostReads(TorchDispatchMode):
    READS = frozenset({aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
             aten.one_hot.default, aten.unique_consecutive.default})

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])
        if func in self.READS or bool_index:
            self.calls.append(str(func))
        return func(*args, **kwargs)


def _count(model, **kw):
    x = torch.randint(0, model.cfg.vocab_size, (2, 30))
    with HostReads() as mode:
        out = model(x[:, :-1], targets=x[:, 1:], return_logits=False, **kw)
        (out.loss + out.aux_loss).backward()
    return mode.calls


@pytest.mark.parametrize("sharing", ["middle_cycle", "cycle"])
def test_expert_choice_training_reads_nothing(sharing):
    assert _count(mor("expert_choice", sharing=sharing, nr=3).train()) == []


@pytest.mark.parametrize("balancing", ["loss", "loss_free"])
def test_token_choice_training_reads_nothing_per_step(balancing):
    # Its gathered lengths come from one batched transfer per forward (`tolist`, not an aten call).
    m = mor("token_choice", nr=3, router={"type": "token_choice", "balancing": balancing}).train()
    assert _count(m) == []


def test_recursive_and_vanilla_read_nothing():
    from megamor.model import MoRLM

    from .helpers import tiny_config

    assert _count(mor("none", nr=3, router={"type": "none"}).train()) == []
    assert _count(MoRLM(tiny_config()).train()) == []
