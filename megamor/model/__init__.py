"""The MoR language model: config, model, routing policy, KV caches, FLOPs (decoding lives in
megamor.inference)."""

from megamor.model.config import ModelConfig, RouterConfig, load_model_config
from megamor.model.kv_cache import KVCache
from megamor.model.mor import LMOutput, MoRLM, RouterStats, SitePlan
from megamor.model.routing import RoutingPolicy, RoutingSettings

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
