"""One real TorchServe per test session, on loopback, with token authorization on.

The archives come from ``make archives`` (model_store/); the server loads every one the suite
uses and is always stopped at the end of the session, pass or fail.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import requests
from serving import ARCHIVES, DIGITS_HELDOUT, MODEL_STORE, require

from ts_handlers.tools.server import LocalTorchServe


@pytest.fixture(scope="session")
def torchserve() -> Iterator[LocalTorchServe]:
    # The model API is off by default; test_lifecycle.py registers and unregisters on this
    # server, so it is turned on here, limited to archives in the model store.
    server = LocalTorchServe(
        MODEL_STORE,
        [require(MODEL_STORE / name).name for name in ARCHIVES],
        enable_model_api=True,
    )
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
