"""Archives made by hand with the ``torch-model-archiver`` command line, served by a real
TorchServe (issue 21).

As a user of TorchServe's Hugging Face example makes them: a graph traced on ``input_ids``
alone at ``max_length`` (``traced_model.pt``), the example's own ``setup_config.json``, an
``index_to_name.json``, the tokenizer files, and ``--handler`` given the path that
``ts-handlers handler-file`` prints; and a ``save_mode: pretrained`` archive of the
checkpoint's weights. Both answer as ``transformers.pipeline`` does. An archive whose every
worker fails its load stops ``ts-handlers predict`` within seconds, with the handler's line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import (
    TINY_TEXT_MAX_LENGTH,
    TORCHSERVE_EXAMPLE_SETUP,
    save_tiny_classifier,
    trace_like_torchserve_example,
)
from serving import described

from ts_handlers.tools import cli
from ts_handlers.tools.server import LocalTorchServe

TEXTS = [
    "the movie was great",
    "tea",
    "i hated every minute of this awful boring film, and the popcorn was stale too",
    "What a WONDERFUL surprise!!!",
    "rain",
]
LABELS = {"0": "bad", "1": "so-so", "2": "good"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json")
# A crash loop must be reported in seconds, not after the 180 s start-up timeout.
CRASH_LOOP_SECONDS = 90


def handler_file() -> str:
    """What the docs tell a user to pass as --handler, from the real command."""
    command = [sys.executable, "-m", "ts_handlers.tools.cli", "handler-file"]
    done = subprocess.run(
        [*command, "sequence_classification"], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def archive(store: Path, name: str, serialized: Path, extra_files: list[Path]) -> Path:
    """``torch-model-archiver`` itself, on the command line a user types."""
    archiver = shutil.which("torch-model-archiver", path=str(Path(sys.executable).parent))
    assert archiver is not None, "torch-model-archiver is installed with ts-handlers"
    subprocess.run(
        [
            archiver,
            "--model-name",
            name,
            "--version",
            "1.0",
            "--serialized-file",
            str(serialized),
            "--handler",
            handler_file(),
            "--extra-files",
            ",".join(str(path) for path in extra_files),
            "--export-path",
            str(store),
        ],
        check=True,
        timeout=120,
    )
    return store / f"{name}.mar"


def example_files(folder: Path, checkpoint: Path, setup: dict[str, Any]) -> list[Path]:
    """setup_config.json, index_to_name.json and the tokenizer files, as --extra-files."""
    folder.mkdir()
    (folder / "setup_config.json").write_text(json.dumps(setup))
    (folder / "index_to_name.json").write_text(json.dumps(LABELS))
    return [folder / "setup_config.json", folder / "index_to_name.json"] + [
        checkpoint / name for name in TOKENIZER_FILES
    ]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("handmade")
    checkpoint = save_tiny_classifier(root / "checkpoint", "bert", "single_label")
    store = root / "store"
    store.mkdir()
    traced = trace_like_torchserve_example(checkpoint, root / "traced_model.pt", inputs=1)
    archive(
        store,
        "traced",
        traced,
        example_files(root / "traced", checkpoint, TORCHSERVE_EXAMPLE_SETUP),
    )
    pretrained = {**TORCHSERVE_EXAMPLE_SETUP, "save_mode": "pretrained"}
    weights = checkpoint / "model.safetensors"
    archive(
        store, "pretrained", weights, example_files(root / "pretrained", checkpoint, pretrained)
    )
    broken = {**TORCHSERVE_EXAMPLE_SETUP, "hardware": "neuron"}
    archive(store, "broken", traced, example_files(root / "broken", checkpoint, broken))
    return {"checkpoint": checkpoint, "store": store}


@pytest.fixture(scope="module")
def server(made: dict[str, Any]) -> Iterator[LocalTorchServe]:
    with LocalTorchServe(made["store"], ["traced.mar", "pretrained.mar"]) as running:
        yield running


def test_archives_made_with_the_archiver_command_answer_as_the_pipeline(
    made: dict[str, Any], server: LocalTorchServe
) -> None:
    from transformers import pipeline

    classify = pipeline(
        "text-classification",
        model=str(made["checkpoint"]),
        top_k=None,
        truncation=True,
        max_length=TINY_TEXT_MAX_LENGTH,
    )
    expected = [
        {LABELS[item["label"].rsplit("_", 1)[1]]: item["score"] for item in answer}
        for answer in classify(TEXTS)
    ]
    with server.client() as client:
        for model in ("traced", "pretrained"):
            served = client.predict(model, {"inputs": TEXTS})
            for got, want in zip(served, expected, strict=True):
                assert {item["label"] for item in got} == set(want)
                for item in got:
                    assert item["score"] == pytest.approx(want[item["label"]], abs=1e-4)
    # What the load derived, in the describe answer: the graph takes input_ids alone.
    export = described(server, "traced")["export"]
    assert export["inputs"] == ["input_ids"] and export["num_classes"] == 3


def test_a_crash_loop_stops_predict_with_the_handlers_own_error(
    made: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    status = cli.main(
        ["predict", str(made["store"] / "broken.mar"), "--text", "hello", "--timeout", "30"]
    )
    elapsed = time.monotonic() - started
    assert status == 1
    assert elapsed < CRASH_LOOP_SECONDS
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model 'broken' failed to load in every worker" in last_line
    assert "unknown key(s) hardware; valid keys are mode," in last_line
