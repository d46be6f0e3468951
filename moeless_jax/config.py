"""Frozen, self-validating configs and their YAML loading.

Every config in the project is a frozen dataclass whose ``__post_init__`` checks its own fields and raises
:class:`ConfigError` naming the field and the fix. :func:`load_config` builds one from a YAML mapping and
rejects unknown keys, so a typo in a config file is an error, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config field has an invalid value; the message names the field and the fix."""


def require(condition: bool, field: str, message: str) -> None:
    """Raise :class:`ConfigError` for ``field`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


def is_positive_int(value: object) -> bool:
    """An ``int`` (not a ``bool``) that is at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def require_positive_ints(config: object, *names: str) -> None:
    """Raise :class:`ConfigError` for the first field of ``config`` among ``names`` not a positive int."""
    for name in names:
        value = getattr(config, name)
        require(is_positive_int(value), name, f"must be a positive integer, got {value!r}")


def config_from_dict[C](cls: type[C], data: dict[str, Any], *, source: str = "config") -> C:
    """Build the dataclass ``cls`` from a mapping, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of field names to values, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
    try:
        return cls(**data)
    except TypeError as err:  # missing required fields
        raise ConfigError(f"{source}: {err}") from None


def load_config[C](cls: type[C], path: str | Path, *, section: str | None = None) -> C:
    """Load ``cls`` from a YAML file, optionally from one top-level ``section`` of it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if section is not None:
        if not isinstance(data, dict) or section not in data:
            raise ConfigError(f"{path}: no top-level section '{section}'")
        data = data[section]
    return config_from_dict(cls, data, source=f"{path}" + (f" [{section}]" if section else ""))
