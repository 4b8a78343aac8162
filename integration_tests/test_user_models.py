"""Models the project never saw, built by the real build and served by a real TorchServe.

One tiny BERT per problem type against ``transformers.pipeline``; a user's scripted CNN (no
eager model) and a user's ``.py`` + ``state_dict`` against the user's own model.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import requests
import torch
from harness import (
    PROBLEM_TYPES,
    RGB_SETUP,
    TINY_TEXT_MAX_LENGTH,
    USER_MODEL_FILE,
    UserCNN,
    save_tiny_classifier,
    write_text_config,
)
from PIL import Image
from torch import nn

from ts_handlers.image_classification import ImageClassificationConfig, image_to_tensor
from ts_handlers.tools.build import build_archive
from ts_handlers.tools.server import LocalTorchServe

TEXTS = [
    "the movie was great",
    "tea",
    "i hated every minute of this awful boring film, and the popcorn was stale too " * 2,
    "What a WONDERFUL surprise!!!",
    "service was slow but the food was really tasty",
    "rain",
]


def user_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return UserCNN().eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every archive of this module in one store; returns what the oracles need."""
    root = tmp_path_factory.mktemp("user_models")
    store = root / "store"
    checkpoints = {}
    for problem in PROBLEM_TYPES:
        checkpoint = save_tiny_classifier(root / f"ckpt_{problem}", "bert", problem)
        config_dir = write_text_config(root / f"text_{problem}", checkpoint)
        (config_dir / "model-config.yaml").write_text("batchSize: 8\nmaxBatchDelay: 50\n")
        build_archive(config_dir, store, force=True)
        checkpoints[problem] = checkpoint

    scripted_dir = root / "user_scripted"
    scripted_dir.mkdir()
    scripted = torch.jit.script(user_cnn(seed=0))
    scripted.save(str(scripted_dir / "my_model.pt"))
    (scripted_dir / "setup_config.json").write_text(
        json.dumps({**RGB_SETUP, "serialized_file": "my_model.pt"})
    )
    build_archive(scripted_dir, store, force=True)

    file_dir = root / "user_file"
    file_dir.mkdir()
    (file_dir / "user_net.py").write_text(USER_MODEL_FILE)
    eager = user_cnn(seed=1)
    torch.save(eager.state_dict(), file_dir / "weights.pth")
    (file_dir / "setup_config.json").write_text(
        json.dumps({**RGB_SETUP, "model_file": "user_net.py", "serialized_file": "weights.pth"})
    )
    build_archive(file_dir, store, force=True)
    return {
        "store": store,
        "checkpoints": checkpoints,
        "vision": {"user_scripted": scripted, "user_file": eager},
    }


@pytest.fixture(scope="module")
def server(built: dict[str, Any]) -> Iterator[LocalTorchServe]:
    archives = sorted(path.name for path in built["store"].glob("*.mar"))
    with LocalTorchServe(built["store"], archives) as local:
        yield local


def post_all(server: LocalTorchServe, model: str, bodies: list[Any], **kwargs: Any) -> list[Any]:
    url = f"{server.inference_url}/predictions/{model}"

    def send(body: Any) -> requests.Response:
        return requests.post(url, data=body, headers=server.auth_headers(), timeout=60, **kwargs)

    with ThreadPoolExecutor(max_workers=6) as pool:
        return list(pool.map(send, bodies))


@pytest.mark.parametrize("problem", list(PROBLEM_TYPES))
def test_each_problem_type_is_served_as_the_pipeline_answers(
    server: LocalTorchServe, built: dict[str, Any], problem: str
) -> None:
    from transformers import pipeline

    oracle = pipeline(
        "text-classification",
        model=str(built["checkpoints"][problem]),
        top_k=None,
        truncation=True,
        max_length=TINY_TEXT_MAX_LENGTH,
    )
    bodies = [text.encode() for text in TEXTS]
    responses = post_all(server, f"text_{problem}", bodies, **{})
    worst = 0.0
    for text, response in zip(TEXTS, responses, strict=True):
        assert response.status_code == 200, response.text
        expected = oracle([text])[0]
        answer = response.json()
        assert [item["label"] for item in answer] == [item["label"] for item in expected]
        for got, want in zip(answer, expected, strict=True):
            worst = max(worst, abs(got["score"] - want["score"]))
    assert worst <= 1e-4
    if problem == "regression":
        assert len(answer) == 1 and answer[0]["label"] == "regression_0"


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("model", ["user_scripted", "user_file"])
def test_the_users_own_vision_model_is_served_as_it_answers(
    server: LocalTorchServe, built: dict[str, Any], model: str
) -> None:
    images = [png(seed) for seed in range(8)]
    responses = post_all(server, model, images)
    config = ImageClassificationConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in RGB_SETUP.items()}
    )
    reference = built["vision"][model]
    for data, response in zip(images, responses, strict=True):
        assert response.status_code == 200, response.text
        tensor = image_to_tensor(Image.open(io.BytesIO(data)), config)
        with torch.no_grad():
            expected = torch.softmax(reference(tensor.unsqueeze(0)), dim=-1)[0]
        answer = response.json()
        assert len(answer) == 5
        for item in answer:
            assert item["score"] == pytest.approx(float(expected[int(item["label"])]), abs=1e-5)
