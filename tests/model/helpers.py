"""Small model configs shared by the model tests."""

from __future__ import annotations

import torch

from megamor.model import ModelConfig, MoRLM, RouterConfig


def tiny_config(**kw) -> ModelConfig:
    router = kw.pop("router", None)
    base = {"vocab_size": 211, "d_model": 64, "n_layers": 8, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
            "max_seq_len": 128}
    base.update(kw)
    cfg = ModelConfig(**base)
    if router is not None:
        cfg.router = router if isinstance(router, RouterConfig) else RouterConfig(**router)
    cfg.validate()
    return cfg


def mor(router_type: str = "expert_choice", sharing: str = "middle_cycle", nr: int = 3, seed: int = 0, **kw) -> MoRLM:
    torch.manual_seed(seed)
    router = kw.pop("router", {"type": router_type})
    n_layers = kw.pop("n_layers", 8 if sharing.startswith("middle") else 6)
    return MoRLM(tiny_config(sharing=sharing, num_recursions=nr, n_layers=n_layers, router=router, **kw))
