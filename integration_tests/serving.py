"""Shared by the integration tests: where the archives live, and small request helpers.

Kept out of conftest.py so test modules import it by a name no other test folder uses.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MODEL_STORE = ROOT / "model_store"
ARCHIVES = [
    "mnist.mar",
    "sentiment.mar",
    "sentiment_eager.mar",
    "minilm.mar",
    "ner.mar",
    "minilm_bf16.mar",
    "minilm_int8.mar",
    "mnist_aoti.mar",
    "sentiment_aoti.mar",
    "minilm_aoti.mar",
    "ner_aoti.mar",
    "mnist_onnx.mar",
    "sentiment_onnx.mar",
    "minilm_onnx.mar",
    "ner_onnx.mar",
]
DIGITS_HELDOUT = ROOT / "build/checkpoints/digits/heldout.npz"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing; run `make archives` first")
    return path


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, mode="L")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def described(server: Any, model: str) -> dict[str, Any]:
    """The handler's describe answer (config, labels, export, precision), from
    ``GET /models/<model>?customized=true`` on a LocalTorchServe."""
    response = requests.get(
        f"{server.management_url}/models/{model}?customized=true",
        headers=server.auth_headers("management"),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    metadata = response.json()[0]["customizedMetadata"]
    return json.loads(metadata) if isinstance(metadata, str) else metadata
