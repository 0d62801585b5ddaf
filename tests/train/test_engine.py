"""megamor.train.engine.build_engine, the one model + engine assembly: where no DeepSpeed
wrapper checks gradients (ZeRO-0 fp32) the optimizer's non-finite guard is on, and a step with
inf gradients leaves the weights alone; under ZeRO-1 DeepSpeed's own check applies; the model
is the seeded MoRLM of the config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megamor.testing.distributed import run_distributed
from tests.model.helpers import tiny_config


def _exp(stage: int):
    from megamor.train.config import experiment_from_dict

    return experiment_from_dict({
        "model": dataclasses.asdict(tiny_config()), "data": {"train": ["unused"], "seq_len": 16},
        "batch": {"global_batch_size": 2, "micro_batch_size": 2},
        "trainer": {"max_steps": 1, "compile": "false"}, "deepspeed": {"zero_stage": stage, "precision": "fp32"},
    })


def _rank(rank: int, world: int) -> None:
    from megamor.model import MoRLM
    from megamor.train.engine import build_engine
    from megamor.train.faults import poison_gradients

    cpu = torch.device("cpu")
    guarded = build_engine(_exp(0), cpu, seed=3)
    assert guarded.optimizer.guard_nonfinite_grads, "ZeRO-0 fp32: nothing else checks the gradients"
    torch.manual_seed(3)
    ref = MoRLM(_exp(0).model)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), guarded.model.state_dict().values()))
    before = [p.detach().clone() for p in guarded.model.parameters()]
    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    out = guarded.engine(x[:, :-1], targets=x[:, 1:], return_logits=False)
    guarded.engine.backward(poison_gradients(out.loss))
    guarded.engine.step()
    assert guarded.optimizer.nonfinite_grads  # the guard skipped the update
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, guarded.model.parameters()))
    assert guarded.n_params.total > 0 and not guarded.compiled and guarded.init is None
    guarded.engine.destroy()
    wrapped = build_engine(_exp(1), cpu, seed=3)
    assert not wrapped.optimizer.guard_nonfinite_grads  # DeepSpeed's ZeRO optimizer checks for overflow itself
    wrapped.engine.destroy()


@pytest.mark.launch
def test_build_engine_guards_nonfinite_gradients_where_deepspeed_does_not():
    run_distributed(_rank, world_size=1)
