"""Speed adapter: a pretrained Hugging Face Llama, Mistral, Qwen2 or Qwen3 checkpoint as a
megamor model that routes tokens over the checkpoint's own, unshared layers (`sharing: none`
with an expert-choice router: the mixture-of-depths form), its weights untouched.

`megamor.adapt.source` reads the checkpoint, `megamor.adapt.wrap` builds the routed model,
`python -m megamor.adapt` (`megamor.adapt.cli`) writes it and decodes with it. Router-only
tuning is the trainer's `trainer.train_only: routers`.
"""

from megamor.adapt.source import SUPPORTED, AdaptError, read_source
from megamor.adapt.wrap import adapt_config, wrap

__all__ = ["SUPPORTED", "AdaptError", "adapt_config", "read_source", "wrap"]
