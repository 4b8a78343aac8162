"""Per-stage metrics, recorded through TorchServe's own metrics cache loaded from our metrics.yaml.

Each test drives a handler through a real ``ts.context.Context`` whose ``metrics`` is
TorchServe's ``MetricsCacheYamlImpl`` built from ``ts_handlers/metrics.yaml``, as a worker
builds it, and reads back the ``[METRICS]`` lines the cache logs, parsed with the pattern
TorchServe's frontend parses them with (``Metric.java``): what the frontend would see.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ts
import yaml
from harness import TINY_TEXT_MAX_LENGTH, body_headers, run_batch
from test_image_classification import PNG
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from ts_handlers import metrics as handler_metrics
from ts_handlers.metrics import (
    ANSWERS,
    BATCH_INPUTS,
    BATCH_TOKENS,
    METRICS_CONFIG,
    PRECISION,
    STAGE_SECONDS,
    BatchMetrics,
)

# TorchServe 0.12's frontend, org.pytorch.serve.metrics.Metric.PATTERN, after "[METRICS]".
FRONTEND_PATTERN = re.compile(
    r"\s*([\w\s]+)\.([\w\s]+):([0-9\-,.e]+)\|#([^|]*)(\|#type:([^|,]+))?"
    r"\|#hostname:([^,]+),([^,]+)(,(.*))?"
)
METRICS_PREFIX = "[METRICS]"
OUR_METRICS = {
    STAGE_SECONDS: ("histogram", ["Stage", "ModelName", "Level"]),
    BATCH_INPUTS: ("histogram", ["ModelName", "Level"]),
    BATCH_TOKENS: ("histogram", ["Kind", "ModelName", "Level"]),
    ANSWERS: ("counter", ["Status", "ModelName", "Level"]),
    PRECISION: ("gauge", ["Archive", "Serving", "ModelName", "Level"]),
}


@dataclass
class Line:
    name: str
    unit: str
    value: float
    dimensions: dict[str, str]
    type: str


class MetricLines(logging.Handler):
    """Collects what TorchServe's metrics cache logs: the metric lines, and its errors."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[Line] = []
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            self.errors.append(message)
        elif message.startswith(METRICS_PREFIX):
            match = FRONTEND_PATTERN.fullmatch(message[len(METRICS_PREFIX) :])
            assert match, f"the frontend could not parse {message!r}"
            pairs = [pair.split(":") for pair in match.group(4).split(",")]
            assert all(len(pair) == 2 for pair in pairs), message
            self.lines.append(
                Line(
                    match.group(1),
                    match.group(2),
                    float(match.group(3)),
                    dict(pairs),
                    match.group(6).lower(),
                )
            )

    def named(self, name: str) -> list[Line]:
        return [line for line in self.lines if line.name == name]

    def by(self, name: str, label: str) -> dict[str, float]:
        """One metric's values keyed by one label (each label value sent once per batch)."""
        found = [(line.dimensions[label], line.value) for line in self.named(name)]
        assert len({key for key, _ in found}) == len(found), found
        return dict(found)


def declared() -> dict[str, tuple[str, list[str]]]:
    """metrics.yaml's model_metrics: name -> (type, dimensions)."""
    config = yaml.safe_load(METRICS_CONFIG.read_text(encoding="utf-8"))
    return {
        spec["name"]: (kind, spec["dimensions"])
        for kind, specs in config["model_metrics"].items()
        for spec in specs
    }


