"""The shared core every task handler stands on: lifecycle, the task's hooks, describe.

TorchServe calls ``initialize(context)`` once per worker and ``handle(data, context)`` once per
dynamic batch. :class:`TaskHandler` reads the typed config, chooses the device, loads the
exported model and labels; ``handle`` hands each batch to a :class:`~ts_handlers.batch.Batch`,
which finds each request's wire protocol (protocols.py, openai_api.py), calls the task's hooks
and writes every request's own status and body. A task says only what is specific to it:

* ``decode(request)`` -> :class:`Decoded` (the model inputs this request contributes)
* ``forward(inputs)`` -> one output per input, in order (default: the inputs stacked, on the
  device, through the model)
* ``encode(outputs, decoded)`` -> one JSON-able answer per input

``handle`` returns exactly one answer per request, in order.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar, get_args

import torch
from pydantic import ValidationError

from ts_handlers import worker_protocol
from ts_handlers.admission import ExplanationScheduler
from ts_handlers.artifacts import load_artifact
from ts_handlers.batch import BATCH_SIZE_HEADER, JSON_CONTENT_TYPE, Batch, Route
from ts_handlers.config import (
    SETUP_CONFIG_FILE,
    HandlerConfig,
    RequestOptions,
    load_config,
    validation_message,
)
from ts_handlers.cpu import serving_precision
from ts_handlers.errors import InvalidInput, NotFound
from ts_handlers.labels import LABELS_FILE, read_labels
from ts_handlers.metrics import report
from ts_handlers.openai_api import EMBEDDINGS_PATH, OpenAIEmbeddings
from ts_handlers.payload import Request
from ts_handlers.protocols import Decoded, OptionsT, OutputTensor, Parsed, json_per_input

__all__ = [
    "BATCH_SIZE_HEADER",
    "JSON_CONTENT_TYPE",
    "Decoded",
    "Route",
    "TaskHandler",
    "entry_point",
    "top_k_labels",
    "without_paths",
]

logger = logging.getLogger(__name__)

ConfigT = TypeVar("ConfigT", bound=HandlerConfig)

# Config keys naming files on the build machine: never part of a describe answer.
PRIVATE_CONFIG_KEYS = ("model_name", "serialized_file", "model_file")
# An absolute POSIX, home-relative, Windows or file:// path inside a string.
_PATH = re.compile(r"""(?:(?<![\w.:/])/|~/|\b[A-Za-z]:\\|file://)[^\s'"]*""")


def device_for(gpu_id: int | None) -> torch.device:
    """The worker's GPU when TorchServe gives it one and CUDA is here, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


class TaskHandler(Generic[ConfigT, OptionsT]):
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
    # True for a task that reads text pairs ({"text": a, "text_pair": b} in "inputs"), so it
    # also takes a rerank body (rerank.py).
    reads_text_pairs: ClassVar[bool] = False
    # The function a one-output model's score goes through by default (a cross-encoder's
    # activation); set at load by a task that reranks.
    score_activation: str | None = None
    # (what an instance is, the config key limiting them per request) for KServe and OpenAI
    # requests; None: protocols.MAX_KSERVE_INSTANCES.
    instance_limit: ClassVar[tuple[str, str] | None] = None
    # The config keys bounding the work one handled batch may spend on predictions and on
    # explanations, in the units of prediction_cost / explanation_cost (admission.py); None:
    # no bound.
    prediction_budget: ClassVar[str | None] = None
    explanation_budget: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """``TaskHandler[MyConfig, MyOptions]`` declares ``config_class`` and
        ``options_class`` too, unless the class sets them itself."""
        super().__init_subclass__(**kwargs)
        for base in cls.__dict__.get("__orig_bases__", ()):
            for name, value in zip(("config_class", "options_class"), get_args(base), strict=False):
                if isinstance(value, type) and name not in cls.__dict__:
                    setattr(cls, name, value)

    def __init__(self) -> None:
        self.initialized = False
        self.context: Any = None
        self.manifest: dict[str, Any] = {}
        self.config: ConfigT
        self.model_dir: Path
        self.device = torch.device("cpu")
        self.model: Callable[..., Any] | None = None
        self.export_metadata: dict[str, Any] = {}
        # Which precision runs here, and why (cpu.serving_precision): describe and metrics say.
        self.precision: dict[str, Any] = serving_precision(None)
        self.labels: list[str] | None = None
        # Explanation scheduling over batches (admission.py).
        self.explanations = ExplanationScheduler()
        # The batch being handled, then the last one handled (its metrics: text.py tokenizing).
        self.batch = Batch(self, None, 0)

    # ---- lifecycle -------------------------------------------------------------------------

    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        self.context = context
        self.manifest = context.manifest
        self.model_dir = Path(properties["model_dir"])
        self.config = load_config(self.config_class, self.model_dir / SETUP_CONFIG_FILE)
        self.device = device_for(properties.get("gpu_id"))
        self.model = self.load_model()
        # Checked against the model's class count here, at load, so an archive built
        # elsewhere with a wrong file fails to load, not per request.
        self.labels = read_labels(self.model_dir / LABELS_FILE, self.num_classes())
        self.setup()
        self.initialized = True
        logger.info(
            "%s ready: mode=%s save_mode=%s device=%s",
            type(self).__name__,
            self.config.mode,
            self.config.save_mode,
            self.device,
        )

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

    def num_classes(self) -> int | None:
        """Classes the model outputs, as its export recorded them (None: not a classifier)."""
        return self.export_metadata.get("num_classes")

    def setup(self) -> None:
        """Task-specific loading (a tokenizer, say); runs once after the model is loaded."""

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        started = time.perf_counter()
        self.batch = Batch(self, context, len(data))
        answers = self.batch.run(data)
        # What TorchServe's BaseHandler records; PredictionTime is recorded by TorchServe itself.
        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
            metrics.add_time("HandlerTime", elapsed_ms, None, "ms")
        report(context, self.batch.metrics, len(answers), self.precision)
        return answers

    # ---- task hooks ------------------------------------------------------------------------

    def decode(self, request: Request) -> Decoded[OptionsT]:
        """One request in the task's own form (protocols.TaskForm) -> its model inputs."""
        raise NotImplementedError

    def forward(self, inputs: list[Any]) -> Sequence[Any]:
        """One output per input, in order; runs under ``torch.inference_mode()``. Default:
        the inputs stacked, moved to the device, through the model, and back on the CPU row by
        row. An input that is not a tensor (a list of numbers) becomes a float32 one."""
        assert self.model is not None
        tensors = [
            item if isinstance(item, torch.Tensor) else torch.tensor(item, dtype=torch.float32)
            for item in inputs
        ]
        return list(self.model(torch.stack(tensors).to(self.device)).cpu())

    def encode(self, outputs: list[Any], decoded: Decoded[OptionsT]) -> Sequence[Any]:
        """One JSON-able answer per input; the request's protocol wraps them (the task's own
        form unwraps one when the client sent one input). Default: each output as (nested)
        lists of numbers."""
        return [output.tolist() if hasattr(output, "tolist") else output for output in outputs]

    def decode_instances(self, parsed: Parsed, options: OptionsT) -> Decoded[OptionsT]:
        """A KServe or OpenAI request's instances (``parsed.instances``: ``str`` for text as
        sent, ``bytes`` for base64-sent data) as model inputs; ``parsed.field`` names them in
        error messages (``instances``, ``inputs[0].data``)."""
        raise InvalidInput(
            f"{type(self).__name__} does not take KServe v1/v2 bodies; send its own request form"
        )

    def kserve_outputs(self, outputs: list[Any], decoded: Decoded[OptionsT]) -> list[OutputTensor]:
        """This request's answers as Open Inference Protocol output tensors. Default: BYTES
        ``[n]``, each instance's answer as JSON; a task with numbers to give overrides it."""
        return [json_per_input("output-0", self.encode(outputs, decoded))]

    def read_options(self, request: Request, json_body: Any = None) -> OptionsT:
        """The request's options, typed by ``options_class``, with the archive's defaults."""
        names = self.options_class.names()
        raw = {name: request.option(name, json_body) for name in names}
        raw = {name: value for name, value in raw.items() if value is not None}
        try:
            options = self.options_class.model_validate(raw)
        except ValidationError as error:
            raise InvalidInput(validation_message(error, names)) from None
        return self.with_defaults(options)  # type: ignore[arg-type]

    def with_defaults(self, options: OptionsT) -> OptionsT:
        """Fills the options the request left out from the archive's config."""
        return options

    def route(self, path: str) -> Route:
        """How a request sent to ``/predictions/<model>/<version>/<path>`` is read (TorchServe
        hands the path over as the ``url_path`` header): a task with routes of its own
        overrides this and returns ``Route(its protocol, its decode hook)``."""
        if path == EMBEDDINGS_PATH:
            return Route(OpenAIEmbeddings())
        raise NotFound(
            f"this model serves no route {path!r}; post to /predictions/<model> "
            f"(or .../{EMBEDDINGS_PATH} for a model that embeds text)"
        )

    def explain_inputs(self, inputs: list[Any], decoded: Decoded[OptionsT]) -> list[Any]:
        """One explanation per input (``explain=True`` requests, ``/explanations/<model>``)."""
        raise InvalidInput(f"{type(self).__name__} does not provide explanations for this model")

    def explanation_cost(self, decoded: Decoded[OptionsT]) -> int:
        """The work one explanation request would cost, in the units of the config key
        ``explanation_budget`` names; checked when the request is decoded, before any work runs, so
        a request over a per-request limit raises its 4xx here."""
        return 0

    def prediction_cost(self, decoded: Decoded[OptionsT]) -> int:
        """The work one prediction request brings, in the units of ``prediction_budget``'s key."""
        return 0

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
