"""Reading a config: strict TOML/YAML parsing, each value checked against its field's annotation
(an unknown key, a wrong type or a value out of range names the dotted key), relative paths taken
relative to the config file."""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import yaml

from jaxdpo.config.fields import ConfigError, fail, is_local
from jaxdpo.config.sections import ExperimentConfig


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field annotation (as resolved by get_type_hints with extras)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        value = _coerce(key, value, args[0])
        for rule in args[1:]:
            rule.check(key, value)
        return value
    if origin is Literal:
        if value not in args:
            fail(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            fail(key, f"must be a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            fail(key, f"must be a table, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            fail(key, f"must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(key, f"must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(key, f"must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            fail(key, f"must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    raise TypeError(f"unsupported config annotation {annotation!r} at {key}")  # a bug, not user input


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        fail(prefix or "config", f"must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            fail(dotted, f"unknown key{hint}")
        values[key] = _coerce(dotted, value, hints[key])
    return cls(**values)


def validate(config: ExperimentConfig) -> ExperimentConfig:
    """Every check that does not need the model or the data: each field's range and choices (also
    for configs built in Python, not parsed), each section's cross-field checks, then across sections."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        hints = typing.get_type_hints(type(values), include_extras=True)
        for field in dataclasses.fields(values):
            _coerce(f"{section.name}.{field.name}", getattr(values, field.name), hints[field.name])
    config.check()
    return config


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build and validate a config from nested dicts (as parsed from TOML/YAML)."""
    return validate(_build(ExperimentConfig, raw, ""))


def load_config(path: str | Path | None = None) -> ExperimentConfig:
    """Read a TOML (.toml) or YAML (.yaml/.yml) config; None gives the embedded default. Relative
    local paths in it are taken relative to the file's folder."""
    if path is None:
        return validate(ExperimentConfig())
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"{path}: config files must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {error}") from error
    return config_from_dict(_paths_relative_to(raw, path.resolve().parent))


_PATH_KEYS = (("model", "path"), ("oracle", "path"), ("data", "path"))
_HUB_KEYS = {("model", "path"), ("oracle", "path")}  # may name a hub repository instead of a folder


def _paths_relative_to(raw: Any, folder: Path) -> Any:
    """A config file's relative paths name files next to it, wherever the command runs: every
    relative `data.path`, and a relative `model.path` / `oracle.path` that looks local or exists
    next to the file, is made absolute against `folder`. Any other `model.path` / `oracle.path` is a
    hub name ("name" or "org/name"); one that also names something in the current directory is
    refused, since the loaders would silently read that instead of the hub."""
    if not isinstance(raw, dict):
        return raw
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for section, key in _PATH_KEYS:
        value = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
        if not isinstance(value, str) or value == "embedded" or Path(value).expanduser().is_absolute():
            continue
        beside = (folder / value).resolve()
        if (section, key) in _HUB_KEYS and not is_local(value) and not beside.exists():
            if Path(value).exists():
                fail(
                    f"{section}.{key}", f"{value!r} is not next to the config file ({beside} does not exist) but is in the current "
                    f"directory ({Path(value).resolve()}); relative paths are relative to the config file: write the path from "
                    f"{folder}, or an absolute one"
                )
            continue  # a hub name
        raw[section][key] = str(beside)
    return raw
