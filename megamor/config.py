"""Typed configuration: dataclass schemas filled from YAML files and `key=value` overrides.

Every config in megamor is a dataclass. `load_config(Schema, *yaml_paths, overrides=[...])`
merges the sources with OmegaConf against the schema, so an unknown key or a value of the
wrong type fails at once with the key's full dotted path. Each schema may define
`validate(self, path)`, called recursively after loading, that raises `ConfigError` for
impossible combinations.

A YAML file may start with `base: other.yaml` (relative to itself): that file is merged first.

Before the typed merge, the node is walked against the schema (`_walk`): every unknown key
(with a "did you mean"), every list or value where a section belongs (and the reverse) is
collected, so a file with several mistakes reports all of them (`ConfigErrors`, one line each).
A schema renames or retires keys with the class attributes `RENAMED_KEYS` ({old: new}) and
`RETIRED_KEYS` ({old: why}): old configs still load, with a one-line note on stderr.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import sys
import types
import typing
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


class ConfigErrors(ConfigError):
    """Several bad keys found at once; `errors` holds each (str() is one line per error)."""

    def __init__(self, errors: Sequence[ConfigError]):
        self.errors = list(errors)
        self.key, self.reason = self.errors[0].key, self.errors[0].reason
        ValueError.__init__(self, "\n".join(str(e) for e in self.errors))


def error_lines(e: BaseException) -> list[str]:
    """The lines to print for a config error: one per mistake."""
    return [str(x) for x in e.errors] if isinstance(e, ConfigErrors) else [" ".join(str(e).split())]


@functools.lru_cache(maxsize=256)
def _parse_yaml(path: Path, raw: bytes) -> Any:
    """One YAML file's bytes as an untyped node (its `base:` still in it), cached by content."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigFileError(path, f"is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}): "
                                    "save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:  # syntax errors carry line numbers in their message
        raise ConfigFileError(path, f"cannot parse YAML: {' '.join(str(e).split())}") from None
    if data is None:
        raise ConfigFileError(path, "is empty (no keys): give the settings as `key: value` lines")
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"the single value {data!r}"
        raise ConfigFileError(path, f"must be a mapping of `key: value` lines, not {kind}")
    try:
        node = OmegaConf.create(text)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as e:
        raise ConfigFileError(path, f"cannot parse YAML: {' '.join(str(e).split())}") from None
    return node


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    path = path.resolve()
    if path in seen:
        raise ConfigError("base", f"circular 'base' chain through {path}")
    if path.is_dir():
        raise ConfigFileError(path, "is a directory, not a YAML file: name a .yaml file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    # A study resolves each of its runs' configs twice from the same few files: each content is
    # parsed once (a copy each time: callers rename keys in place).
    node = copy.deepcopy(_parse_yaml(path, path.read_bytes()))
    base = node.pop("base", None) if OmegaConf.is_dict(node) else None
    if base is None:
        return node
    return merge_config_nodes(_read_yaml(path.parent / str(base), seen + (path,)), node, where=str(path))


def merge_config_nodes(a: Any, b: Any, prefix: str = "", where: str = "") -> Any:
    """OmegaConf.merge of untyped nodes (b wins); a list merged over a section of keys (or the
    reverse) is a ConfigError naming the key (`prefix` + its path) and `where` it came from."""
    try:
        return OmegaConf.merge(a, b)
    except (TypeError, OmegaConfBaseException):
        for k in _keys(b):
            va, vb = OmegaConf.select(a, k, default=None), OmegaConf.select(b, k, default=None)
            if OmegaConf.is_dict(va) != OmegaConf.is_dict(vb) and va is not None and vb is not None:
                kind = "a section of keys" if OmegaConf.is_dict(va) else "a list or a value"
                src = f" ({where})" if where else ""
                raise ConfigError(key(prefix, k), f"must be {kind} here, got {_show(vb)}{src}") from None
        raise


def _keys(node: Any, prefix: str = "") -> list[str]:
    if not OmegaConf.is_dict(node):
        return []
    out = []
    for k in node:
        full = f"{prefix}.{k}" if prefix else str(k)
        out.append(full)
        child = node._get_node(k)
        if OmegaConf.is_dict(child):
            out.extend(_keys(child, full))
    return out


def _show(v: Any) -> str:
    if OmegaConf.is_config(v):
        v = OmegaConf.to_container(v, resolve=False)
    if isinstance(v, list):
        return f"the list {v}"
    if isinstance(v, dict):
        return "a mapping"
    return f"the value {v!r}"


def merge_sources(yaml_paths: Sequence[str | Path] = (), overrides: Sequence[str] = (),
                  schema: type | None = None) -> Any:
    """Untyped merge of YAML files (in order) and dotted `key=value` overrides. With a schema,
    each source's renamed keys take their new names first, so a later source still wins."""
    node = OmegaConf.create({})
    sources = [(str(p), _read_yaml(Path(p))) for p in yaml_paths]
    sources += [(f"override {item!r}", parse_override(item)) for item in overrides]
    for i, (_where, src) in enumerate(sources):
        if schema is not None:
            errors: list[ConfigError] = []
            rename_keys(schema, src, "", errors)
            if errors:
                raise errors[0] if len(errors) == 1 else ConfigErrors(errors)
        try:
            node.merge_with(src)  # in place: OmegaConf.merge would copy the growing node each time
        except (TypeError, OmegaConfBaseException):  # again from the start, to name the key and source
            node = OmegaConf.create({})
            for w, earlier in sources[: i + 1]:
                node = merge_config_nodes(node, earlier, where=w)
            raise
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


@functools.cache
def _schema_node(schema: type) -> Any:
    """A schema's structured node with its defaults, built once (merge copies it, never changes it)."""
    return OmegaConf.structured(schema)


def from_node(schema: type[T], node: Any, prefix: str = "") -> T:
    """Check an OmegaConf node (or plain dict) against a dataclass schema and build it.

    Every structural mistake (unknown key, list for a section, ...) is reported, then every
    value OmegaConf rejects; one ConfigError, or ConfigErrors when there are several."""
    node = OmegaConf.create(OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node)
    errors: list[ConfigError] = []
    _walk(schema, node, prefix, errors)  # drops the keys it reports
    for _ in range(50):  # each round drops the key OmegaConf refused and tries again
        try:
            obj = OmegaConf.to_object(OmegaConf.merge(_schema_node(schema), node))
            break
        except OmegaConfBaseException as e:
            local = getattr(e, "full_key", None) or ""
            errors.append(_omegaconf_error(e, node, local, prefix))
            if not local or not _drop(node, local):
                break
    if errors:
        raise errors[0] if len(errors) == 1 else ConfigErrors(errors)
    validate_tree(obj, prefix)
    return obj  # type: ignore[return-value]


def _omegaconf_error(e: OmegaConfBaseException, node: Any, local: str, prefix: str) -> ConfigError:
    full = (f"{prefix}.{local}" if prefix else local) if local else (prefix or "?")
    msg = str(e).splitlines()[0]
    if "is not a ListConfig" in msg:  # a scalar where the schema wants a list
        got = OmegaConf.select(node, local, default=None) if local else None
        shown = got if got is not None else "..."
        msg = f"must be a list, e.g. {full}=[{shown}]" + (f" (got the single value {got!r})" if got is not None else "")
    return ConfigError(full, msg)


def _drop(node: Any, dotted: str) -> bool:
    parent, _, leaf = dotted.rpartition(".")
    holder = OmegaConf.select(node, parent, default=None) if parent else node
    if OmegaConf.is_dict(holder) and leaf in holder:
        holder.pop(leaf)
        return True
    return False


_noted: set[str] = set()


def note_once(message: str) -> None:
    """A one-line note on stderr (deprecated keys), once per process."""
    if message not in _noted:
        _noted.add(message)
        print(f"megamor: note: {message}", file=sys.stderr, flush=True)


def _walk(schema: type, node: Any, path: str, errors: list[ConfigError]) -> None:
    """Collect the structural mistakes of `node` against `schema`; apply renamed/retired keys."""
    rename_keys(schema, node, path, errors, recurse=False)
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    for k in list(node.keys()):
        full = key(path, str(k))
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(key(path, c) for c in close)}?" if close else ""
            errors.append(ConfigError(full, f"unknown key in {schema.__name__}{hint}"))
            node.pop(k)
            continue
        want, child = hints[k], node._get_node(k)
        if OmegaConf.is_missing(node, k) or (not OmegaConf.is_config(child) and child._value() is None):
            continue
        sub = section_type(want)
        if sub is not None:
            if OmegaConf.is_dict(child):
                _walk(sub, child, full, errors)
            else:
                errors.append(ConfigError(full, f"must be a section of keys (e.g. {full}.KEY=VALUE), got {_show(node[k])}"))
                node.pop(k)
        elif _is_mapping(want) and not OmegaConf.is_dict(child):
            errors.append(ConfigError(full, f"must be a mapping of keys, e.g. {{a: 1}}, got {_show(node[k])}"))
            node.pop(k)
        elif _is_list(want) and OmegaConf.is_dict(child):
            errors.append(ConfigError(full, "must be a list, e.g. [a, b], got a section of keys"))
            node.pop(k)
        elif (item := list_section_type(want)) is not None and OmegaConf.is_list(child):
            before = len(errors)
            for i, x in enumerate(child):
                if OmegaConf.is_dict(x):
                    _walk(item, x, f"{full}[{i}]", errors)
                elif x is not None:
                    errors.append(ConfigError(f"{full}[{i}]", f"must be a section of keys, got {_show(x)}"))
            if len(errors) > before:
                node.pop(k)
        elif _is_scalar(want) and OmegaConf.is_config(child):
            errors.append(ConfigError(full, f"must be a single value, got {_show(node[k])}"))
            node.pop(k)
        elif _args(want) == (int,) and _whole_float(child._value()):
            node[k] = int(child._value())  # max_tokens: 5e9 (how budgets are written) is the int 5000000000


