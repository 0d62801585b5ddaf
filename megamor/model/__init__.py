"""The MoR language model: config, model, decoding, FLOPs."""

from megamor.model.config import ModelConfig, RouterConfig, load_model_config
from megamor.model.generate import GenerationOutput, generate
from megamor.model.kv_cache import KVCache
from megamor.model.mor import LMOutput, MoRLM, RouterStats

__all__ = [
    "GenerationOutput",
    "KVCache",
    "LMOutput",
    "MoRLM",
    "ModelConfig",
    "RouterConfig",
    "RouterStats",
    "generate",
    "load_model_config",
]
