"""Decoding for megamor models: `generate` and sampling, static per-site KV storage, batched
prefill, and the engine with two schedules (lockstep; the paper's continuous depth-wise
batching, `depthwise`; docs/inference.md), plus router calibration."""

from megamor.inference.engine import Engine, Request, TokenEvent, engine_generate
from megamor.inference.generate import GenerationOutput, StepOutput, generate, left_pad, sample_next, stream
from megamor.inference.static_cache import StaticKVCache

__all__ = ["Engine", "GenerationOutput", "Request", "StaticKVCache", "StepOutput", "TokenEvent", "engine_generate",
           "generate", "left_pad", "sample_next", "stream"]
