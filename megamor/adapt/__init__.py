"""Speed adapter: a pretrained Hugging Face Llama, Mistral, Qwen2 or Qwen3 checkpoint as a
megamor model that routes tokens over the checkpoint's own, unshared layers (`sharing: none`
with an expert-choice router: the mixture-of-depths form), its weights untouched.

`megamor.adapt.source` reads the checkpoint (`megamor.model.hf_source`), `megamor.adapt.wrap` builds the routed model,
`python -m megamor.adapt` (`megamor.adapt.cli`) writes it and decodes with it. Router-only
tuning is the trainer's `trainer.train_only: routers`.

The names below load on first use (PEP 562): `python -m megamor.adapt` imports this package
first, and its --help must answer before torch loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megamor.utils.lazy import keep_exports_over_submodules, lazy_exports

_WHERE = {"SUPPORTED": "source", "AdaptError": "source", "read_source": "source", "adapt_config": "wrap", "wrap": "wrap"}

__all__ = ["SUPPORTED", "AdaptError", "adapt_config", "read_source", "wrap"]

__getattr__ = lazy_exports(__name__, _WHERE)
keep_exports_over_submodules(__name__, _WHERE)  # `wrap` stays the function after megamor.adapt.wrap loads


if TYPE_CHECKING:
    from megamor.adapt.source import SUPPORTED, AdaptError, read_source
    from megamor.adapt.wrap import adapt_config, wrap
