"""The training loop's callbacks: the interface (base.Callback), the dispatcher the trainer
holds (hooks.Callbacks), user callbacks from `trainer.callbacks` (user.py), and the built-in
features, one file each (docs/architecture.md lists them)."""

from megamor.train.callbacks.base import Callback
from megamor.train.callbacks.hooks import Callbacks

__all__ = ["Callback", "Callbacks"]
