"""Typed configuration: dataclass schemas filled from YAML files and `key=value` overrides.

Every config in megamor is a dataclass. `load_config(Schema, *yaml_paths, overrides=[...])`
merges the sources with OmegaConf against the schema, so an unknown key or a value of the
wrong type fails at once with the key's full dotted path. Each schema may define
`validate(self, path)`, called recursively after loading, that raises `ConfigError` for
impossible combinations.

A YAML file may start with `base: other.yaml` (relative to itself): that file is merged first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration value; `key` is the full dotted path of the offending key."""

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"config key '{key}': {reason}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    path = path.resolve()
    if path in seen:
        raise ConfigError("base", f"circular 'base' chain through {path}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors carry line numbers in their message
        raise ConfigError("<file>", f"{path}: cannot parse YAML: {e}") from e
    base = node.pop("base", None) if OmegaConf.is_dict(node) else None
    if base is None:
        return node
    return OmegaConf.merge(_read_yaml(path.parent / str(base), seen + (path,)), node)


def merge_sources(yaml_paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Any:
    """Untyped merge of YAML files (in order) and dotted `key=value` overrides."""
    node = OmegaConf.create({})
    for p in yaml_paths:
        node = OmegaConf.merge(node, _read_yaml(Path(p)))
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(item, "an override must look like key=value")
        node = OmegaConf.merge(node, OmegaConf.from_dotlist(list(overrides)))
    return node


def from_node(schema: type[T], node: Any, prefix: str = "") -> T:
    """Check an OmegaConf node (or plain dict) against a dataclass schema and build it."""
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), node)
        obj = OmegaConf.to_object(typed)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        if prefix and key != "?":
            key = f"{prefix}.{key}"
        msg = str(e).splitlines()[0]
        raise ConfigError(key, msg) from None
    validate_tree(obj, prefix)
    return obj  # type: ignore[return-value]


def load_config(
    schema: type[T], *yaml_paths: str | Path, overrides: Sequence[str] = (), prefix: str = ""
) -> T:
    return from_node(schema, merge_sources(yaml_paths, overrides), prefix)


def validate_tree(obj: Any, path: str = "") -> None:
    """Call `validate(path)` on every dataclass in the tree, children first."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        validate_tree(child, f"{path}.{f.name}" if path else f.name)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(path)


def key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def to_yaml(obj: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))
