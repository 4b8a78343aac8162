"""A task from another package: registered through the ``ts_handlers.tasks`` entry points.

The package below is written to a temporary folder, installed with pip (``--target``, offline),
found by the build through its entry point, archived, and served by a real TorchServe whose
workers see it on PYTHONPATH. Nothing in ts_handlers names it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch

from ts_handlers.tools.server import LocalTorchServe

# A user's own handler on the base: the complete file (docs/adding-a-task.md).
HANDLER_FILE = """
import ts_handlers.api as ts


class VectorScoringConfig(ts.HandlerConfig):
    mode: str = "vector_scoring"
    features: ts.PositiveInt = 4


class VectorScoringHandler(ts.TaskHandler[VectorScoringConfig]):
    def decode(self, request: ts.Request) -> ts.Decoded:
        vector = request.json()
        numbers = isinstance(vector, list) and all(isinstance(x, int | float) for x in vector)
        if not numbers or len(vector) != self.config.features:
            raise ts.InvalidInput(f"send a JSON list of {self.config.features} numbers")
        return ts.Decoded([vector])


handle = ts.entry_point(VectorScoringHandler)
"""
PACKAGE = {
    "pyproject.toml": """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "ts-tiny-task"
version = "0.1.0"

[project.entry-points."ts_handlers.tasks"]
vector_scoring = "ts_tiny_task.task:TASK"
""",
    # The handler, all of it: what a worker imports (docs/adding-a-task.md shows this file).
    "ts_tiny_task/__init__.py": HANDLER_FILE,
    # The task's declaration for the registry and the build (export code: never on a worker).
    "ts_tiny_task/task.py": '''
"""vector_scoring: a float vector in, one score per output out."""

import torch

from ts_handlers.api import ExportPlan, RequestOptions, Task
from ts_tiny_task import VectorScoringConfig, VectorScoringHandler


def prepare_export(config: VectorScoringConfig) -> ExportPlan:
    from ts_handlers.exporters import user_files

    model = user_files.load_model_file(
        config.model_file, config.model_class, config.serialized_file
    )
    batches = [(torch.randn(n, config.features),) for n in (1, 3, 8)]
    return ExportPlan(model=model, example_inputs=batches[1], verify_inputs=batches)


def init_setup(model_path, relative, options):
    """ts-handlers init: a folder holding scorer.py and its state_dict scorer.pt."""
    if not (model_path / "scorer.py").is_file() or not (model_path / "scorer.pt").is_file():
        return None
    files = {"model_file": f"{relative}/scorer.py", "serialized_file": f"{relative}/scorer.pt"}
    return {"mode": "vector_scoring", **files, "export_method": "trace"}, None


def format_answer(answer, inputs):
    """ts-handlers predict: one score a line."""
    if not isinstance(answer, list) or not all(isinstance(x, float) for x in answer):
        return None
    return "\\n".join(f"output {i}: {score:+.4f}" for i, score in enumerate(answer))


TASK = Task(
    VectorScoringConfig,
    RequestOptions,
    VectorScoringHandler,
    prepare_export,
    init=init_setup,
    init_takes="a folder with scorer.py and scorer.pt (vector scoring)",
    answer=format_answer,
)
''',
}
MODEL_FILE = """
import torch
from torch import nn


class Scorer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.linear(vectors)
"""


def write_scorer(folder: Path) -> torch.nn.Module:
    """The user's model in ``folder`` (scorer.py and its state_dict scorer.pt), seeded; the
    model itself, for the expected answers."""
    folder.mkdir()
    (folder / "scorer.py").write_text(MODEL_FILE)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(MODEL_FILE, namespace)
    model = namespace["Scorer"]().eval()
    torch.save(model.state_dict(), folder / "scorer.pt")
    return model


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package pip-installed into its own folder; returns that folder (for PYTHONPATH)."""
    root = tmp_path_factory.mktemp("third_party")
    source = root / "src"
    for name, text in PACKAGE.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text.lstrip())
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
        + ["--no-build-isolation", "--target", str(site), str(source)],
        check=True,
    )
    return site


def test_a_third_party_task_is_built_and_served(installed: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    listing = subprocess.run(
        [sys.executable, "-m", "ts_handlers.tools.build", "--list-tasks"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "vector_scoring" in listing and "ts_tiny_task:handle" in listing

    config_dir = tmp_path / "scorer"
    model = write_scorer(config_dir)
    setup = {
        "mode": "vector_scoring",
        "model_file": "scorer.py",
        "serialized_file": "scorer.pt",
        "export_method": "trace",
    }
    (config_dir / "setup_config.json").write_text(json.dumps(setup))
    store = tmp_path / "store"
    build = subprocess.run(
        [sys.executable, "-m", "ts_handlers.tools.build", str(config_dir)]
        + ["--model-store", str(store)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    assert "verification against eager" in build.stdout and "PASSED" in build.stdout

    vector = [0.5, -1.0, 2.0, 0.25]
    with torch.no_grad():
        expected = model(torch.tensor([vector]))[0].tolist()
    # The package, then whatever ts_handlers the caller's PYTHONPATH names (a checkout).
    path = os.pathsep.join(filter(None, [str(installed), os.environ.get("PYTHONPATH")]))
    with LocalTorchServe(store, ["scorer.mar"], env={"PYTHONPATH": path}) as server:
        url = f"{server.inference_url}/predictions/scorer"
        answer = requests.post(url, json=vector, headers=server.auth_headers(), timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json() == pytest.approx(expected, abs=1e-6)
        wrong = requests.post(url, json=[1.0], headers=server.auth_headers(), timeout=30)
        assert wrong.status_code == 400 and "4 numbers" in wrong.json()["message"]


def test_the_users_handler_is_one_import_and_at_most_20_lines() -> None:
    lines = HANDLER_FILE.strip().splitlines()
    imports = [line for line in lines if line.startswith(("import ", "from "))]
    assert len(lines) <= 20 and imports == ["import ts_handlers.api as ts"]


def test_a_third_party_task_appears_in_init_predict_and_kserve(
    installed: Path, tmp_path: Path
) -> None:
    """Declared once in its package, the task is found by every command; nothing in
    ts_handlers names it."""
    path = os.pathsep.join(filter(None, [str(installed), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}

    def command(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ts_handlers.tools.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    model = tmp_path / "scorer"
    scorer = write_scorer(model)
    configs, store = tmp_path / "configs", tmp_path / "store"

    init = command("init", str(model), "--configs-root", str(configs))
    assert init.returncode == 0, init.stderr
    assert "for task vector_scoring" in init.stdout
    build = command("build", str(configs / "scorer"), "--model-store", str(store))
    assert build.returncode == 0, build.stderr

    vector = [0.5, -1.0, 2.0, 0.25]
    (tmp_path / "vector.json").write_text(json.dumps(vector))
    predict = command(
        "predict", "scorer", "--model-store", str(store), "--file", str(tmp_path / "vector.json")
    )
    assert predict.returncode == 0, predict.stderr
    with torch.no_grad():
        expected = scorer(torch.tensor([vector]))[0].tolist()
    assert predict.stdout.splitlines() == [
        f"output {i}: {score:+.4f}" for i, score in enumerate(expected)
    ]

    kserve = command("kserve", str(tmp_path / "kserve"), "--model-store", str(store))
    assert kserve.returncode == 0, kserve.stderr
    assert "pip install 'ts-handlers' ts-tiny-task" in kserve.stdout