def rename_keys(schema: type, node: Any, path: str, errors: list[ConfigError], recurse: bool = True) -> None:
    """Give a schema's renamed keys (RENAMED_KEYS) their new names and drop its retired ones
    (RETIRED_KEYS), each with a one-line note; both names in one source is an error."""
    if not OmegaConf.is_dict(node):
        return
    renamed: dict[str, str] = getattr(schema, "RENAMED_KEYS", {})
    retired: dict[str, str] = getattr(schema, "RETIRED_KEYS", {})
    hints = typing.get_type_hints(schema) if recurse else {}
    for k in list(node.keys()):
        full = key(path, str(k))
        if k in renamed:
            new = renamed[k]
            if new in node:
                errors.append(ConfigError(full, f"is the old name of {key(path, new)}, which is set too: keep one"))
                continue
            note_once(f"config key '{full}' is deprecated: read as '{key(path, new)}' (rename it)")
            node[new] = node[k]
            node.pop(k)
        elif k in retired:
            note_once(f"config key '{full}' is deprecated and ignored: {retired[k]} (delete it)")
            node.pop(k)
        elif k in hints and (sub := section_type(hints[k])) is not None:
            rename_keys(sub, node._get_node(k), full, errors)


def _args(t: Any) -> tuple[Any, ...]:
    """The members of `X | None` (or just X)."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(t) if a is not type(None))
    return (t,)


def section_type(t: Any) -> type | None:
    """The dataclass of a section field (`Section` or `Section | None`), else None."""
    return next((a for a in _args(t) if dataclasses.is_dataclass(a)), None)


def list_section_type(t: Any) -> type | None:
    """The dataclass of a `list[SomeSection]` field, else None."""
    for a in _args(t):
        if typing.get_origin(a) is list and dataclasses.is_dataclass(typing.get_args(a)[0]):
            return typing.get_args(a)[0]
    return None


def _is_mapping(t: Any) -> bool:
    return all(typing.get_origin(a) is dict or a is dict for a in _args(t))


def _is_list(t: Any) -> bool:
    return all(typing.get_origin(a) in (list, tuple) or a in (list, tuple) for a in _args(t))


def _whole_float(v: Any) -> bool:
    """A float with an integer value (5e9, 1024.0), as YAML reads scientific notation."""
    return isinstance(v, float) and v.is_integer()


def _is_scalar(t: Any) -> bool:
    return all(a in (int, float, str, bool) for a in _args(t))


def load_config(
    schema: type[T], *yaml_paths: str | Path, overrides: Sequence[str] = (), prefix: str = ""
) -> T:
    return from_node(schema, merge_sources(yaml_paths, overrides, schema), prefix)


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
