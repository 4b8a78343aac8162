"""The task registry: which ``mode`` is served by which handler, config and export.

Each task module declares one :class:`Task` (its config schema, its per-request options, its
handler class and its export preparation). The build, the docs and the config parser find
tasks here, never in a list someone must edit:

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

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
BUILTIN_TASKS = (
    "ts_handlers.image_classification:TASK",
    "ts_handlers.sequence_classification:TASK",
    "ts_handlers.sentence_embedding:TASK",
    "ts_handlers.token_classification:TASK",
)


@dataclass(frozen=True)
class Task:
    config: type[HandlerConfig]
    options: type[RequestOptions]
    handler: type[TaskHandler]
    prepare_export: Callable[[Any], ExportPlan]

    @property
    def mode(self) -> str:
        return self.config.model_fields["mode"].default

    @property
    def entry_point(self) -> str:
        """What an archive's manifest names: the module's ``handle`` function."""
        return f"{self.handler.__module__}:handle"


@cache
def tasks() -> dict[str, Task]:
    """Mode -> task, built-in first, then every installed package's entry points."""
    found: dict[str, Task] = {}
    sources = [(name, lambda name=name: _load(name)) for name in BUILTIN_TASKS]
    sources += [(point.value, point.load) for point in entry_points(group=ENTRY_POINT_GROUP)]
    for name, load in sources:
        task = load()
        if not isinstance(task, Task):
            raise ConfigError(f"{name} is not a ts_handlers.tasks.Task")
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
