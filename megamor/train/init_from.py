"""`trainer.init_from`: start a run at step 0 from existing weights (e.g. a recursive/MoR
model that megamor.convert built from a pretrained vanilla model)."""

from __future__ import annotations

import dataclasses

import torch

from megamor.config import ConfigError
from megamor.model.config import ModelConfig
from megamor.model.mor import MoRLM
from megamor.runs.layout import CheckpointError
from megamor.runs.load import load_model


def _load(path: str) -> MoRLM:
    try:
        return load_model(path, dtype=torch.float32)
    except CheckpointError as e:
        raise ConfigError("trainer.init_from", str(e)) from None


def check_init_from(path: str, model_cfg: ModelConfig) -> None:
    """Before launch: the weights load and their model config is the configured one."""
    got = _load(path).cfg
    if got != model_cfg:
        a, b = dataclasses.asdict(got), dataclasses.asdict(model_cfg)
        diff = [f"{k}: {a[k]!r} there, {b[k]!r} here" for k in a if a[k] != b.get(k)]
        raise ConfigError("trainer.init_from", f"{path} holds a different model ({'; '.join(diff[:4])})")


@torch.no_grad()
def load_init_weights(model: MoRLM, path: str) -> None:
    src = _load(path)
    if src.cfg != model.cfg:
        raise ConfigError("trainer.init_from", f"{path} holds a different model config")
    model.load_state_dict(src.state_dict())
