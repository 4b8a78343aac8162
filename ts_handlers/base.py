"""The shared core every task handler stands on.

TorchServe calls ``initialize(context)`` once per worker and ``handle(data, context)`` once per
dynamic batch. :class:`TaskHandler` owns everything that is the same for every task: reading the
typed config, choosing the device, loading the exported model, decoding each request with its
own error handling, running one batched forward under ``torch.inference_mode()``, and giving
every request its own status and JSON body. A task subclass only says what is specific to it:

* ``decode(request)`` -> :class:`Decoded` (the model inputs this request contributes)
* ``forward(inputs)`` -> one output per input, in order
* ``encode(outputs, decoded)`` -> the JSON-able answer for one request

``handle`` returns exactly one answer per request, in order.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import orjson
import torch
from pydantic import ValidationError

from ts_handlers import worker_protocol
from ts_handlers.config import (
    SETUP_CONFIG_FILE,
    HandlerConfig,
    RequestOptions,
    explain,
    load_config,
)
from ts_handlers.cpu import serving_precision
from ts_handlers.errors import (
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    RequestError,
    TooManyRequests,
    error_body,
)
from ts_handlers.export import load_artifact
from ts_handlers.labels import LABELS_FILE, read_labels
from ts_handlers.metrics import DECODE, ENCODE, FORWARD, BatchMetrics, report
from ts_handlers.openai_api import EMBEDDINGS_PATH, OpenAIEmbeddings, is_openai_body
from ts_handlers.payload import Request
from ts_handlers.protocols import KServeRequest, OutputTensor, json_per_input, recognise
from ts_handlers.protocols import error_body as kserve_error_body

logger = logging.getLogger(__name__)

ConfigT = TypeVar("ConfigT", bound=HandlerConfig)

JSON_CONTENT_TYPE = "application/json"
BATCH_SIZE_HEADER = "X-Batch-Size"
# The Retry-After of an explanation deferred because its batch's budget was taken: the worker
# takes the next batch as soon as this one is answered, and the request has waited through this.
EXPLANATION_RETRY_AFTER_S = 1
# Likewise for a prediction past its batch's token budget: the next batch takes it.
PREDICTION_RETRY_AFTER_S = 1
# Instances one KServe request may carry for a task that sets no limit of its own (the
# built-in tasks take max_texts_per_request / max_images_per_request).
MAX_KSERVE_INSTANCES = 1024
# Config keys naming files on the build machine: never part of a describe answer.
PRIVATE_CONFIG_KEYS = ("model_name", "serialized_file", "model_file")
# An absolute POSIX, home-relative, Windows or file:// path inside a string.
_PATH = re.compile(r"""(?:(?<![\w.:/])/|~/|\b[A-Za-z]:\\|file://)[^\s'"]*""")


@dataclass
class Decoded:
    """What one request contributes to the batch, and how to shape its answer."""

    inputs: list[Any]
    # The request's options, an instance of the task's ``options_class``.
    options: Any = field(default_factory=RequestOptions)
    # True when the client sent one input rather than a list: answer with one item, unwrapped.
    single: bool = True
    # The wire protocol the request came in (a KServe protocol, protocols.py, or OpenAI's
    # embeddings API, openai_api.py), which wraps its answer; None: the task's own forms.
    protocol: KServeRequest | OpenAIEmbeddings | None = None
    # Set for a request answered without the model (a tokenize request): produces its answer.
    answer: Callable[[], Any] | None = None


class TaskHandler(Generic[ConfigT]):
    """TorchServe's handler contract (``initialize``, ``handle``) on our own base.

    Not TorchServe's ``BaseHandler``: nothing of it is used, and importing it has side effects
    (optional-backend warnings, TF32 matmul switched on for CUDA).
    """

    config_class: ClassVar[type[HandlerConfig]] = HandlerConfig
    # The per-request options the task accepts, declared once (see config.RequestOptions).
    options_class: ClassVar[type[RequestOptions]] = RequestOptions
    # KServe instances (v1 instances, v2 BYTES elements) are base64 of binary data (an image
    # file) when True, text as sent when False (protocols.py).
    kserve_binary: ClassVar[bool] = False
    # True for a task that answers OpenAI's embeddings API (openai_api.py).
    openai_embeddings: ClassVar[bool] = False

    def __init__(self) -> None:
        self.initialized = False
        self.context: Any = None
        self.config: ConfigT
        self.model_dir: Path
        self.model: Callable[..., Any] | None = None
        self.export_metadata: dict[str, Any] = {}
        # Which precision runs here, and why (cpu.serving_precision): describe and metrics say.
        self.precision: dict[str, Any] = serving_precision(None)
        self.labels: list[str] | None = None
        # Explanation scheduling (see _explain): until when batches holding predictions run no
        # explanations, on this clock.
        self._clock: Callable[[], float] = time.monotonic
        self._predictions_first_until = 0.0
        # The wire protocol (KServe v1/v2, OpenAI) of each request of the batch being handled, by
        # index: its errors are written in that protocol's error body.
        self._wire: dict[int, KServeRequest | OpenAIEmbeddings] = {}
        # The current batch's stage times and sizes (ts_handlers/metrics.py).
        self.batch_metrics = BatchMetrics()

    # ---- lifecycle -------------------------------------------------------------------------

    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        self.context = context
        self.manifest = context.manifest
        self.model_dir = Path(properties["model_dir"])
        self.config = load_config(self.config_class, self.model_dir / SETUP_CONFIG_FILE)
        self.device = self.choose_device(properties.get("gpu_id"))
        self.model = self.load_model()
        self.labels = self.load_labels()
        self.setup()
        self.initialized = True
        logger.info(
            "%s ready: mode=%s save_mode=%s device=%s",
            type(self).__name__,
            self.config.mode,
            self.config.save_mode,
            self.device,
        )

    @staticmethod
    def choose_device(gpu_id: int | None) -> torch.device:
        if gpu_id is not None and torch.cuda.is_available():
            return torch.device(f"cuda:{gpu_id}")
        return torch.device("cpu")

    def load_model(self) -> Callable[..., Any]:
        """Loads the exported model named by the archive's manifest."""
        serialized = (self.manifest or {}).get("model", {}).get("serializedFile")
        if not serialized:
            raise RuntimeError(
                f"{self.config.save_mode!r} archive has no serialized model; "
                f"{type(self).__name__} serves exported models only"
            )
        model, self.export_metadata = load_artifact(
            self.model_dir, serialized, self.device, self.config
        )
        self.precision = serving_precision(self.export_metadata.get("precision"))
        if self.precision["serving"] != self.precision["archive"]:
            fallback = self.export_metadata["precision"]["float32_file"]
            model, _ = load_artifact(self.model_dir, fallback, self.device, self.config)
        if self.precision["archive"] != "float32":
            logger.info(
                "serving %s (archive: %s): %s",
                self.precision["serving"],
                self.precision["archive"],
                self.precision["reason"],
            )
        return model

    def load_labels(self) -> list[str] | None:
        """Labels from ``index_to_name.json``, checked against the model's class count here, at
        load, so an archive built elsewhere with a wrong file fails to load, not per request."""
        return read_labels(self.model_dir / LABELS_FILE, self.num_classes())

    def num_classes(self) -> int | None:
        """Classes the model outputs, as its export recorded them (None: not a classifier)."""
        return self.export_metadata.get("num_classes")

    def setup(self) -> None:
        """Task-specific loading (a tokenizer, say); runs once after the model is loaded."""

    # ---- task hooks ------------------------------------------------------------------------

    def decode(self, request: Request) -> Decoded:
        raise NotImplementedError

    def forward(self, inputs: list[Any]) -> Sequence[Any]:
        raise NotImplementedError

    def encode(self, outputs: list[Any], decoded: Decoded) -> Any:
        raise NotImplementedError

    def decode_instances(self, values: list[str | bytes], options: Any, field: str) -> Decoded:
        """A KServe request's instances (v1 ``instances``, the v2 tensor's elements) as model
        inputs: ``str`` for text as sent, ``bytes`` for base64-sent data. ``field`` names them
        in error messages (``instances``, ``inputs[0].data``). The answer is a list, one per
        instance."""
        raise InvalidInput(
            f"{type(self).__name__} does not take KServe v1/v2 bodies; send its own request form"
        )

    def check_instance_count(self, count: int) -> None:
        """Refuses a KServe request of ``count`` instances (v1 ``instances``, the elements
        its v2 shape declares) with a 413, before any of them is validated or decoded. A task
        with its own per-request limit overrides this."""
        if count > MAX_KSERVE_INSTANCES:
            raise PayloadTooLarge(
                f"{count} instances in one request; the limit is {MAX_KSERVE_INSTANCES} "
                "(base.MAX_KSERVE_INSTANCES)"
            )

    def kserve_outputs(self, outputs: list[Any], decoded: Decoded) -> list[OutputTensor]:
        """This request's answers as Open Inference Protocol output tensors. Default: BYTES
        ``[n]``, each instance's answer as JSON; a task with numbers to give overrides it."""
        return [json_per_input("output-0", self.encode(outputs, decoded))]

    def describe(self) -> dict[str, Any]:
        """The answer to ``GET /models/<name>?customized=true``: labels, config, export figures.

        TorchServe gives a worker no describe signal a client cannot forge (see ``handle``), so
        this holds nothing a client must not see: build-machine paths are left out or masked.
        """
        config = self.config.to_dict()
        for key in PRIVATE_CONFIG_KEYS:
            config.pop(key, None)
        return {
            "handler": type(self).__name__,
            "config": without_paths(config),
            "labels": self.labels,
            "export": without_paths(self.export_metadata),
            "precision": self.precision,
        }

    def route(self, path: str, request: Request) -> Decoded:
        """A request sent to ``/predictions/<model>/<version>/<path>`` (TorchServe hands the
        path over as the ``url_path`` header); a task with routes of its own overrides this."""
        raise NotFound(
            f"this model serves no route {path!r}; post to /predictions/<model> "
            f"(or .../{EMBEDDINGS_PATH} for a model that embeds text)"
        )

    def response_headers(self, decoded: Decoded) -> dict[str, str]:
        """Headers of one answered prediction (a text task's token count, say)."""
        return {}

    def explain_inputs(self, inputs: list[Any], decoded: Decoded) -> Any:
        raise InvalidInput(f"{type(self).__name__} does not provide explanations for this model")

    def explanation_cost(self, decoded: Decoded) -> int:
        """The work one explanation request would cost, in the units of
        ``explanation_budget``; checked when the request is decoded, before any work runs, so
        a request over a per-request limit raises its 4xx here."""
        return 0

    def explanation_budget(self) -> tuple[int, str] | None:
        """(work one handled batch may spend on explanations, the config key that sets it);
        None: no bound."""
        return None

    # ---- TorchServe entry point ------------------------------------------------------------

    def read_options(self, request: Request, json_body: Any = None) -> Any:
        """The request's options, typed by ``options_class``, with the archive's defaults."""
        names = self.options_class.names()
        raw = {name: request.option(name, json_body) for name in names}
        raw = {name: value for name, value in raw.items() if value is not None}
        try:
            options = self.options_class.model_validate(raw)
        except ValidationError as error:
            raise InvalidInput(explain(error, names)) from None
        return self.with_defaults(options)

    def with_defaults(self, options: Any) -> Any:
        """Fills the options the request left out from the archive's config."""
        return options

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        started = time.perf_counter()
        self.batch_metrics = BatchMetrics()
        answers = self._handle(data, context)
        # What TorchServe's BaseHandler records; PredictionTime is recorded by TorchServe itself.
        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
            metrics.add_time("HandlerTime", elapsed_ms, None, "ms")
        report(context, self.batch_metrics, len(answers), self.precision)
        return answers

    def _handle(self, data: list[Any], context: Any) -> list[Any]:
        self.context = context
        self._wire = {}
        answers: list[Any] = [None] * len(data)
        decoded: dict[int, Decoded] = {}
        explain: dict[int, tuple[Decoded, int]] = {}
        decode_started = time.perf_counter()
        for index, row in enumerate(data):
            if (
                len(data) == 1
                and not row
                and context.get_request_header(index, "describe") == "True"
            ):
                # GET /models/<name>?customized=true reaches the worker as a batch of one
                # request with no body and the header describe=True. A client can send that
                # header to /predictions too, so a request that carries a body is always a
                # prediction, and describe() holds nothing secret (docs/security.md).
                answers[index] = self._answer(context, index, self.describe)
                continue
            try:
                request = Request.from_row(
                    row, self._content_type(context, index), context.get_all_request_header(index)
                )
                item = self._decode(index, request)
                if item.answer is not None:  # answered without the model
                    answers[index] = self._answer(context, index, item.answer)
                    continue
                if not item.inputs:
                    raise InvalidInput("the request contains no inputs")
                if self._wants_explanation(context, index):
                    explain[index] = (item, self.explanation_cost(item))
                else:
                    decoded[index] = item
            except RequestError as error:
                # One line, no payload and no message (it may quote the client's text).
                logger.info(
                    "request %d rejected: %d %s", index, int(error.status), error.error_type
                )
                answers[index] = self._reject(context, index, error)
            except Exception:  # an unexpected decode failure must not take the batch down
                logger.exception("decoding request %d failed", index)
                answers[index] = self._internal_error(context, index)
        self.batch_metrics.add_time(DECODE, time.perf_counter() - decode_started)

        self._explain(context, explain, answers, bool(decoded))
        self._defer_past_budget(context, decoded, answers)
        if decoded:
            self._predict(context, decoded, answers)

        batch_size = sum(len(item.inputs) for item in decoded.values())
        for index in range(len(data)):
            context.set_response_header(index, BATCH_SIZE_HEADER, str(batch_size))
        for index, item in decoded.items():
            for name, value in self.response_headers(item).items():
                context.set_response_header(index, name, value)
        return answers

    # ---- internals -------------------------------------------------------------------------

    def _decode(self, index: int, request: Request) -> Decoded:
        """A request sent to a route (``url_path``) through that route; a KServe v1/v2 body
        through its protocol (protocols.py), an OpenAI embeddings body through openai_api.py,
        any other through ``decode``.

        A JSON object or list is parsed here once and handed on parsed, as TorchServe hands on
        a body it decoded itself.
        """
        path = str(request.headers.get("url_path") or "").strip("/")
        if path == EMBEDDINGS_PATH:
            # Recognised by its route before the body is read: every error is OpenAI's shape.
            wire = self._wire[index] = OpenAIEmbeddings()
            return wire.decode(self, request)
        if path:
            return self.route(path, request)
        payload = None
        if request.looks_like_json() and _opens_json_container(request.body):
            if isinstance(request.body, dict):  # TorchServe parsed it: recognised before checks
                self._remember_kserve_protocol(index, request.body)
            try:
                payload = request.json()
            except InvalidInput:  # refused while parsing: a KServe body still gets its own body
                self._remember_kserve_protocol(index, request.json_structure())
                raise
            kserve = recognise(payload)
            if kserve is not None:
                self._wire[index] = kserve  # from here on its errors are in its own body
                return kserve.decode(self, request)
            if self.openai_embeddings and is_openai_body(payload):
                wire = self._wire[index] = OpenAIEmbeddings(payload)
                return wire.decode(self, request)
        if isinstance(payload, dict | list) and not isinstance(request.body, dict | list):
            request = replace(request, body=payload)
        return self.decode(request)

    def _remember_kserve_protocol(self, index: int, payload: Any) -> None:
        """Notes the KServe protocol of a parsed body (TorchServe's, or the structure of one
        refused while parsing) before any check runs on it, so that a check's error is written
        in that protocol's error body."""
        kserve = recognise(payload)
        if kserve is not None:
            self._wire[index] = kserve

    def _encode(self, outputs: list[Any], item: Decoded) -> Any:
        """The task's answer, wrapped in the request's KServe protocol when it came in one."""
        if item.protocol is None:
            return self.encode(outputs, item)
        return item.protocol.answer(self, outputs, item)

    def _explanation(self, item: Decoded) -> Any:
        if item.protocol is None:
            return self.explain_inputs(item.inputs, item)
        return item.protocol.explanation(self, item)

    def _predict(self, context: Any, decoded: dict[int, Decoded], answers: list[Any]) -> None:
        flat = [value for item in decoded.values() for value in item.inputs]
        try:
            outputs = self._run_forward(flat)
        except Exception:
            # Isolate the culprit: run each request alone so its neighbours still get answers.
            logger.exception(
                "batched forward failed; retrying %d requests one by one", len(decoded)
            )
            for index, item in decoded.items():
                answers[index] = self._answer(
                    context,
                    index,
                    lambda item=item: self._encode(self._run_forward(item.inputs), item),
                )
            return
        offset = 0
        encode_started = time.perf_counter()
        for index, item in decoded.items():
            chunk = list(outputs[offset : offset + len(item.inputs)])
            offset += len(item.inputs)
            answers[index] = self._answer(
                context, index, lambda c=chunk, i=item: self._encode(c, i)
            )
        self.batch_metrics.add_time(ENCODE, time.perf_counter() - encode_started)

    def _explain(
        self,
        context: Any,
        explain: dict[int, tuple[Decoded, int]],
        answers: list[Any],
        predictions: bool,
    ) -> None:
        """Runs the explanations that fit this batch's budget; the rest get 429 + Retry-After.

        TorchServe sends a batch's answers together when ``handle`` returns, and the worker takes
        no new batch before that, so explanation work delays every prediction in its batch and
        every request queued behind it. Two rules bound that:

        * a batch spends at most ``explanation_budget`` on explanations (the requests, in batch
          order, that fit), so a prediction waits behind at most one budget of work;
        * after explanation work that took T seconds, batches that hold predictions run no
          explanations for the next T seconds, so while both wait, predictions get at least
          half of the worker's time, and explanations the rest (all of it when no prediction
          comes).
        """
        if not explain:
            return
        limit = self.explanation_budget()
        budget = None if limit is None else limit[0]
        started = self._clock()
        yield_to_predictions = (
            limit is not None and predictions and started < self._predictions_first_until
        )
        if yield_to_predictions:
            budget = 0
        spent, deferred, ran = 0, [], False
        for index, (item, cost) in explain.items():
            if budget is not None and spent + cost > budget:
                deferred.append(index)
                continue
            spent += cost
            ran = True
            answers[index] = self._answer(context, index, lambda item=item: self._explanation(item))
        if ran:
            finished = self._clock()
            self._predictions_first_until = finished + (finished - started)
        if not deferred:
            return
        assert limit is not None
        if yield_to_predictions:
            retry_after = max(
                EXPLANATION_RETRY_AFTER_S, math.ceil(self._predictions_first_until - started)
            )
            reason = (
                "predictions go first: after explanation work, batches that hold predictions "
                "run none for as long as it took"
            )
        else:
            retry_after = EXPLANATION_RETRY_AFTER_S
            reason = "earlier explanation requests in this batch took its share"
        error = TooManyRequests(
            f"explanation work per batch is limited to {limit[0]} ({limit[1]}) and {reason}; "
            f"retry after {retry_after} s",
            retry_after,
        )
        logger.info("%d explanation requests deferred: 429", len(deferred))
        for index in deferred:
            answers[index] = self._reject(context, index, error)

    def prediction_cost(self, decoded: Decoded) -> int:
        """The work one prediction request brings, in the units of ``prediction_budget``."""
        return 0

    def prediction_budget(self) -> tuple[int, str] | None:
        """(work one handled batch may spend on predictions, the config key that sets it);
        None: no bound."""
        return None

    def _defer_past_budget(
        self, context: Any, decoded: dict[int, Decoded], answers: list[Any]
    ) -> None:
        """Predictions that would take the batch past its budget get 429 + Retry-After.

        The per-request limits bound one request; this bounds the batch (what
        text-embeddings-inference calls max_batch_tokens), so a batch of worst requests still
        finishes inside responseTimeout. Requests run in batch order; the first always fits
        (a per-request limit is never above the batch budget).
        """
        limit = self.prediction_budget()
        if limit is None:
            return
        spent, deferred = 0, []
        for index, item in decoded.items():
            cost = self.prediction_cost(item)
            if spent and spent + cost > limit[0]:
                deferred.append(index)
            else:
                spent += cost
        if not deferred:
            return
        error = TooManyRequests(
            f"this batch already carries {spent} of the {limit[0]} tokens a batch may run "
            f"({limit[1]}); retry after {PREDICTION_RETRY_AFTER_S} s",
            PREDICTION_RETRY_AFTER_S,
        )
        logger.info("%d prediction requests deferred: 429", len(deferred))
        for index in deferred:
            del decoded[index]
            answers[index] = self._reject(context, index, error)

    def _run_forward(self, inputs: list[Any]) -> list[Any]:
        with torch.inference_mode(), self.batch_metrics.timed(FORWARD):
            outputs = list(self.forward(inputs))
        if len(outputs) != len(inputs):
            raise RuntimeError(f"forward returned {len(outputs)} outputs for {len(inputs)} inputs")
        self.batch_metrics.inputs += len(inputs)  # inputs the model ran, retries included
        return outputs

    def _answer(self, context: Any, index: int, produce: Callable[[], Any]) -> str | bytes:
        try:
            # orjson writes a float32 (a numpy array or scalar) at float32's own precision, in
            # the shortest text that reads back to the same value, where json.dumps writes
            # float64's 17 digits: about half the bytes, and far less time, for embeddings.
            body = orjson.dumps(produce(), option=orjson.OPT_SERIALIZE_NUMPY)
        except RequestError as error:
            return self._reject(context, index, error)
        except Exception:
            logger.exception("request %d failed", index)
            return self._internal_error(context, index)
        context.set_response_content_type(index, JSON_CONTENT_TYPE)
        return body

    def _reject(self, context: Any, index: int, error: RequestError) -> str:
        context.set_response_status(int(error.status), error.status.phrase, index)
        context.set_response_content_type(index, JSON_CONTENT_TYPE)
        if isinstance(error, TooManyRequests):
            context.set_response_header(index, "Retry-After", str(error.retry_after))
        if index in self._wire:  # the protocol's own error body
            return _wire_error(self._wire[index], error.status, error.error_type, error.message)
        return error.to_json()

    def _internal_error(self, context: Any, index: int) -> str:
        status = HTTPStatus.INTERNAL_SERVER_ERROR
        context.set_response_status(int(status), status.phrase, index)
        context.set_response_content_type(index, JSON_CONTENT_TYPE)
        message = "the model failed on this request"
        if index in self._wire:
            return _wire_error(self._wire[index], status, "InternalServerError", message)
        return error_body(status, "InternalServerError", message)

    @staticmethod
    def _content_type(context: Any, index: int) -> str:
        for key in ("body", "data"):
            header = context.get_request_header(index, key)
            if isinstance(header, dict) and header.get("content-type"):
                return header["content-type"]
        return context.get_request_header(index, "Content-Type") or ""

    @staticmethod
    def _wants_explanation(context: Any, index: int) -> bool:
        return context.get_request_header(index, "explain") == "True"


def _wire_error(wire: Any, status: HTTPStatus, error_type: str, message: str) -> str:
    """An error in the request's wire protocol: OpenAI's shape, or the KServe protocols'."""
    if isinstance(wire, OpenAIEmbeddings):
        return wire.error_body(status, message)
    return kserve_error_body(message)


def _opens_json_container(body: Any) -> bool:
    """True for a parsed object or list, or text that starts one: what may be a KServe body."""
    if isinstance(body, dict | list):
        return True
    if isinstance(body, bytes | bytearray | str):
        return body[:64].lstrip()[:1] in (b"{", b"[", "{", "[")
    return False


def without_paths(value: Any) -> Any:
    """``value`` with every file path inside its strings masked as ``<path>``."""
    if isinstance(value, str):
        return _PATH.sub("<path>", value)
    if isinstance(value, dict):
        return {key: without_paths(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_paths(item) for item in value]
    return value


def top_k_labels(probabilities: torch.Tensor, labels: list[str], k: int) -> list[dict[str, Any]]:
    scores, indices = probabilities.topk(min(k, probabilities.numel()))
    return [
        {"label": labels[index], "score": score}  # a float32 scalar, written at its precision
        for score, index in zip(scores.numpy(), indices.tolist(), strict=True)
    ]


def entry_point(handler_class: type[TaskHandler]) -> Callable[[Any, Any], list[Any] | None]:
    """A ``module:function`` entry point for TorchServe, one handler instance per worker.

    TorchServe calls the function once with ``data=None`` to initialise, then once per batch.
    Naming ``ts_handlers.image_classification:handle`` in an archive keeps the archive free of
    handler code.
    """
    instance: TaskHandler | None = None

    def handle(data: Any, context: Any) -> list[Any] | None:
        nonlocal instance
        if instance is None:
            # Model load, in the worker, before any inference message: bound TorchServe's own
            # reading of form fields (worker_protocol.py, docs/security.md).
            worker_protocol.install()
            candidate = handler_class()
            candidate.initialize(context)
            instance = candidate
        if data is None:
            return None
        return instance.handle(data, context)

    handle.__qualname__ = f"{handler_class.__name__}.entry_point"
    return handle
