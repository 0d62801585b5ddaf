"""Speed adapter: a pretrained Hugging Face Llama, Mistral, Qwen2 or Qwen3 checkpoint as a
megamor model that routes tokens over the checkpoint's own, unshared layers (`sharing: none`
with an expert-choice router: the mixture-of-depths form), its weights untouched.

`megamor.adapt.source` reads the checkpoint, `megamor.adapt.wrap` builds the routed model,
`python -m megamor.adapt` (`megamor.adapt.cli`) writes it and decodes with it. Router-only
tuning is the trainer's `trainer.train_only: routers`.

The names below load on first use (PEP 562): `python -m megamor.adapt` imports this package
first, and its --help must answer before torch loads.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

_WHERE = {"SUPPORTED": "source", "AdaptError": "source", "read_source": "source", "adapt_config": "wrap", "wrap": "wrap"}

__all__ = ["SUPPORTED", "AdaptError", "adapt_config", "read_source", "wrap"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the submodule megamor.adapt.wrap binds it on this package as `wrap`; here
        # that name is the function (as when this file imported it eagerly), so keep it.
        if name in _WHERE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:
    from megamor.adapt.source import SUPPORTED, AdaptError, read_source
    from megamor.adapt.wrap import adapt_config, wrap
