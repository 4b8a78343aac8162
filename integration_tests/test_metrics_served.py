"""The handlers' Prometheus metrics on a real TorchServe's ``/metrics``.

A server of this module's own (mnist.mar and sentiment.mar only, so the counts are ours alone)
gets ``GOOD`` good and ``BAD`` bad requests per model, sent concurrently so they meet in
dynamic batches; ``/metrics`` (Prometheus text format, no token) must then show every answer by
status, the inputs and tokens the models ran, a time for every stage, and the frontend's own
request counter.
"""

from __future__ import annotations

import re
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from serving import MODEL_STORE, png_bytes, require

from ts_handlers.metrics import (
    ANSWERS,
    BATCH_INPUTS,
    BATCH_TOKENS,
    STAGE_SECONDS,
)
from ts_handlers.text import TOKENIZER_FILES, load_tokenizer
from ts_handlers.tools.server import LocalTorchServe

pytestmark = pytest.mark.integration

GOOD = 20
BAD = 5
CLIENTS = 8
# The frontend reads the worker's metric lines from its output on a thread of its own: a scrape
# right after the last answer may be a moment early.
SETTLE_S = 15
TEXTS = ["I loved this film", "Awful.", "The staff were friendly and breakfast was delicious."]
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_prometheus(text: str) -> Samples:
    """Prometheus text format 0.0.4 -> {(name, labels): value}."""
    samples: Samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if not line.startswith("#") and match:
            labels = frozenset(LABEL.findall(match.group(2) or ""))
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the series of ``name`` whose labels include ``labels`` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and wanted <= got)


def series(samples: Samples, name: str, label: str, **labels: str) -> set[str]:
    """The values ``label`` takes across the series of ``name`` matching ``labels``."""
    wanted = set(labels.items())
    return {
        dict(got)[label]
        for (n, got), _ in samples.items()
        if n == name and wanted <= got and label in dict(got)
    }


def mnist_requests() -> list[tuple[dict[str, Any], int]]:
    rng = np.random.default_rng(0)
    png = {"Content-Type": "image/png"}
    good = [
        ({"data": png_bytes(rng.integers(0, 255, (28, 28), dtype=np.uint8)), "headers": png}, 200)
        for _ in range(GOOD)
    ]
    bad = [({"data": b"not an image at all", "headers": png}, 415)] * 3
    bad += [({"json": {"image": 7}}, 400)] * (BAD - 3)
    return good + bad


def sentiment_requests() -> list[tuple[dict[str, Any], int]]:
    # Half the good requests send one text, half a list of all three.
    good = [
        ({"data": TEXTS[i % 3].encode(), "headers": {"Content-Type": "text/plain"}}, 200)
        if i % 2
        else ({"json": {"inputs": TEXTS}}, 200)
        for i in range(GOOD)
    ]
    bad = [({"json": {"inputs": []}}, 400)] * 3
    bad += [({"json": {"inputs": "word " * 500, "truncate": False}}, 413)] * (BAD - 3)
    return good + bad


@pytest.fixture(scope="module")
def server() -> Iterator[LocalTorchServe]:
    archives = [require(MODEL_STORE / name).name for name in ("mnist.mar", "sentiment.mar")]
    with LocalTorchServe(MODEL_STORE, archives) as local:
        yield local


def scrape(server: LocalTorchServe) -> Samples:
    # No Authorization header: TorchServe 0.12 checks no token on the metrics API.
    response = requests.get(f"{server.metrics_url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    return parse_prometheus(response.text)


def expected_tokens(tmp_path: Path) -> int:
    """Tokens of the good sentiment texts, by the tokenizer inside the archive."""
    with zipfile.ZipFile(MODEL_STORE / "sentiment.mar") as archive:
        for name in set(TOKENIZER_FILES) & set(archive.namelist()):
            archive.extract(name, tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    per_text = [len(tokenizer(text)["input_ids"]) for text in TEXTS]
    singles = sum(per_text[i % 3] for i in range(GOOD) if i % 2)
    lists = sum(1 for i in range(GOOD) if not i % 2) * sum(per_text)
    return singles + lists


def test_metrics_count_every_answer_by_status_and_time_every_stage(server, tmp_path):
    sent = {"mnist": mnist_requests(), "sentiment": sentiment_requests()}
    jobs = [(model, request) for model, requests_ in sent.items() for request in requests_]
    headers = server.auth_headers("inference")

    def post(job: tuple[str, tuple[dict[str, Any], int]]) -> tuple[int, int]:
        model, (kwargs, expected) = job
        kwargs = {**kwargs, "headers": {**headers, **kwargs.get("headers", {})}}
        response = requests.post(
            f"{server.inference_url}/predictions/{model}", timeout=60, **kwargs
        )
        return response.status_code, expected

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(post, jobs))
    assert [got for got, _ in results] == [expected for _, expected in results]

    answers = {model: {200: GOOD} for model in sent}
    for model, requests_ in sent.items():
        for _, status in requests_[GOOD:]:
            answers[model][status] = answers[model].get(status, 0) + 1
    deadline = time.monotonic() + SETTLE_S
    while True:
        samples = scrape(server)
        counted = {
            model: {
                int(status): value(samples, ANSWERS, ModelName=model, Status=status)
                for status in series(samples, ANSWERS, "Status", ModelName=model)
            }
            for model in sent
        }
        if counted == answers or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert counted == answers

    texts = sum(1 if i % 2 else len(TEXTS) for i in range(GOOD))
    for model, inputs, stages in (
        ("mnist", GOOD, {"decode", "forward", "encode"}),
        ("sentiment", texts, {"decode", "tokenize", "forward", "encode"}),
    ):
        model_labels = {"ModelName": model, "Level": "Model"}
        assert series(samples, f"{STAGE_SECONDS}_count", "Stage", **model_labels) == stages
        batches = value(samples, f"{BATCH_INPUTS}_count", **model_labels)
        assert value(samples, f"{BATCH_INPUTS}_sum", **model_labels) == inputs
        assert 1 <= batches <= inputs
        # Each batch that ran the model observed its forward and encode once.
        for stage in ("forward", "encode"):
            assert value(samples, f"{STAGE_SECONDS}_count", Stage=stage, **model_labels) == batches
        assert value(samples, f"{STAGE_SECONDS}_count", Stage="decode", **model_labels) >= batches
        for stage in stages:
            assert value(samples, f"{STAGE_SECONDS}_sum", Stage=stage, **model_labels) > 0
        assert value(samples, "HandlerTime", **model_labels) > 0
        # The frontend's own counter still counts every request.
        assert value(samples, "ts_inference_requests_total", model_name=model) == len(sent[model])
        assert series(samples, f"{ANSWERS}", "Hostname", **model_labels)  # added by the frontend

    tokens = value(samples, f"{BATCH_TOKENS}_sum", Kind="input", ModelName="sentiment")
    assert tokens == expected_tokens(tmp_path)
    assert value(samples, f"{BATCH_TOKENS}_sum", Kind="padded", ModelName="sentiment") >= tokens
    assert value(samples, f"{BATCH_TOKENS}_count", ModelName="mnist") == 0

    logs = server.log_tail(lines=100_000)
    assert "Failed to update backend metric" not in logs
    assert "[METRICS]Failed" not in logs
