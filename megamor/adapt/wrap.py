"""The routed model over a checkpoint's own layers.

The N layers are cut into `num_recursions` contiguous steps of distinct layers (`sharing:
none` with a router); an expert-choice router before each step decides which tokens run it.
A token that runs a step gets the step's full update: the gate is straight-through with
alpha 1 (forward value exactly 1, gradient that of sigmoid(logit)), so the layers compute
what they computed in the source model and the router still learns from the LM loss. With
every capacity 1 (`no_skip`) every token runs every layer: the source model's logits.
"""

from __future__ import annotations

import copy

import torch

from megamor.config import ConfigError
from megamor.model.config import ModelConfig
from megamor.model.hf_source import AdaptError
from megamor.model.mor import MoRLM


def adapt_config(source: ModelConfig, num_recursions: int = 0, capacity: list[float] | None = None,
                 no_skip: bool = False) -> ModelConfig:
    """The routed config: num_recursions steps (0: one per layer), expert choice at the given
    capacities (None: the paper's (N_r - r) / N_r; no_skip: all 1)."""
    nr = num_recursions or source.n_layers
    if nr < 2 or source.n_layers % nr:
        raise AdaptError(f"--num-recursions {nr}: must be >= 2 and divide the model's {source.n_layers} layers")
    cfg = copy.deepcopy(source)
    cfg.num_recursions = nr
    cfg.router.type = "expert_choice"
    cfg.router.alpha = 1.0
    cfg.router.gate_straight_through = True
    cfg.router.capacity = [1.0] * nr if no_skip else capacity
    try:
        cfg.router.validate("model.router")
        cfg.validate()
    except ConfigError as e:
        if "capacity" not in e.key:
            raise
        raise AdaptError(f"--capacity {','.join(map(str, capacity or []))}: {e.reason}") from None
    return cfg


@torch.no_grad()
def wrap(source: ModelConfig, state: dict[str, torch.Tensor], cfg: ModelConfig, seed: int = 0) -> MoRLM:
    """MoRLM of config cfg holding the source's tensors; only the routers are new (seed)."""
    torch.manual_seed(seed)
    model = MoRLM(copy.deepcopy(cfg))
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    missing = [k for k in missing if not k.startswith("routers.")]
    if missing or unexpected:
        raise AdaptError(f"the checkpoint's tensors do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model
