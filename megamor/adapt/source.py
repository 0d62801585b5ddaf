"""The adapter's view of a Hugging Face checkpoint: the one reader lives in
`megamor.model.hf_source` (megamor.runs loads Hugging Face folders with it too)."""

from megamor.model.hf_source import SUPPORTED, AdaptError, load_weights, model_config, read_config, read_source

__all__ = ["SUPPORTED", "AdaptError", "load_weights", "model_config", "read_config", "read_source"]
