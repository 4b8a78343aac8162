"""Prometheus metrics per stage, recorded through TorchServe's metrics API (``context.metrics``).

For each handled batch the base (and ``text.py`` for tokenizing) measures into a
:class:`BatchMetrics`: the seconds spent in each stage, the inputs and tokens the model ran.
When the batch is answered, :func:`report` hands them, with the answers counted by HTTP
status, to TorchServe's metrics cache. The worker writes each value as a ``[METRICS]`` log line;
the frontend turns the lines into Prometheus series on ``/metrics`` (``metrics_mode=prometheus``)
only for metrics its ``metrics_config`` declares: :data:`METRICS_CONFIG`, the ``metrics.yaml``
shipped in this package, declares them (docs/metrics.md lists them).

Measuring costs a few float additions per batch and reporting a dozen log lines. Neither ever
fails a request: a reporting error is logged once per worker and otherwise ignored.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The metrics_config a TorchServe serving these handlers needs (LocalTorchServe writes it).
METRICS_CONFIG = Path(__file__).with_name("metrics.yaml")

DECODE, TOKENIZE, FORWARD, ENCODE = "decode", "tokenize", "forward", "encode"
STAGES = (DECODE, TOKENIZE, FORWARD, ENCODE)

# Names and label values as metrics.yaml declares them (a test keeps the two in step).
STAGE_SECONDS = "ts_handlers_stage_seconds"
BATCH_INPUTS = "ts_handlers_batch_inputs"
BATCH_TOKENS = "ts_handlers_batch_tokens"
ANSWERS = "ts_handlers_answers_total"
# 1 per batch, labelled with the archive's precision and the one this CPU serves (cpu.py).
PRECISION = "ts_handlers_precision"
INPUT_TOKENS, PADDED_TOKENS = "input", "padded"
# TorchServe's Level for the metrics of a model's requests (what its add_* methods set).
LEVEL = "Model"

_reported_failure = False


class BatchMetrics:
    """What one handled batch measured; the handler starts a new one for every batch."""

    __slots__ = ("inputs", "padded_tokens", "seconds", "tokens")

    def __init__(self) -> None:
        # Only the stages that ran: a batch of bad requests has no forward to observe.
        self.seconds: dict[str, float] = {}
        self.inputs = 0
        self.tokens = 0
        self.padded_tokens = 0

    def timed(self, stage: str) -> StageTimer:
        """``with batch.timed(FORWARD): ...`` adds the block's time to the stage, raise or not."""
        return StageTimer(self, stage)

    def add_time(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


class StageTimer:
    """A context manager cheaper than ``contextlib.contextmanager`` (no generator per use)."""

    __slots__ = ("batch", "stage", "started")

    def __init__(self, batch: BatchMetrics, stage: str) -> None:
        self.batch = batch
        self.stage = stage
        self.started = 0.0

    def __enter__(self) -> StageTimer:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.batch.add_time(self.stage, time.perf_counter() - self.started)


def report(
    context: Any, batch: BatchMetrics, answers: int, precision: dict[str, Any] | None = None
) -> None:
    """Hands the batch's figures and its ``answers`` statuses to ``context.metrics``.

    A context without TorchServe's metrics cache (``add_metric``), as in unit tests, gets
    nothing. Never raises: metrics must not cost a client its answer.
    """
    metrics = getattr(context, "metrics", None)
    if getattr(metrics, "add_metric", None) is None:
        return
    try:
        _report(metrics, context.model_name, batch, _statuses(context, answers), precision)
    except Exception:
        global _reported_failure
        if not _reported_failure:  # once per worker: a broken setup would flood the log
            _reported_failure = True
            logger.exception("recording the handler's metrics failed; they are skipped")


def _statuses(context: Any, answers: int) -> Counter[int]:
    """Answers by the HTTP status the handler set for each (200 when it set none)."""
    return Counter(context.get_response_status(index)[0] for index in range(answers))


def _report(
    metrics: Any,
    model_name: str,
    batch: BatchMetrics,
    statuses: Counter[int],
    precision: dict[str, Any] | None = None,
) -> None:
    # TorchServe's own types, imported here: the worker has loaded them already, and importing
    # this module stays free of TorchServe.
    from ts.metrics.dimension import Dimension
    from ts.metrics.metric_type_enum import MetricTypes

    # Every dimension is passed, ModelName and Level last as metrics.yaml lists them, so the
    # cache adds none of its own (it would add Level "Error" outside a request).
    def dimensions(*named: tuple[str, str]) -> list[Any]:
        pairs = (*named, ("ModelName", model_name), ("Level", LEVEL))
        return [Dimension(name, value) for name, value in pairs]

    histogram, counter = MetricTypes.HISTOGRAM, MetricTypes.COUNTER
    for stage, seconds in batch.seconds.items():
        metrics.add_metric(
            STAGE_SECONDS, round(seconds, 6), "s", None, dimensions(("Stage", stage)), histogram
        )
    if batch.inputs:
        metrics.add_metric(BATCH_INPUTS, batch.inputs, "count", None, dimensions(), histogram)
    if batch.tokens:
        for kind, tokens in ((INPUT_TOKENS, batch.tokens), (PADDED_TOKENS, batch.padded_tokens)):
            metrics.add_metric(
                BATCH_TOKENS, tokens, "count", None, dimensions(("Kind", kind)), histogram
            )
    if precision and batch.inputs:
        labels = (("Archive", precision["archive"]), ("Serving", precision["serving"]))
        metrics.add_metric(PRECISION, 1, "count", None, dimensions(*labels), MetricTypes.GAUGE)
    for status, count in statuses.items():
        metrics.add_metric(
            ANSWERS, count, "count", None, dimensions(("Status", str(status))), counter
        )
