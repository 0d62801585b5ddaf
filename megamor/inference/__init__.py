"""Fast decoding for megamor models: static per-site KV storage, batched prefill, and
continuous depth-wise batching of requests (the engine), plus router calibration."""

from megamor.inference.engine import Engine, Request, TokenEvent, engine_generate
from megamor.inference.static_cache import StaticKVCache

__all__ = ["Engine", "Request", "StaticKVCache", "TokenEvent", "engine_generate"]
