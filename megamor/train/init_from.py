"""`trainer.init_from`: start a run at step 0 from existing weights (e.g. a recursive/MoR
model that megamor.convert built from a pretrained vanilla model).

The run's config decides the model; the file must hold the same network. Compared are the
model keys that shape or define the weights; not compared: the router section (routers come
from the file only when they have the same form, else they start fresh, as they do after
megamor.convert anyway), `init_std` (nothing is initialised that the file gives),
`max_seq_len` (RoPE keeps no table: a run may train at a longer context) and `attn_impl`
(an implementation choice).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megamor.config import ConfigError
from megamor.model.config import ModelConfig, flat_model_config
from megamor.model.mor import MoRLM
from megamor.runs.layout import CheckpointError
from megamor.runs.load import load_model
from megamor.train.optim import ROUTER_PREFIXES  # state-dict names of the router modules

NOT_COMPARED = ("model.init_std", "model.max_seq_len", "model.attn_impl")
# Router keys that decide what the router tensors are and mean; the others (loss weights,
# thresholds' rules, gate variants) are training settings the run may change freely.
ROUTER_FORM = ("type", "network", "mlp_hidden", "activation", "learn_alpha")


@dataclass(frozen=True)
class InitReport:
    path: str
    tensors: int  # tensors taken from the file
    routers_fresh: str = ""  # why the routers start fresh ("" when loaded or when there are none)

    def line(self) -> str:
        text = f"initialised from {self.path} ({self.tensors} tensors)"
        return text + (f"; routers start fresh ({self.routers_fresh})" if self.routers_fresh else "")


def _load(path: str) -> MoRLM:
    try:
        return load_model(path, dtype=torch.float32)
    except CheckpointError as e:
        raise ConfigError("trainer.init_from", str(e)) from None


def config_differences(file_cfg: ModelConfig, run_cfg: ModelConfig) -> list[str]:
    """The compared keys that differ, each as 'key: X in the file, Y in this run'."""
    there, here = flat_model_config(file_cfg), flat_model_config(run_cfg)
    keys = [k for k in here if not k.startswith("model.router.") and k not in NOT_COMPARED]
    return [f"{k}: {there.get(k)!r} in the file, {here[k]!r} in this run" for k in keys if there.get(k) != here[k]]


def check_init_from(path: str, model_cfg: ModelConfig) -> None:
    """Before launch: the weights load and hold the configured network."""
    diff = config_differences(_load(path).cfg, model_cfg)
    if diff:
        raise ConfigError("trainer.init_from", f"{path} holds a different model: {'; '.join(diff)}")


def _router_mismatch(src: MoRLM, model: MoRLM, theirs: dict, mine: dict) -> str:
    """Why the file's routers cannot be used as they are ("" when they can)."""
    a, b = dataclasses.asdict(src.cfg.router), dataclasses.asdict(model.cfg.router)
    form = [f"{k} {a[k]!r} -> {b[k]!r}" for k in ROUTER_FORM if a[k] != b[k]]
    if form:
        return "router " + ", ".join(form)
    if {k: v.shape for k, v in theirs.items()} != {k: v.shape for k, v in mine.items()}:
        return "the file's router tensors have other names or shapes"
    return ""


@torch.no_grad()
def load_init_weights(model: MoRLM, path: str) -> InitReport:
    src = _load(path)
    diff = config_differences(src.cfg, model.cfg)
    if diff:
        raise ConfigError("trainer.init_from", f"{path} holds a different model: {'; '.join(diff)}")
    sd, own = src.state_dict(), model.state_dict()
    theirs = {k: v for k, v in sd.items() if k.startswith(ROUTER_PREFIXES)}
    mine = {k: v for k, v in own.items() if k.startswith(ROUTER_PREFIXES)}
    fresh = _router_mismatch(src, model, theirs, mine) if (theirs or mine) else ""
    take = {k: v for k, v in sd.items() if not (fresh and k.startswith(ROUTER_PREFIXES))}
    missing, unexpected = model.load_state_dict(take, strict=False)
    left = [k for k in missing if not (fresh and k.startswith(ROUTER_PREFIXES))]
    if left or unexpected:  # the compared config keys should make this impossible
        raise ConfigError("trainer.init_from", f"{path} does not fit the model: missing {left[:4]}, unexpected {unexpected[:4]}")
    return InitReport(path, len(take), fresh)
