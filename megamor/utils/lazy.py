"""Names of a package that load on first use (PEP 562): a command line's `--help`, or a module
that needs only a package's light half, must not load torch through the package's __init__."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """The package's module-level `__getattr__`: `where` maps each exported name to the submodule
    (relative to `package`) that defines it; the value is imported once, then bound for good."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        vars(sys.modules[package])[name] = value
        return value

    return __getattr__


def keep_exports_over_submodules(package: str, names: Mapping[str, str]) -> None:
    """Importing a submodule binds it on its package under its own name; where an exported name
    equals a submodule's (`megamor.adapt.wrap`, the function, in `megamor.adapt.wrap`, the module),
    the export keeps the name, as an eager `from .wrap import wrap` would have."""

    class _Package(types.ModuleType):
        def __setattr__(self, name: str, value: Any) -> None:
            if name in names and isinstance(value, types.ModuleType):
                return
            super().__setattr__(name, value)

    sys.modules[package].__class__ = _Package
