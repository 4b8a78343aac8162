"""The task registry: what the build can archive, found in one place."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ts_handlers import tasks as tasks_module
from ts_handlers.config import ConfigError
from ts_handlers.tasks import load_task_config, task_for, tasks
from ts_handlers.tools import build

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = {
    "image_classification",
    "sequence_classification",
    "sentence_embedding",
    "token_classification",
}


def test_the_builtin_tasks_are_registered_under_their_modes():
    registry = tasks()
    assert set(registry) >= BUILTIN
    for mode in BUILTIN:
        task = registry[mode]
        assert task.mode == mode
        assert task.entry_point == f"ts_handlers.{mode}:handle"
        assert task.handler.__module__ == f"ts_handlers.{mode}"  # module named after its mode


def test_every_task_has_its_docs_page_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for mode in BUILTIN:
        assert (ROOT / "docs" / f"{mode}.md").is_file()
        assert f"docs/{mode}.md" in readme


def test_the_build_lists_the_registered_tasks(capsys):
    assert build.main(["--list-tasks"]) == 0
    listing = capsys.readouterr().out
    for mode in tasks():
        assert mode in listing


def test_mode_picks_the_schema_and_an_unknown_mode_names_the_choices(tmp_path: Path):
    path = tmp_path / "setup_config.json"
    path.write_text(json.dumps({"mode": "token_classification", "aggregation_strategy": "max"}))
    task, config = load_task_config(path)
    assert task is task_for("token_classification")
    assert config.aggregation_strategy == "max"

    path.write_text(json.dumps({"mode": "image_classification", "aggregation_strategy": "max"}))
    with pytest.raises(ConfigError, match="unknown key.*aggregation_strategy"):
        load_task_config(path)
    path.write_text(json.dumps({"mode": "translation"}))
    with pytest.raises(ConfigError, match="mode='translation' is not supported; choose one of"):
        load_task_config(path)


def test_the_runtime_imports_no_tooling():
    """--self-contained archives embed ts_handlers without tools/: no task may need it to serve."""
    modules = ", ".join(f"ts_handlers.{mode}" for mode in sorted(BUILTIN))
    probe = (
        f"import sys, {modules}\n"
        "tooling = sorted(m for m in sys.modules if m.startswith('ts_handlers.tools'))\n"
        "assert not tooling, tooling\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_mode_that_disagrees_with_its_literal_is_refused():
    from typing import Literal

    from ts_handlers.config import HandlerConfig, RequestOptions
    from ts_handlers.tasks import Task

    class Disagrees(HandlerConfig):
        mode: Literal["a"] = "b"

    with pytest.raises(ConfigError, match=r"Literal\['a'\] but defaults to 'b'"):
        _ = Task(Disagrees, RequestOptions, object, "x:y").mode


def test_each_builtin_task_declares_what_the_tools_need_and_no_tool_names_it():
    """init, predict and kserve derive from the registry: cli.py and kserve.py name no mode."""
    tools = ROOT / "ts_handlers" / "tools"
    sources = (tools / "cli.py").read_text() + (tools / "kserve.py").read_text()
    for mode in BUILTIN:
        task = tasks()[mode]
        assert task.extra in ("vision", "text") and task.init_takes
        assert isinstance(task.export, str) and task.export.startswith("ts_handlers.exporters.")
        assert callable(tasks_module._resolve(task.init))
        assert callable(tasks_module._resolve(task.answer))
        assert f'"{mode}"' not in sources and f"'{mode}'" not in sources


def test_a_tasks_init_options_come_from_its_record(monkeypatch, tmp_path: Path):
    """init's task-specific options are declared by the task (Task.init_options): the image
    task's are, cli.py names none, and a task's option reaches its init function."""
    from dataclasses import replace

    from ts_handlers.tasks import InitOption
    from ts_handlers.tools import cli

    assert "--image-size" not in (ROOT / "ts_handlers" / "tools" / "cli.py").read_text()
    image = tasks()["image_classification"]
    assert {flag for option in image.init_options for flag in option.flags} == {
        "--image-size",
        "--color-mode",
        "--mean",
        "--std",
    }
    seen = {}

    def init(model_path, relative, options):
        seen.update(options)
        return None

    text = replace(
        tasks()["sequence_classification"],
        init=init,
        init_options=(InitOption(("--vocab-case",), {"choices": ("upper", "lower")}),),
    )
    monkeypatch.setattr(
        tasks_module, "tasks", lambda: {"sequence_classification": text, "image": image}
    )
    model = tmp_path / "m.pt"
    model.write_bytes(b"")
    argv = ["init", str(model), "--configs-root", str(tmp_path), "--vocab-case", "lower"]
    cli.main(argv)  # whatever the image task then makes of an empty .pt file
    assert seen["vocab_case"] == "lower" and seen["image_size"] == [28, 28]
