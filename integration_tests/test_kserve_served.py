"""KServe v1 and v2 bodies on a TorchServe configured the way KServe's TorchServe runtime is.

KServe starts ``torchserve --model-store=... --ts-config=...`` with a ``config.properties``
that registers the archives through ``model_snapshot`` and sends clients'
``/v1/models/<m>:predict`` and ``/v2/models/<m>/infer`` calls to TorchServe's frontend. This
module starts its own server with such a config and no ``service_envelope``: the handlers read
both protocols per request. Concurrent single-instance v1, v2 and plain requests to every demo
archive must reach the handler in shared batches and answer what the plain API answers.
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import requests
from serving import MODEL_STORE, png_bytes, require

from ts_handlers.tools.server import LocalTorchServe

MODELS = ["mnist", "sentiment", "minilm", "ner"]
BATCH_SIZE = 8
MAX_BATCH_DELAY_MS = 100
INSTANCES = 6  # per model and request form: 18 requests a model
TOLERANCE = 1e-5
TEXTS = [
    "The service was quick and the food was wonderful.",
    "I will never stay at this hotel again.",
    "Angela Merkel met Emmanuel Macron in Paris on Tuesday.",
    "tea",
    "The package from Amazon arrived in Seattle two days late, and the box was crushed.",
    "Barack Obama was born in Hawaii.",
]


def kserve_properties() -> dict[str, Any]:
    """What KServe's TorchServe runtime writes into config.properties (addresses aside)."""
    snapshot = {
        "name": "startup.cfg",
        "modelCount": len(MODELS),
        "models": {
            name: {
                "1.0": {
                    "defaultVersion": True,
                    "marName": f"{name}.mar",
                    "minWorkers": 1,
                    "maxWorkers": 1,
                    "batchSize": BATCH_SIZE,
                    "maxBatchDelay": MAX_BATCH_DELAY_MS,
                    "responseTimeout": 120,
                }
            }
            for name in MODELS
        },
    }
    return {
        "enable_envvars_config": "true",
        "install_py_dep_per_model": "false",
        "number_of_netty_threads": 4,
        "job_queue_size": 10,
        # TorchServe's default, which KServe's config leaves: the worker parses JSON bodies.
        "decode_input_request": "true",
        # The Open Inference Protocol's health routes (/v2/health/ready); infer works without.
        "ts_open_inference_protocol": "true",
        "model_snapshot": json.dumps(snapshot),
    }


@pytest.fixture(scope="module")
def server() -> Iterator[LocalTorchServe]:
    for name in MODELS:
        require(MODEL_STORE / f"{name}.mar")
    # No models on the command line: the snapshot registers them, as in KServe.
    server = LocalTorchServe(MODEL_STORE, [], extra_properties=kserve_properties())
    server.start()
    try:
        wait_until_ready(server, MODELS)
        yield server
    finally:
        server.stop()


def wait_until_ready(server: LocalTorchServe, names: list[str], timeout: float = 180) -> None:
    client = server.client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all(client.ready_workers(name) > 0 for name in names):
                return
        except Exception:  # not registered yet
            pass
        time.sleep(0.5)
    pytest.fail(f"the snapshot's models were not ready within {timeout:.0f} s\n{server.log_tail()}")


@pytest.fixture(scope="module")
def session(server: LocalTorchServe) -> requests.Session:
    session = requests.Session()
    session.headers.update(server.auth_headers("inference"))
    return session


# ---- the same instances in the three forms ---------------------------------------------------


def instances(name: str, digits: np.ndarray) -> list[Any]:
    if name == "mnist":
        return [png_bytes(image) for image in digits[:INSTANCES]]
    return TEXTS[:INSTANCES]


def plain_request(name: str, instance: Any) -> dict[str, Any]:
    if isinstance(instance, bytes):
        return {"data": instance, "headers": {"Content-Type": "image/png"}}
    return {"json": {"inputs": instance}}


def kserve_value(instance: Any) -> str:
    return base64.b64encode(instance).decode() if isinstance(instance, bytes) else instance


def v1_request(instance: Any) -> dict[str, Any]:
    return {"json": {"instances": [kserve_value(instance)]}}


def v2_request(instance: Any, request_id: str) -> dict[str, Any]:
    tensor = {
        "name": "input-0",
        "shape": [1],
        "datatype": "BYTES",
        "data": [kserve_value(instance)],
    }
    return {"json": {"id": request_id, "inputs": [tensor]}}


# ---- what each answer says, in the plain API's terms ------------------------------------------


def from_v1(name: str, body: dict[str, Any]) -> Any:
    [prediction] = body["predictions"]
    return [prediction] if name == "minilm" else prediction  # plain minilm: a list of vectors


