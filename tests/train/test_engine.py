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


def _exp(stage: int, precision: str = "fp32"):
    from megamor.train.config import experiment_from_dict

    return experiment_from_dict({
        "model": dataclasses.asdict(tiny_config()), "data": {"train": ["unused"], "seq_len": 16},
        "batch": {"global_batch_size": 2, "micro_batch_size": 2},
        "trainer": {"max_steps": 1, "compile": "false"}, "deepspeed": {"zero_stage": stage, "precision": precision},
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


def _first_steps(rank: int, world: int) -> None:
    """ZeRO-0 + bf16: DeepSpeed's wrapper initialised AdamW's state with a step on zero gradients,
    so the first real update was Adam's second (0.73 x lr after bias correction); now the first
    real step is Adam's first: |update| = lr on every weight with a gradient, as ZeRO-1 bf16.
    ZeRO-0 fp32 logs its gradient norm (DeepSpeed clips with it and drops it): the norm of the
    gradients it stepped with."""
    from megamor.train.engine import build_engine

    cpu = torch.device("cpu")
    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    for stage in (0, 1):
        built = build_engine(_exp(stage, "bf16"), cpu, seed=3)
        assert all(not s for s in built.optimizer.state.values()), f"ZeRO-{stage}: AdamW stepped before training"
        masters = [p for g in built.optimizer.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in masters]
        lr = built.optimizer.param_groups[0]["lr"]
        out = built.engine(x[:, :-1], targets=x[:, 1:], return_logits=False)
        built.engine.backward(out.loss)
        built.engine.step()
        steps = {int(s["step"]) for s in built.optimizer.state.values()}
        assert steps == {1}, (stage, steps)
        moved = torch.cat([(p.detach() - b).abs().flatten() for p, b in zip(masters, before)])
        moved = moved[moved > 0]
        assert moved.median().item() == pytest.approx(lr, rel=0.02), (stage, moved.median().item(), lr)
        built.engine.destroy()


@pytest.mark.launch
def test_zero0_bf16_first_step_is_adams_first():
    run_distributed(_first_steps, world_size=1)

