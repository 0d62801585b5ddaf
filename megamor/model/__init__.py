"""The MoR language model: config, model, routing policy, KV caches, FLOPs (decoding lives in
megamor.inference).

The names below load on first use (PEP 562): `megamor.model.config` and `megamor.model.flops`
need no torch, and importing them (a command line's argument parser, the planner) must not
load it through this package."""

from __future__ import annotations

from typing import TYPE_CHECKING

from megamor.utils.lazy import lazy_exports

_WHERE = {
    "KVCache": "kv_cache",
    "LMOutput": "mor",
    "MoRLM": "mor",
    "ModelConfig": "config",
    "RouterConfig": "config",
    "RouterStats": "mor",
    "RoutingPolicy": "routing",
    "RoutingSettings": "routing",
    "SitePlan": "mor",
    "load_model_config": "config",
}

__all__ = [
    "KVCache",
    "LMOutput",
    "MoRLM",
    "ModelConfig",
    "RouterConfig",
    "RouterStats",
    "RoutingPolicy",
    "RoutingSettings",
    "SitePlan",
    "load_model_config",
]


__getattr__ = lazy_exports(__name__, _WHERE)


if TYPE_CHECKING:
    from megamor.model.config import ModelConfig, RouterConfig, load_model_config
    from megamor.model.kv_cache import KVCache
    from megamor.model.mor import LMOutput, MoRLM, RouterStats, SitePlan
    from megamor.model.routing import RoutingPolicy, RoutingSettings
