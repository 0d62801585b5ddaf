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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration value; `key` is the full dotted path of the offending key."""

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"config key '{key}': {reason}")


class ConfigFileError(ConfigError):
    """A config file that is not a usable YAML mapping; names the file instead of a key."""

    def __init__(self, path: Path, reason: str):
        self.key = str(path)
        self.reason = reason
        ValueError.__init__(self, f"config file {path}: {reason}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    path = path.resolve()
    if path in seen:
        raise ConfigError("base", f"circular 'base' chain through {path}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:  # syntax errors carry line numbers in their message
        raise ConfigFileError(path, f"cannot parse YAML: {' '.join(str(e).split())}") from None
    if data is None:
        raise ConfigFileError(path, "is empty (no keys): give the settings as `key: value` lines")
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"the single value {data!r}"
        raise ConfigFileError(path, f"must be a mapping of `key: value` lines, not {kind}")
    try:
        node = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as e:
        raise ConfigFileError(path, f"cannot parse YAML: {' '.join(str(e).split())}") from None
    base = node.pop("base", None) if OmegaConf.is_dict(node) else None
    if base is None:
        return node
    return OmegaConf.merge(_read_yaml(path.parent / str(base), seen + (path,)), node)


def merge_sources(yaml_paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Any:
    """Untyped merge of YAML files (in order) and dotted `key=value` overrides."""
    node = OmegaConf.create({})
    for p in yaml_paths:
        node = OmegaConf.merge(node, _read_yaml(Path(p)))
    for item in overrides:
        node = OmegaConf.merge(node, parse_override(item))
    return node


def parse_override(item: str) -> Any:
    """One `dotted.key=value` override as a node; a ConfigError naming it if it does not parse."""
    name, eq, _ = item.partition("=")
    if not eq or not name.strip():
        raise ConfigError(item, "an override must look like key=value")
    try:
        return OmegaConf.from_dotlist([item])
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as e:
        why = " ".join(str(e).split())
        raise ConfigError(name, f"cannot parse the override {item!r} ({why}); lists look like key=[a,b], "
                                "quote values with spaces or brackets") from None


def from_node(schema: type[T], node: Any, prefix: str = "") -> T:
    """Check an OmegaConf node (or plain dict) against a dataclass schema and build it."""
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), node)
        obj = OmegaConf.to_object(typed)
    except OmegaConfBaseException as e:
        local = getattr(e, "full_key", None) or "?"
        full = f"{prefix}.{local}" if prefix and local != "?" else local
        msg = str(e).splitlines()[0]
        if "is not a ListConfig" in msg:  # a scalar where the schema wants a list
            got = OmegaConf.select(node, local, default=None) if OmegaConf.is_config(node) and local != "?" else None
            shown = got if got is not None else "..."
            msg = f"must be a list, e.g. {full}=[{shown}]" + (f" (got the single value {got!r})" if got is not None else "")
        raise ConfigError(full, msg) from None
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
