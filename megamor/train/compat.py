"""Workarounds applied to the model from the outside, each with the reason it exists.

`MoRLM._apply` (its per-layer helper) shadows `nn.Module._apply`, the method `.to()`,
`.float()`, `.bfloat16()` and DeepSpeed's engine set-up go through. Until the helper is
renamed, `fix_module_apply` gives the instance a class whose `_apply` dispatches on the call
shape: nn.Module's (fn[, recurse]) or the layer helper's (7 arguments).
"""

from __future__ import annotations

from torch import nn


def fix_module_apply(model: nn.Module) -> nn.Module:
    cls = type(model)
    own = cls.__dict__.get("_apply")
    if own is None or own is nn.Module._apply:
        return model

    def _apply(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if len(args) + len(kwargs) <= 2 and (not args or callable(args[0])):
            return nn.Module._apply(self, *args, **kwargs)
        return own(self, *args, **kwargs)

    model.__class__ = type(cls.__name__, (cls,), {"_apply": _apply, "__module__": cls.__module__})
    return model