def from_v2(name: str, body: dict[str, Any]) -> Any:
    tensors = {tensor["name"]: tensor for tensor in body["outputs"]}
    if name == "minilm":
        tensor = tensors["embeddings"]
        assert tensor["datatype"] == "FP32" and tensor["shape"][0] == 1
        return np.asarray(tensor["data"]).reshape(tensor["shape"]).tolist()
    if name == "ner":
        assert tensors["entities"]["datatype"] == "BYTES"
        return json.loads(tensors["entities"]["data"][0])
    scores, labels = tensors["scores"], tensors["labels"]
    assert scores["datatype"] == "FP32" and scores["shape"] == labels["shape"]
    return [
        {"label": label, "score": score}
        for label, score in zip(labels["data"], scores["data"], strict=True)
    ]


def difference(name: str, actual: Any, expected: Any) -> float:
    """The largest score (or embedding) difference; everything else must be equal."""
    if name == "minilm":
        return float(np.abs(np.asarray(actual) - np.asarray(expected)).max())
    assert [{k: v for k, v in e.items() if k != "score"} for e in actual] == [
        {k: v for k, v in e.items() if k != "score"} for e in expected
    ]
    scores = [(a["score"], e["score"]) for a, e in zip(actual, expected, strict=True)]
    return max((abs(a - e) for a, e in scores), default=0.0)


@pytest.mark.parametrize("name", MODELS)
def test_concurrent_v1_v2_and_plain_requests_are_batched_and_agree(
    server, session, heldout_digits, name
):
    items = instances(name, heldout_digits[0])
    jobs = [("plain", i, plain_request(name, item)) for i, item in enumerate(items)]
    jobs += [("v1", i, v1_request(item)) for i, item in enumerate(items)]
    jobs += [("v2", i, v2_request(item, f"{name}-{i}")) for i, item in enumerate(items)]
    random.Random(0).shuffle(jobs)  # the forms interleave, so batches mix them
    url = {
        "plain": f"{server.inference_url}/predictions/{name}",
        "v1": f"{server.inference_url}/v1/models/{name}:predict",
        "v2": f"{server.inference_url}/v2/models/{name}/infer",
    }

    def send(job: tuple[str, int, dict[str, Any]]) -> requests.Response:
        return session.post(url[job[0]], timeout=120, **job[2])

    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(send, jobs))
    failed = [
        (job[0], response.status_code, response.text[:200])
        for job, response in zip(jobs, responses, strict=True)
        if not response.ok
    ]
    assert not failed, failed

    answers: dict[str, dict[int, Any]] = {"plain": {}, "v1": {}, "v2": {}}
    batch_sizes: dict[str, list[int]] = {"plain": [], "v1": [], "v2": []}
    for (form, index, _), response in zip(jobs, responses, strict=True):
        body = response.json()
        batch_sizes[form].append(int(response.headers["X-Batch-Size"]))
        if form == "v2":
            assert body["model_name"] == name and body["id"] == f"{name}-{index}"
            answers[form][index] = from_v2(name, body)
        elif form == "v1":
            answers[form][index] = from_v1(name, body)
        else:
            answers[form][index] = body
    differences = [
        difference(name, answers[form][index], answers["plain"][index])
        for form in ("v1", "v2")
        for index in range(len(items))
    ]
    kserve_batches = batch_sizes["v1"] + batch_sizes["v2"]
    print(
        f"{name}: batch sizes of v1/v2 requests {sorted(kserve_batches)}, of plain ones "
        f"{sorted(batch_sizes['plain'])}; max difference from the plain API "
        f"{max(differences):.2e}"
    )
    assert max(kserve_batches) > 1, "KServe requests must share dynamic batches"
    assert max(kserve_batches) <= BATCH_SIZE
    assert max(differences) <= TOLERANCE


def test_a_bad_v2_body_gets_its_own_400_while_its_batch_answers(server, session):
    url = f"{server.inference_url}/v2/models/sentiment/infer"
    good = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["great"]}]}
    bad = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["great"]}]}
    bodies = [bad if index % 4 == 0 else good for index in range(12)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(lambda body: session.post(url, json=body, timeout=60), bodies))
    for body, response in zip(bodies, responses, strict=True):
        if body is bad:
            assert response.status_code == 400
            assert response.json() == {
                "error": "inputs[0].shape [2] holds 2 elements but inputs[0].data has 1"
            }
        else:
            assert response.status_code == 200, response.text
    assert max(int(response.headers["X-Batch-Size"]) for response in responses) > 1
    ready = session.get(f"{server.inference_url}/v2/health/ready", timeout=10)
    assert ready.status_code == 200 and ready.json() == {"ready": True}
