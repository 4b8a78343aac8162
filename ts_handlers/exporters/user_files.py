"""The user's own model files, named as torch-model-archiver names them.

* ``serialized_file`` alone: a TorchScript file the user already has
  (``torch.jit.script(model).save("my_model.pt")``). There is no eager model to compare with,
  so the build checks the graph against itself: a batch must answer what its inputs answer one
  at a time.
* ``model_file`` + ``model_class`` + ``serialized_file``: a ``.py`` file defining the
  architecture and a ``state_dict`` (``.pt``, ``.pth`` or ``.safetensors``). The eager model is
  rebuilt from them, as TorchServe's own handler does (the class is built with no arguments),
  then exported and verified in full.

Export-time only: a serving worker never imports this module.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ts_handlers.config import ConfigError
from ts_handlers.errors import first_lines
from ts_handlers.verification import one_at_a_time

__all__ = [
    "load_model_file",
    "load_state_dict",
    "load_torchscript",
    "load_user_model",
    "one_at_a_time",
]


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"serialized_file {str(path)!r} does not exist")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # torch.jit.load raises RuntimeError or worse on a state_dict
        hint = (
            "it looks like a state_dict or a pickled model: also give model_file (the .py "
            "defining the class) and model_class"
            if _is_torch_save(path)
            else "save it with torch.jit.script(model).save(path) or torch.jit.trace"
        )
        raise ConfigError(
            f"serialized_file {str(path)!r} is not a TorchScript file ({error.__class__.__name__}"
            f"); {hint}"
        ) from None
    return module.eval()


def load_user_model(config: Any) -> tuple[nn.Module, torch.jit.ScriptModule | None]:
    """(the model to run, and the same graph again when it is the user's own TorchScript file:
    there is then nothing to export and no eager model to verify against)."""
    if config.model_file:
        return load_model_file(config.model_file, config.model_class, config.serialized_file), None
    scripted = load_torchscript(config.serialized_file)
    return scripted, scripted


def load_model_file(
    model_file: str | Path, model_class: str, serialized_file: str | Path
) -> nn.Module:
    """Builds ``model_class`` from the user's ``.py`` file and loads the state_dict into it."""
    model_class_type = _class_from_file(Path(model_file), model_class)
    try:
        model = model_class_type()
    except TypeError as error:
        raise ConfigError(
            f"model_class {model_class_type.__name__} must be constructible with no arguments "
            f"(as TorchServe builds it): {error}. Give its arguments defaults in {model_file}"
        ) from None
    state_dict = load_state_dict(Path(serialized_file))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ConfigError(
            f"serialized_file {str(serialized_file)!r} does not fit {model_class_type.__name__}: "
            f"{first_lines(error)} (and {len(str(error).splitlines()) - 1} more lines)"
        ) from None
    return model.eval()


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"serialized_file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(
            f"serialized_file {str(path)!r} is not a state_dict torch.load can read safely "
            f"({error.__class__.__name__}); save it with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # a training checkpoint that wraps the weights
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"serialized_file {str(path)!r} holds a {type(loaded).__name__}, not a state_dict"
        )
    return loaded


def _class_from_file(model_file: Path, model_class: str) -> type[nn.Module]:
    if model_file.suffix != ".py" or not model_file.is_file():
        raise ConfigError(f"model_file {str(model_file)!r} must be an existing .py file")
    module_name = f"ts_handlers_user_model_{abs(hash(str(model_file.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, model_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # The file may import its own helpers from beside it, as it would when run as a script.
    sys.path.insert(0, str(model_file.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(model_file.parent))
    classes = {
        name: value
        for name, value in vars(module).items()
        if inspect.isclass(value)
        and issubclass(value, nn.Module)
        and value.__module__ == module_name
    }
    if model_class:
        if model_class not in classes:
            raise ConfigError(
                f"model_class {model_class!r} is not an nn.Module defined in {model_file}; "
                f"it defines {', '.join(sorted(classes)) or 'none'}"
            )
        return classes[model_class]
    if len(classes) != 1:
        raise ConfigError(
            f"{model_file} defines {len(classes)} nn.Module classes "
            f"({', '.join(sorted(classes)) or 'none'}); name one with model_class"
        )
    return next(iter(classes.values()))


def _is_torch_save(path: Path) -> bool:
    """torch.save writes a zip with a data.pkl; TorchScript's zip has constants.pkl and code/."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return True  # the legacy pickle format
    return any(name.endswith("data.pkl") for name in names) and not any(
        "/code/" in name for name in names
    )


def user_model_kind(config: Any) -> str:
    """Which of the user's own files the config names: ``torchscript_file``, ``model_file``, or
    the empty string (none: the task loads ``model_name`` itself)."""
    if config.model_file:
        if not config.serialized_file:
            raise ConfigError(
                "model_file needs serialized_file: the state_dict to load into model_class"
            )
        return "model_file"
    if config.serialized_file:
        return "torchscript_file"
    return ""