@pytest.fixture
def recorded(request: pytest.FixtureRequest) -> Iterator[tuple[Any, MetricLines]]:
    """(handler, lines): the handler's context carries a worker's metrics cache for one test."""
    handler = request.getfixturevalue(request.param)
    if isinstance(handler, dict):  # text_handlers: save_mode -> handler
        handler = handler["torchscript"]
    cache = MetricsCacheYamlImpl(config_file_path=str(METRICS_CONFIG))
    cache.initialize_cache()
    cache.model_name = handler.context.model_name  # what the worker sets at load
    lines = MetricLines()
    loggers = [logging.getLogger(name) for name in ("ts.metrics", handler_metrics.__name__)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(lines)
        logger.setLevel(logging.INFO)
    handler.context.metrics = cache
    try:
        yield handler, lines
    finally:
        handler.context.metrics = None
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(lines)
            logger.setLevel(level)


def send(handler: Any, requests: list[tuple[Any, dict[str, Any]]]) -> list[int]:
    """One batch, with request ids set as TorchServe's service sets them; the statuses."""
    handler.context.metrics.request_ids = {i: f"req-{i}" for i in range(len(requests))}
    return [status for status, _, _ in run_batch(handler, requests)]


# ---- the shipped configuration --------------------------------------------------------------


def test_the_yaml_keeps_torchserve_defaults_and_declares_ours():
    ours = yaml.safe_load(METRICS_CONFIG.read_text(encoding="utf-8"))
    default = Path(ts.__file__).parent / "configs" / "metrics.yaml"
    theirs = yaml.safe_load(default.read_text(encoding="utf-8"))
    assert ours["ts_metrics"] == theirs["ts_metrics"]  # the frontend's metrics, unchanged
    specs = declared()
    for name in ("HandlerTime", "PredictionTime"):
        assert specs[name] == ("gauge", ["ModelName", "Level"])
    for name, spec in OUR_METRICS.items():
        assert specs[name] == spec, name
    # The cache TorchServe's worker builds from it.
    cache = MetricsCacheYamlImpl(config_file_path=str(METRICS_CONFIG))
    cache.initialize_cache()
    assert {key.split(":")[1] for key in cache.cache_keys()} == set(specs)


# ---- what a batch records ---------------------------------------------------------------------


@pytest.mark.parametrize("recorded", ["vision_handler"], indirect=True)
def test_an_image_batch_counts_answers_inputs_and_stage_times(recorded):
    handler, lines = recorded
    good = ({"body": bytearray(PNG)}, body_headers("image/png"))
    not_an_image = ({"body": bytearray(b"GIF89a but not really")}, body_headers("image/gif"))
    empty = ({"body": bytearray()}, body_headers("image/png"))
    statuses = send(handler, [good, not_an_image, good, empty, good])
    assert statuses == [200, 415, 200, 400, 200]

    assert lines.errors == []
    assert lines.by(ANSWERS, "Status") == {"200": 3, "415": 1, "400": 1}
    [inputs] = lines.named(BATCH_INPUTS)
    assert inputs.value == 3
    [precision] = lines.named(PRECISION)  # a float32 archive serves float32
    assert (precision.value, precision.dimensions["Archive"]) == (1, "float32")
    assert precision.dimensions["Serving"] == "float32"
    stages = lines.by(STAGE_SECONDS, "Stage")
    assert set(stages) == {"decode", "forward", "encode"}  # an image task does not tokenize
    assert all(0 < seconds < 60 for seconds in stages.values())
    assert lines.named(BATCH_TOKENS) == []
    [handler_time] = lines.named("HandlerTime")
    assert handler_time.value > 0 and handler_time.unit == "Milliseconds"  # TorchServe's name
    assert {line.unit for line in lines.named(STAGE_SECONDS)} == {"Seconds"}
    # Every line carries the dimensions metrics.yaml declares, in its order (the frontend
    # zips them with its labels by position) and the type it declares.
    specs = declared()
    for line in lines.lines:
        kind, dimensions = specs[line.name]
        assert (line.type, list(line.dimensions)) == (kind, dimensions), line
        assert line.dimensions["ModelName"] == handler.context.model_name
        assert line.dimensions["Level"] == "Model"


@pytest.mark.parametrize("recorded", ["vision_handler"], indirect=True)
def test_a_batch_of_bad_requests_records_no_forward(recorded):
    handler, lines = recorded
    statuses = send(handler, [({"body": bytearray()}, body_headers("image/png"))] * 2)
    assert statuses == [400, 400]
    assert lines.by(ANSWERS, "Status") == {"400": 2}
    assert set(lines.by(STAGE_SECONDS, "Stage")) == {"decode"}
    assert lines.named(BATCH_INPUTS) == []


@pytest.mark.parametrize("recorded", ["text_handlers"], indirect=True)
def test_a_text_batch_counts_tokens_and_tokenize_time(recorded):
    handler, lines = recorded
    texts = ["the movie was great", "tea", "a quiet afternoon with books and rain", "rain"]
    one = ({"body": texts[0]}, body_headers("text/plain"))
    many = ({"body": {"inputs": texts[1:]}}, body_headers("application/json"))
    blank = ({"body": "   "}, body_headers("text/plain"))
    too_long = (
        {"body": {"inputs": "tea " * 100, "truncate": False}},
        body_headers("application/json"),
    )
    statuses = send(handler, [one, blank, many, too_long])
    assert statuses == [200, 400, 200, 413]

    assert lines.errors == []
    assert lines.by(ANSWERS, "Status") == {"200": 2, "400": 1, "413": 1}
    assert [line.value for line in lines.named(BATCH_INPUTS)] == [len(texts)]
    # The texts' own tokens, and the positions the model ran: sorted by length, padded per
    # group of inference_batch_size (3 in this archive) to the group's longest text.
    lengths = sorted(len(handler.tokenizer(text)["input_ids"]) for text in texts)
    assert max(lengths) <= TINY_TEXT_MAX_LENGTH
    groups = [lengths[start : start + 3] for start in range(0, len(lengths), 3)]
    assert lines.by(BATCH_TOKENS, "Kind") == {
        "input": sum(lengths),
        "padded": sum(len(group) * max(group) for group in groups),
    }
    stages = lines.by(STAGE_SECONDS, "Stage")
    assert set(stages) == {"decode", "tokenize", "forward", "encode"}
    assert 0 < stages["tokenize"] <= stages["decode"]  # tokenizing is part of decoding


# ---- metrics never fail a request -------------------------------------------------------------


class BrokenMetrics:
    """A metrics cache that fails on every call."""

    def __init__(self) -> None:
        self.calls = 0

    def add_time(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_metric(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1
        raise RuntimeError("metrics backend is down")


def test_a_failing_metrics_cache_is_logged_once_and_answers_stand(vision_handler, monkeypatch):
    monkeypatch.setattr(handler_metrics, "_reported_failure", False)
    logger = logging.getLogger(handler_metrics.__name__)
    lines = MetricLines()
    logger.addHandler(lines)
    broken = BrokenMetrics()
    vision_handler.context.metrics = broken
    try:
        for _ in range(3):
            statuses = [
                status
                for status, _, _ in run_batch(
                    vision_handler, [({"body": bytearray(PNG)}, body_headers("image/png"))]
                )
            ]
            assert statuses == [200]
    finally:
        vision_handler.context.metrics = None
        logger.removeHandler(lines)
    assert broken.calls == 3
    assert len(lines.errors) == 1 and "metrics" in lines.errors[0]


def test_a_context_without_metrics_records_nothing(vision_handler):
    assert vision_handler.context.metrics is None
    results = run_batch(vision_handler, [({"body": bytearray(PNG)}, body_headers("image/png"))])
    assert [status for status, _, _ in results] == [200]
    assert set(vision_handler.batch.metrics.seconds) == {"decode", "forward", "encode"}
    assert vision_handler.batch.metrics.inputs == 1


def test_a_stage_timer_adds_up_and_counts_a_block_that_raises():
    batch = BatchMetrics()
    with batch.timed("forward"):
        pass
    with pytest.raises(ValueError), batch.timed("forward"):
        raise ValueError("the model failed")
    batch.add_time("decode", 0.25)
    batch.add_time("decode", 0.5)
    assert set(batch.seconds) == {"forward", "decode"}
    assert batch.seconds["decode"] == 0.75
    assert 0 < batch.seconds["forward"] < 1
