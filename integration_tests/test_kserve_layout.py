"""The config.properties ``ts-handlers kserve`` writes, on a real TorchServe 0.12.

TorchServe starts as KServe's runtime starts it (``--ts-config`` the config, ``--model-store``
the written store), from the file as written; only what must differ off a cluster is changed,
in a copy of the file: free loopback ports instead of 8085/8082/7070/7071, and the folder's real
paths instead of /mnt/models. The layout sets ``enable_envvars_config=false``, so the ``TS_*``
variables in the server's environment here are ignored (one of them would turn token
authorization on and another move the API). The model loads from ``model_snapshot`` with its
archive's batch settings, answers without a token (the layout's choice, docs/kserve.md), and
/metrics answers in Prometheus form.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
import requests
from serving import DIGITS_HELDOUT, MODEL_STORE, png_bytes, require

from ts_handlers.tools import kserve
from ts_handlers.tools.server import free_port, properties_text

pytestmark = pytest.mark.integration

START_TIMEOUT = 180  # seconds
STOP_GRACE = 20


@pytest.fixture(scope="module")
def served_layout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    work = tmp_path_factory.mktemp("kserve")
    layout = kserve.write_layout(work / "out", [require(MODEL_STORE / "mnist.mar")])
    ports = {name: free_port() for name in ("inference", "metrics", "grpc_i", "grpc_m")}
    inference = f"http://127.0.0.1:{ports['inference']}"
    metrics = f"http://127.0.0.1:{ports['metrics']}"
    (work / "tmp").mkdir()
    local = {
        "inference_address": inference,
        "management_address": inference,
        "metrics_address": metrics,
        "grpc_inference_port": ports["grpc_i"],
        "grpc_management_port": ports["grpc_m"],
        "model_store": layout.model_store,
        "metrics_config": layout.metrics_config,
    }
    written = dict(
        line.split("=", 1) for line in layout.config.read_text(encoding="ascii").splitlines()
    )
    assert written["enable_envvars_config"] == "false"
    config = work / "local.properties"
    config.write_text(
        "".join(f"{key}={value}\n" for key, value in written.items() if key not in local)
        + properties_text(local),
        encoding="ascii",
    )
    env = {
        **os.environ,
        # Ignored: the layout's config does not read TS_* variables.
        "TS_DISABLE_TOKEN_AUTHORIZATION": "false",
        "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{free_port()}",
        "LOG_LOCATION": str(work / "logs"),
        "METRICS_LOCATION": str(work / "logs"),
        "TMPDIR": str(work / "tmp"),
    }
    command = [sys.executable, "-c", "from ts.model_server import start; start()", "--start"]
    command += ["--foreground", "--ncs", "--ts-config", str(config)]
    command += ["--model-store", str(layout.model_store)]
    with open(work / "torchserve.out", "wb") as log:
        process = subprocess.Popen(
            command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _ready(inference, "mnist"):
            assert process.poll() is None, (work / "torchserve.out").read_text()[-4000:]
            assert time.monotonic() < deadline, "TorchServe was not ready in time"
            time.sleep(0.5)
        yield {"inference": inference, "metrics": metrics, "workdir": work, "layout": layout}
    finally:
        for sig, grace in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace)


def _ready(url: str, model: str) -> bool:
    try:
        described = requests.get(f"{url}/models/{model}", timeout=2)
    except requests.RequestException:
        return False
    if described.status_code != 200:
        return False
    return any(worker.get("status") == "READY" for worker in described.json()[0]["workers"])


def test_snapshot_loads_the_model_with_its_archives_settings(served_layout: dict) -> None:
    described = requests.get(f"{served_layout['inference']}/models/mnist", timeout=10).json()[0]
    (archive,) = served_layout["layout"].archives
    for key in ("batchSize", "maxBatchDelay", "responseTimeout", "minWorkers", "maxWorkers"):
        assert described[key] == archive.workers[key], key
    assert described["modelUrl"] == "mnist.mar"
    # Token authorization is off: TorchServe wrote no key file.
    assert not (served_layout["workdir"] / "key_file.json").exists()


def test_requests_without_a_token_are_answered(served_layout: dict) -> None:
    data = np.load(require(DIGITS_HELDOUT))
    image, label = data["images"][0], str(data["labels"][0])
    url = f"{served_layout['inference']}/predictions/mnist"

    plain = requests.post(url, data=png_bytes(image), timeout=60)
    assert plain.status_code == 200, plain.text
    assert plain.json()[0]["label"] == label

    # The body KServe's v1 protocol carries, forwarded unchanged: no service envelope.
    v1 = requests.post(
        url, json={"instances": [{"b64": base64.b64encode(png_bytes(image)).decode()}]}, timeout=60
    )
    assert v1.status_code == 200, v1.text
    assert v1.json()["predictions"][0][0]["label"] == label


def test_metrics_answer_in_prometheus_form(served_layout: dict) -> None:
    requests.post(
        f"{served_layout['inference']}/predictions/mnist",
        data=png_bytes(np.zeros((8, 8), dtype=np.uint8)),
        timeout=60,
    )
    metrics = requests.get(f"{served_layout['metrics']}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert "# TYPE ts_inference_requests_total counter" in metrics.text
    assert 'ts_handlers_stage_seconds_bucket{Stage="decode",ModelName="mnist"' in metrics.text
