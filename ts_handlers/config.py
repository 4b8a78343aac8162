"""Typed configuration read from ``setup_config.json``.

One file drives both the export step and the served handler, so it is parsed in exactly one
place. Each task has a frozen dataclass; an unknown key, a value of the wrong type or a value
outside the allowed choices fails when the model loads (or when the export starts), with a
message that names the key and lists what would have been accepted.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

SETUP_CONFIG_FILE = "setup_config.json"


class ConfigError(ValueError):
    """A setup_config.json that cannot be used; raised before any request is served."""


@dataclasses.dataclass(frozen=True)
class HandlerConfig:
    """Keys every task understands.

    Names follow TorchServe's own ``setup_config.json`` where they mean the same thing
    (``model_name``, ``mode``, ``save_mode``), so a user's existing file mostly carries over.
    """

    mode: str
    # Where the export step finds the eager checkpoint (a folder, or a hub id served from cache).
    model_name: str = ""
    # "torchscript" serves an exported graph; "pretrained" serves the eager checkpoint.
    save_mode: str = "torchscript"
    # How the torchscript graph is produced: "trace" runs example inputs, "script" compiles Python.
    export_method: str = "trace"
    freeze: bool = True
    # Largest difference between exported and eager outputs that verification accepts.
    verify_atol: float = 1e-4
    # Inputs run through the model in one forward; bounds memory when a request carries many.
    inference_batch_size: int = 32
    # The user's own files, named as torch-model-archiver names them (see user_files.py): a
    # TorchScript file, or a state_dict loaded into model_class from the .py model_file.
    serialized_file: str = ""
    model_file: str = ""
    model_class: str = ""

    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        "save_mode": ("torchscript", "pretrained"),
        "export_method": ("trace", "script"),
    }

    def __post_init__(self) -> None:
        for key, allowed in self.CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                choices = ", ".join(map(repr, allowed))
                raise ConfigError(f"{key}={value!r} is not supported; choose one of {choices}")
        for key in ("inference_batch_size",):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            field.name: _jsonable(getattr(self, field.name)) for field in dataclasses.fields(self)
        }


ConfigT = TypeVar("ConfigT", bound=HandlerConfig)


def parse_config(config_class: type[ConfigT], raw: Mapping[str, Any], source: str) -> ConfigT:
    """Builds ``config_class`` from a JSON mapping, checking every key and type."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    hints = typing.get_type_hints(config_class)
    known = [field.name for field in dataclasses.fields(config_class)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(known)}"
        )
    values = {key: _coerce(key, hints[key], value, source) for key, value in raw.items()}
    try:
        return config_class(**values)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    except TypeError as error:  # a required key is missing
        raise ConfigError(f"{source}: {error}") from None


def load_config(config_class: type[ConfigT], path: str | Path) -> ConfigT:
    """Reads and parses a setup_config.json file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing; every archive needs a {SETUP_CONFIG_FILE}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from None
    return parse_config(config_class, raw, str(path))


def _coerce(key: str, hint: Any, value: Any, source: str) -> Any:
    """Checks ``value`` against the annotation; lists become tuples so configs stay hashable."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        return _coerce(key, inner[0], value, source)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            _wrong_type(key, "a list", value, source)
        item_hint = args[0]
        return tuple(
            _coerce(f"{key}[{i}]", item_hint, item, source) for i, item in enumerate(value)
        )
    if origin is dict:
        if not isinstance(value, dict):
            _wrong_type(key, "an object", value, source)
        value_hint = args[1]
        return types.MappingProxyType(
            {str(k): _coerce(f"{key}.{k}", value_hint, v, source) for k, v in value.items()}
        )
    if hint is bool:
        if not isinstance(value, bool):
            _wrong_type(key, "true or false", value, source)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _wrong_type(key, "an integer", value, source)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _wrong_type(key, "a number", value, source)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            _wrong_type(key, "a string", value, source)
        return value
    raise ConfigError(f"{source}: {key} has an unsupported annotation {hint!r}")  # our own bug


def _wrong_type(key: str, expected: str, value: Any, source: str) -> typing.NoReturn:
    raise ConfigError(f"{source}: {key} must be {expected}, got {json.dumps(value)}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _jsonable(item) for key, item in value.items()}
    return value
