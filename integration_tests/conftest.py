"""One real TorchServe per test session, on loopback, with token authorization on.

The archives come from ``make archives`` (model_store/); the server loads every one the suite
uses and is always stopped at the end of the session, pass or fail.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from ts_handlers.server import LocalTorchServe

ROOT = Path(__file__).resolve().parent.parent
MODEL_STORE = ROOT / "model_store"
ARCHIVES = ["mnist.mar", "sentiment.mar", "sentiment_eager.mar", "minilm.mar"]
DIGITS_HELDOUT = ROOT / "build/checkpoints/digits/heldout.npz"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing; run `make archives` first")
    return path


@pytest.fixture(scope="session")
def torchserve() -> Iterator[LocalTorchServe]:
    models = [name for name in ARCHIVES if (MODEL_STORE / name).is_file()]
    require(MODEL_STORE / "mnist.mar")
    server = LocalTorchServe(MODEL_STORE, models)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def inference(torchserve: LocalTorchServe) -> requests.Session:
    """A session that carries the inference token, as every real client must."""
    session = requests.Session()
    session.headers.update(torchserve.auth_headers("inference"))
    return session


@pytest.fixture(scope="session")
def heldout_digits() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(require(DIGITS_HELDOUT))
    return data["images"], data["labels"]


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, mode="L")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
