"""The task registry: which ``mode`` is served by which handler, config and export.

Each task module declares one :class:`Task` (its config schema, its per-request options, its
handler class and where its export preparation lives). The build, the docs and the config
parser find tasks here, never in a list someone must edit:

* the tasks this package ships (``BUILTIN_TASKS``), and
* any installed package's tasks, through the ``ts_handlers.tasks`` entry-point group::

      # a third party's pyproject.toml
      [project.entry-points."ts_handlers.tasks"]
      audio_tagging = "my_package.audio_tagging:TASK"

``mode`` is declared once, on the task's config (``mode: Literal["..."] = "..."``); it is the
discriminator that picks the task, and so the config schema, when a ``setup_config.json`` is
read.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from ts_handlers.config import (
    ConfigError,
    HandlerConfig,
    RequestOptions,
    parse_config,
    read_config_file,
)

if TYPE_CHECKING:
    from ts_handlers.base import TaskHandler
    from ts_handlers.export import ExportPlan

ENTRY_POINT_GROUP = "ts_handlers.tasks"
# What ``ts-handlers init`` writes for a model: setup_config.json, and index_to_name.json or None.
InitSetup = tuple[dict[str, Any], dict[str, str] | None]
BUILTIN_TASKS = (
    "ts_handlers.image_classification:TASK",
    "ts_handlers.sequence_classification:TASK",
    "ts_handlers.sentence_embedding:TASK",
    "ts_handlers.token_classification:TASK",
)


@dataclass(frozen=True)
class InitOption:
    """An option a task adds to ``ts-handlers init`` for the models it recognises: argparse's
    ``add_argument(*flags, **settings)``. Its value reaches the task's ``init`` function in
    ``options``, under argparse's name for it (``--image-size`` -> ``image_size``)."""

    flags: tuple[str, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


@dataclass(frozen=True)
class Task:
    config: type[HandlerConfig]
    options: type[RequestOptions]
    handler: type[TaskHandler]
    # The export preparation, ``config -> ExportPlan``: a function, or "module:function" (a
    # built-in task's, in ts_handlers/exporters/), imported by the build only, so a worker
    # serving an archive never loads export-time code.
    export: str | Callable[[Any], ExportPlan]
    # The ts-handlers extra serving it needs (``pip install 'ts-handlers[<extra>]'``): what
    # ``ts-handlers kserve`` names for the predictor image.
    extra: str | None = None
    # How ``ts-handlers init`` recognises a model of this task, "module:function" or a function
    # ``(model_path, relative_path, options) -> (setup_config, labels or None)``, None for a
    # model of another task; ``init_takes`` says what it takes, for init's refusals.
    init: str | Callable[..., InitSetup | None] | None = None
    init_takes: str = ""
    # The options ``init`` takes for this task's models (``--image-size``, say).
    init_options: tuple[InitOption, ...] = ()
    # How ``ts-handlers predict`` prints an answer, "module:function" or a function
    # ``(answer, texts sent or None) -> str``, None for an answer of another shape.
    answer: str | Callable[[Any, Sequence[str] | None], str | None] | None = None
    # The installed distribution that provides the task (set for an entry point's task): what
    # a serving image must install besides ts-handlers.
    package: str | None = None

    def prepare_export(self, config: HandlerConfig) -> ExportPlan:
        """The task's export plan for ``config`` (its export code imported now)."""
        return _resolve(self.export)(config)

    def init_setup(
        self, model_path: Path, relative: str, options: dict[str, Any]
    ) -> InitSetup | None:
        """``init``'s setup_config.json and labels for ``model_path``, if this task serves it."""
        return None if self.init is None else _resolve(self.init)(model_path, relative, options)

    def format_answer(self, answer: Any, inputs: Sequence[str] | None) -> str | None:
        """An answer as a person reads it, if it is this task's; None otherwise."""
        return None if self.answer is None else _resolve(self.answer)(answer, inputs)

    @property
    def mode(self) -> str:
        """The config's ``mode`` default: its ``Literal`` (when it has one) holds that one value."""
        field = self.config.model_fields.get("mode")
        mode = None if field is None else field.default
        if not isinstance(mode, str) or not mode:
            raise ConfigError(f"{self.config.__name__} declares no mode: add mode: str = '<name>'")
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else ()
        if choices and choices != (mode,):
            raise ConfigError(
                f"{self.config.__name__}.mode is Literal{list(choices)} but defaults to "
                f"{mode!r}: declare mode: Literal[{mode!r}] = {mode!r}"
            )
        return mode

    @property
    def entry_point(self) -> str:
        """What an archive's manifest names: the module's ``handle`` function."""
        return f"{self.handler.__module__}:handle"


@cache
def tasks() -> dict[str, Task]:
    """Mode -> task, built-in first, then every installed package's entry points."""
    found: dict[str, Task] = {}
    sources = [(name, lambda name=name: _load(name)) for name in BUILTIN_TASKS]
    points = entry_points(group=ENTRY_POINT_GROUP)
    sources += [(point.value, point.load) for point in points]
    packages = {point.value: point.dist.name for point in points if point.dist is not None}
    for name, load in sources:
        task = load()
        if not isinstance(task, Task):
            raise ConfigError(f"{name} is not a ts_handlers.tasks.Task")
        if name in packages and task.package is None:
            task = replace(task, package=packages[name])
        found.setdefault(task.mode, task)  # a built-in mode cannot be taken over
    return found


def task_for(mode: Any) -> Task:
    registry = tasks()
    if mode not in registry:
        raise ConfigError(f"mode={mode!r} is not supported; choose one of {', '.join(registry)}")
    return registry[mode]


def load_task_config(path: Path) -> tuple[Task, HandlerConfig]:
    """A setup_config.json of any task: its ``mode`` picks the task, whose schema parses it."""
    raw = read_config_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    try:
        task = task_for(raw.get("mode"))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return task, parse_config(task.config, raw, str(path))


def _load(reference: str) -> Any:
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def _resolve(reference: str | Callable[..., Any]) -> Callable[..., Any]:
    return _load(reference) if isinstance(reference, str) else reference
