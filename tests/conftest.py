"""Unit-test helpers: a real ``ts.context.Context`` driven without a server, and tiny models."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ts.context import Context, RequestProcessor

from ts_handlers.build import build_archive
from ts_handlers.models import SmallCNN


def unpack_archive(mar_path: Path, model_dir: Path) -> dict[str, Any]:
    """Unzips a .mar like TorchServe does and returns its manifest."""
    with zipfile.ZipFile(mar_path) as archive:
        archive.extractall(model_dir)
    return json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())


def make_context(model_dir: Path, manifest: dict[str, Any]) -> Context:
    return Context(manifest["model"]["modelName"], str(model_dir), manifest, 8, None, "0.12.0")


def run_batch(
    handler: Any, requests: list[tuple[Any, dict[str, str]]]
) -> list[tuple[int, Any, dict[str, str]]]:
    """Sends (row, headers) pairs as one TorchServe batch; returns (status, body, headers)."""
    context = handler.context
    context.request_processor = [RequestProcessor(headers) for _, headers in requests]
    answers = handler.handle([row for row, _ in requests], context)
    assert len(answers) == len(requests), "one answer per request, in order"
    results = []
    for index, answer in enumerate(answers):
        status, _ = context.get_response_status(index)
        assert context.get_response_content_type(index) == "application/json"
        results.append((status, json.loads(answer), context.get_response_headers(index)))
    return results


def body_headers(content_type: str = "", **extra: str) -> dict[str, Any]:
    return {"body": {"content-type": content_type}, **extra}


@pytest.fixture(scope="session")
def tiny_vision_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised SmallCNN taken through the real build: export, verify, archive."""
    root = tmp_path_factory.mktemp("tiny_vision")
    checkpoint = root / "checkpoint"
    SmallCNN(in_channels=1, num_classes=4, image_size=16).save_checkpoint(checkpoint)
    config_dir = root / "tiny_vision"
    config_dir.mkdir()
    (config_dir / "setup_config.json").write_text(
        json.dumps(
            {
                "mode": "image_classification",
                "model_name": str(checkpoint),
                "image_size": [16, 16],
                "top_k": 2,
                "max_image_pixels": 1_000_000,
            }
        )
    )
    labels = {"0": "zero", "1": "one", "2": "two", "3": "three"}
    (config_dir / "index_to_name.json").write_text(json.dumps(labels))
    (config_dir / "model-config.yaml").write_text("batchSize: 4\nmaxBatchDelay: 10\n")
    mar_path = build_archive(config_dir, root / "store", force=True)
    assert mar_path is not None
    return mar_path


@pytest.fixture(scope="session")
def vision_handler(tiny_vision_archive: Path, tmp_path_factory: pytest.TempPathFactory):
    from ts_handlers.vision import ImageClassifierHandler

    model_dir = tmp_path_factory.mktemp("tiny_vision_model")
    manifest = unpack_archive(tiny_vision_archive, model_dir)
    handler = ImageClassifierHandler()
    handler.initialize(make_context(model_dir, manifest))
    return handler


@pytest.fixture
def batch(vision_handler) -> Callable[..., list[tuple[int, Any, dict[str, str]]]]:
    return lambda requests: run_batch(vision_handler, requests)
