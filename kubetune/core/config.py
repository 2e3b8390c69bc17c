"""Typed configs: one dataclass per stage, built and validated once.

Each field carries its help text in ``metadata["help"]`` (the convention of transformers'
``HfArgumentParser`` and TRL's configs), so the CLI, the docs and error messages all read the
same words. ``from_dict`` rejects unknown keys and wrong types, naming the key and the source.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kubetune.errors import ConfigError

T = TypeVar("T")


def setting(default: Any, help: str, **kw) -> Any:  # noqa: A002 - "help" mirrors HfArgumentParser
    """A dataclass field with its help text."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def _check_type(key: str, value: Any, annotation: Any, source: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg, source)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: '{key}' must be {annotation}, got {type(value).__name__} {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {type(value).__name__} {value!r}")
        return list(value)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__} {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; people write learning rates that way.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, float) and value.is_integer():
            # KFP passes dict parameters as protobuf Structs, whose numbers are all doubles:
            # {"batch_size": 2} arrives in the component as {"batch_size": 2.0}.
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {type(value).__name__} {value!r}")
        return value
    return value


def with_named(settings: dict[str, Any] | None, named: dict[str, Any], source: str) -> dict[str, Any]:
    """A component's settings merged with the values it takes as named parameters.

    The named value would silently win over a different copy in the settings (a pipeline that fixes
    ``learning_rate=0.0`` for a step ignored ``{"learning_rate": 1e-3}`` in its settings), so such a
    key is refused by name; an equal copy is harmless and kept.
    """
    settings = dict(settings or {})
    clash = sorted(k for k in settings if k in named and settings[k] != named[k])
    if clash:
        given = ", ".join(f"{k}={named[k]!r}" for k in clash)
        raise ConfigError(f"{source}: {clash} are this step's own parameters ({given}); the copy in the "
                          f"settings would be ignored: set the parameter instead")
    return {**settings, **named}


def from_dict(cls: type[T], values: dict[str, Any] | None, source: str = "config") -> T:
    """Build ``cls`` from a mapping, rejecting unknown keys and wrong types by name."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    checked = {k: _check_type(k, v, hints[k], source) for k, v in values.items()}
    try:
        return cls(**checked)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML/JSON config file into a mapping (error names the file)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of settings, got {type(data).__name__}")
    return data


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse ``--set key=value`` pairs; values are read as YAML scalars (1e-4, true, 8)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None
    return out


def help_table(cls: type) -> list[tuple[str, Any, str]]:
    return [(f.name, f.default if f.default is not dataclasses.MISSING else "(required)", f.metadata.get("help", ""))
            for f in dataclasses.fields(cls)]
