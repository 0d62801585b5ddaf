"""megamor.plan.bench builds its model as the trainer does (megamor.train.engine.build_model):
the seeded MoRLM of the model config, checkpointing when asked, no DeepSpeed."""

from __future__ import annotations

import dataclasses

import torch

from megamor.model import MoRLM
from megamor.plan.bench import _build
from tests.model.helpers import tiny_config


def test_bench_model_is_the_seeded_model_with_checkpointing_as_asked():
    model_cfg = tiny_config(vocab_size=256)
    for ckpt in (False, True):
        cfg, layout, model = _build(dataclasses.asdict(model_cfg), tp=1, world=1, rank=0, sp=False, ckpt=ckpt)
        torch.manual_seed(0)
        ref = MoRLM(model_cfg)
        assert cfg.d_model == model_cfg.d_model and layout.tp == 1 and layout.mpu is None
        assert ref.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))
        assert (model._checkpoint_fn is not None) == ckpt
