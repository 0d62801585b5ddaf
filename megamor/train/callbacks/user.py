"""`trainer.callbacks`: callbacks a user adds from the config, without editing the trainer.

    trainer:
      callbacks:
        - mypkg.callbacks:PrintLoss                             # module:Class
        - {target: mypkg.callbacks:Every, kwargs: {n: 10}}      # with keyword arguments

Each entry of the config a run starts with is checked when it loads (unimportable module,
missing class, not a Callback, arguments the class does not take): one ConfigError naming
trainer.callbacks[i], exit 2 before any process starts.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from megamor.config import ConfigError
from megamor.train.callbacks.base import Callback


def parse_entry(entry: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(target, kwargs) of one entry: 'module:Class' or {target: 'module:Class', kwargs: {...}}."""
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and "target" in entry and set(entry) <= {"target", "kwargs"}:
        kwargs = entry.get("kwargs") or {}
        if not isinstance(entry["target"], str) or not isinstance(kwargs, dict):
            raise ConfigError(where, "target must be 'module:Class' and kwargs a mapping")
        return entry["target"], dict(kwargs)
    raise ConfigError(where, f"must be 'module:Class' or {{target: 'module:Class', kwargs: {{...}}}}, got {entry!r}")


def resolve(target: str, where: str) -> type[Callback]:
    module_name, colon, cls_name = target.partition(":")
    if not colon or not module_name or not cls_name:
        raise ConfigError(where, f"must be 'module:Class' (e.g. mypkg.callbacks:PrintLoss), got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(where, f"cannot import module {module_name!r} ({e})") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise ConfigError(where, f"module {module_name!r} has no {cls_name!r}")
    if not (inspect.isclass(cls) and issubclass(cls, Callback)):
        raise ConfigError(where, f"{target} is not a subclass of megamor.train.callbacks.Callback")
    return cls


def check_entries(entries: list[Any], where: str, imports: bool = True) -> None:
    """Config-load check of every entry: its form, and with `imports` that it imports, is a
    Callback and takes its kwargs. A stored config (a run folder's) is checked for form only:
    reading an old run must not need the modules its callbacks came from."""
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        target, kwargs = parse_entry(entry, at)
        if not imports:
            continue
        cls = resolve(target, at)
        try:
            inspect.signature(cls).bind(**kwargs)
        except TypeError as e:
            raise ConfigError(at, f"{target} does not take these kwargs ({e})") from None


def build_user_callbacks(entries: list[Any], where: str = "trainer.callbacks") -> list[Callback]:
    out = []
    for i, entry in enumerate(entries):
        target, kwargs = parse_entry(entry, f"{where}[{i}]")
        out.append(resolve(target, f"{where}[{i}]")(**kwargs))
    return out
