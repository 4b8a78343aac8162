"""Wire protocols, as data: each parses a body into instances and options and wraps answers and
errors; none imports or calls the handler (the base calls the task's hooks between them).

Here: :class:`WireProtocol` (the interface), :class:`TaskForm` (the task's own forms) and
KServe's two inference protocols, recognised per request: v1 and v2 (Open Inference Protocol).
OpenAI's embeddings form is in openai_api.py.

KServe's TorchServe runtime forwards the bodies of ``POST /v1/models/<m>:predict`` and
``POST /v2/models/<m>/infer`` unchanged to TorchServe's ``/predictions/<m>``; TorchServe's
frontend also takes the two KServe routes itself and hands their bodies over the same way
(docs/kserve-protocols.md). TorchServe's own
``service_envelope`` for these bodies reads only the first request of a dynamic batch and has
no per-request errors. Here each request of a batch is recognised on its own, contributes all
its instances to the shared batched forward, and gets its own answer or its own 4xx:

* v1: ``{"instances": [...]}`` -> ``{"predictions": [...]}`` (``{"explanations": [...]}``
  on ``:explain``)
* v2: ``{"id"?, "parameters"?, "inputs": [{"name", "shape", "datatype": "BYTES", "data"}],
  "outputs"?}`` -> ``{"model_name", "model_version", "id", "outputs": [...]}``

Both answer an error with ``{"error": "..."}`` and the request's own status. A body is
recognised by its shape alone: ``instances``, or ``inputs`` holding objects (the text tasks' own
``{"inputs": "text" | ["t1", ...]}`` holds strings, so it stays the plain form).

A task says how its instances become model inputs (``TaskHandler.decode_instances``) and how
its answers become v2 output tensors (``TaskHandler.kserve_outputs``); the protocol knows of
the task only a :class:`TaskSpec`, data.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Annotated, Any, ClassVar, Generic, Literal, cast

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from typing_extensions import TypeVar

from ts_handlers import errors
from ts_handlers.config import RequestOptions, field_path
from ts_handlers.errors import InvalidInput, check_count, shorten
from ts_handlers.payload import Request, decode_base64, preview

# Defaulted, so Decoded and a handler typed by its config alone still read.
OptionsT = TypeVar("OptionsT", bound=RequestOptions, default=RequestOptions)

# Instances one KServe request may carry for a task that sets no limit of its own (the
# built-in tasks take max_texts_per_request / max_images_per_request).
MAX_KSERVE_INSTANCES = 1024
# The output name KServe's examples give an output that has no name of its own.
DEFAULT_OUTPUT = "output-0"
# The longest request id echoed back (KServe's own ids are 36-character UUIDs).
MAX_ID_CHARS = 256
# Validation problems listed in one error message; the rest are counted.
MAX_LISTED_ERRORS = 5
# Bounds on a body's structure, checked on the parsed JSON before any element is validated or
# decoded, so the work and the error message stay small whatever a 6.5 MB body holds
# (docs/limits.md): input tensors (the models take one), requested outputs, request
# parameters, dimensions of a shape, and the size of one dimension.
MAX_INPUT_TENSORS = 16
MAX_OUTPUTS = 16
MAX_PARAMETERS = 32
MAX_SHAPE_DIMS = 8
MAX_DIMENSION = 2**31 - 1
V1_SHAPE = '{"instances": [...]}'
V2_SHAPE = (
    '{"inputs": [{"name": "input-0", "shape": [n], "datatype": "BYTES", "data": [...]}], '
    '"id"?, "parameters"?, "outputs"?}'
)


# ---- the bodies, declared once ------------------------------------------------------------


class _Body(BaseModel):
    # Strict: "3" is not a shape entry and 7 is not an id; an unknown field is named.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# The Open Inference Protocol's tensor data types.
Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]


class InputParameters(_Body):
    # MLServer's convention for BYTES: "str" (text as sent) or "base64" (binary data). Left
    # out: the task's own (images base64, text as sent).
    content_type: Literal["str", "base64"] | None = None


class InferInput(_Body):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: Datatype
    parameters: InputParameters | None = None
    # Row-major, flat or nested as the shape (the protocol allows both).
    data: list[Any]


class RequestedOutput(_Body):
    name: str


class InferRequest(_Body):
    """An Open Inference Protocol (KServe v2) inference request."""

    # Echoed in the answer, so bounded: an answer over max_response_size would kill the worker.
    id: Annotated[str, Field(max_length=MAX_ID_CHARS)] | None = None
    # Request options the task accepts (top_k, truncate, ...), by their names.
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput] = Field(min_length=1)
    # The outputs to answer, by name; left out: every output.
    outputs: list[RequestedOutput] | None = None


class InstancesRequest(_Body):
    """A KServe v1 predict or explain request."""

    instances: list[Any] = Field(min_length=1)


# ---- answers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputTensor:
    """One Open Inference Protocol output tensor; ``data`` is flat, in row-major order."""

    name: str
    datatype: str
    shape: list[int]
    data: Any  # a list, or a 1-D numpy array (written at its own precision by orjson)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": self.shape,
            "datatype": self.datatype,
            "data": self.data,
        }


def fp32_tensor(name: str, values: Any) -> OutputTensor:
    """An FP32 tensor with the shape of ``values`` (an array, a tensor's numpy, nested lists)."""
    array = np.asarray(values, dtype=np.float32)
    return OutputTensor(name, "FP32", list(array.shape), array.reshape(-1))


def json_per_input(name: str, answers: Sequence[Any]) -> OutputTensor:
    """BYTES ``[n]``: each input's answer written as JSON, the form any answer fits."""
    data = [orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY).decode() for answer in answers]
    return OutputTensor(name, "BYTES", [len(data)], data)


def labels_and_scores(answers: Sequence[Sequence[Mapping[str, Any]]]) -> list[OutputTensor]:
    """A classifier's ``[{"label", "score"}, ...]`` per input as FP32 ``scores`` ``[n, k]`` and
    BYTES ``labels`` ``[n, k]``, best first (every input of a request has the same ``k``)."""
    scores = [[entry["score"] for entry in answer] for answer in answers]
    labels = [entry["label"] for answer in answers for entry in answer]
    tensor = fp32_tensor("scores", scores)
    return [tensor, OutputTensor("labels", "BYTES", tensor.shape, labels)]


# Bytes a KServe answer adds around the answers: the v2 model name, id (up to 256 characters,
# 6 bytes each when JSON escapes them), version and output tensor descriptions, or the v1
# "predictions" key.
KSERVE_ENVELOPE_BYTES = 4096


def answer_bytes(count: int, per_input: int) -> int:
    """Bytes of a JSON list of ``count`` answers of at most ``per_input`` bytes each."""
    return 2 + count * (per_input + 2)  # brackets, and ", " between items


# ---- what a protocol knows of the task, and what it parses -------------------------------


@dataclass
class Decoded(Generic[OptionsT]):
    """What one request contributes to the batch, and how to shape its answer."""

    inputs: list[Any]
    # The request's options, an instance of the task's ``options_class``.
    options: OptionsT = field(default_factory=lambda: cast(Any, RequestOptions()))
    # True when the client sent one input rather than a list: its protocol answers with one
    # item, unwrapped.
    single: bool = True
    # Tokens the model runs for this request (after truncation, special tokens included,
    # padding excluded): OpenAI's usage and the X-Compute-Tokens header; 0: not counted.
    tokens: int = 0
    # Set for a request answered without the model (a tokenize request): produces its answer.
    answer: Callable[[], Any] | None = None


@dataclass(frozen=True)
class TaskSpec:
    """What a wire protocol knows of the task it parses for: data, read from the handler once
    per batch. A protocol never sees the handler itself."""

    # The handler's class name, for messages.
    task: str = ""
    model_name: str = ""
    model_version: str = ""
    # Instances (v1 instances, v2 BYTES elements) are base64 of binary data (an image file)
    # when True, text as sent when False.
    binary: bool = False
    # The per-request options the task accepts, by name.
    option_names: tuple[str, ...] = ()
    # Instances one request may carry, what they are called and the key that sets the limit.
    max_instances: int = MAX_KSERVE_INSTANCES
    instance_unit: str = "instances"
    max_instances_key: str = "protocols.MAX_KSERVE_INSTANCES"
    # True for a task that answers OpenAI's embeddings API (openai_api.py).
    embeds_text: bool = False
    # True for a task that reads text pairs, so a rerank body is its (rerank.py).
    reads_text_pairs: bool = False
    # The task's labels (outputs per input) when it has a fixed number; None: it has none.
    num_labels: int | None = None
    # The function a one-output model's score goes through by default (a cross-encoder's
    # activation, as sentence-transformers saved it): "sigmoid" or "none".
    score_activation: str | None = None

    def check_count(self, count: int) -> None:
        check_count(count, self.max_instances, self.instance_unit, self.max_instances_key)


@dataclass(frozen=True)
class TextPair:
    """Two texts read together, as ``tokenizer(text, text_pair)`` reads them: a query and a
    passage (reranking), a premise and a hypothesis (NLI). ``transformers.pipeline``'s form."""

    text: str
    text_pair: str

    def chars(self, cut: int) -> int:
        """Characters the tokenizer reads, each part cut at ``cut`` (see CHARS_PER_TOKEN)."""
        return min(len(self.text), cut) + min(len(self.text_pair), cut)


@dataclass(frozen=True)
class Parsed:
    """A body a protocol parsed: its instances (``str`` for text as sent, ``bytes`` for
    base64-sent data) and the options it carries beside the ``X-`` headers."""

    instances: list[str | bytes | TextPair]
    # Names the instances in error messages (instances, inputs[0].data, input).
    field: str
    # The protocol that parsed them: it bounds the answer's size (answer_bound).
    protocol: WireProtocol
    options: Mapping[str, Any] | None = None


class WireProtocol:
    """One wire form of a request: parses a body into instances and options, wraps answers and
    errors. Data only: it never calls the handler (TaskHandler calls the task's hooks)."""

    name: ClassVar[str] = ""
    # True: ``wrap`` takes the task's Open Inference Protocol output tensors
    # (``TaskHandler.kserve_outputs``); False: the task's answers (``TaskHandler.encode``).
    tensors: ClassVar[bool] = False
    # Names the instances in answer-size errors ("texts", "inputs").
    unit: ClassVar[str] = "texts"

    def parse(self, request: Request, spec: TaskSpec) -> Parsed:
        raise NotImplementedError

    def wrap(self, answers: Any, decoded: Decoded, spec: TaskSpec) -> Any:
        """The answer to one request: ``answers`` holds one item per input (or the output
        tensors, when ``tensors``)."""
        raise NotImplementedError

    def wrap_explanations(self, explanations: list[Any], decoded: Decoded, spec: TaskSpec) -> Any:
        raise NotImplementedError

    def error_body(self, status: HTTPStatus, error_type: str, message: str) -> str:
        raise NotImplementedError

    def answer_bound(self, count: int, per_input: int, limit: int) -> tuple[int, int, int]:
        """(bytes the answer to ``count`` inputs of at most ``per_input`` bytes each could
        take, the limit they are held to within ``limit`` bytes, the inputs that fit)."""
        return answer_bytes(count, per_input), limit, max((limit - 2) // (per_input + 2), 0)


class TaskForm(WireProtocol):
    """The task's own request forms (raw bytes, text, its JSON): the task's ``decode`` parses
    them, as only the task knows them. Answers are the task's, one item unwrapped when the
    client sent one input; errors are ``{"code", "type", "message"}``."""

    name = "the task's own form"

    def wrap(self, answers: Any, decoded: Decoded, spec: TaskSpec) -> Any:
        return answers[0] if decoded.single else answers

    def wrap_explanations(self, explanations: list[Any], decoded: Decoded, spec: TaskSpec) -> Any:
        return self.wrap(explanations, decoded, spec)

    def error_body(self, status: HTTPStatus, error_type: str, message: str) -> str:
        return errors.error_body(status, error_type, message)


TASK_FORM = TaskForm()


class KServeProtocol(WireProtocol):
    """Both KServe protocols: ``{"error": "..."}`` bodies, answers escaped as JSON inside a
    JSON string at worst (v2 BYTES), in an envelope of at most KSERVE_ENVELOPE_BYTES."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload

    def error_body(self, status: HTTPStatus, error_type: str, message: str) -> str:
        return orjson.dumps({"error": shorten(message)}).decode()

    def answer_bound(self, count: int, per_input: int, limit: int) -> tuple[int, int, int]:
        # JSON inside a JSON string at most doubles; then the KServe envelope.
        limit = (limit - KSERVE_ENVELOPE_BYTES) // 2
        size = 2 * answer_bytes(count, per_input) + KSERVE_ENVELOPE_BYTES
        return size, limit, max((limit - 2) // (per_input + 2), 0)


class V1Request(KServeProtocol):
    """``{"instances": [...]}``; an instance is a string, ``{"data": ...}`` or
    ``{"b64": "<base64>"}`` (binary data, TensorFlow Serving's form). Options come from
    ``X-<Option>`` headers: the v1 body has no place for them."""

    name = "KServe v1"

    def parse(self, request: Request, spec: TaskSpec) -> Parsed:
        _check_fields(self.payload, InstancesRequest, "the body", V1_SHAPE)
        instances = self.payload.get("instances")
        if isinstance(instances, list):  # counted before any is validated or decoded
            spec.check_count(len(instances))
        body = _validate(InstancesRequest, self.payload, V1_SHAPE)
        values = [
            _v1_value(item, f"instances[{index}]", spec.binary)
            for index, item in enumerate(body.instances)
        ]
        return Parsed(values, "instances", self)

    def wrap(self, answers: Any, decoded: Decoded, spec: TaskSpec) -> Any:
        return {"predictions": answers}

    def wrap_explanations(self, explanations: list[Any], decoded: Decoded, spec: TaskSpec) -> Any:
        return {"explanations": explanations}


class V2Request(KServeProtocol):
    """An Open Inference Protocol request with one BYTES input tensor: each element is one
    instance (a text, or a base64-encoded image)."""

    name = "KServe v2"
    tensors = True
    FIELD = "inputs[0].data"

    def __init__(self, payload: dict[str, Any]) -> None:
        super().__init__(payload)
        # Filled by parse; a request that fails before has no answer to carry them.
        self.id = ""
        self.requested: list[str] | None = None

    def parse(self, request: Request, spec: TaskSpec) -> Parsed:
        _check_v2_structure(self.payload)
        body = _validate(InferRequest, self.payload, V2_SHAPE)
        # KServe answers a request without an id with a fresh one, so a client can match them.
        self.id = body.id if body.id else str(uuid.uuid4())
        self.requested = None if body.outputs is None else [out.name for out in body.outputs]
        if len(body.inputs) != 1:
            names = ", ".join(preview(tensor.name) for tensor in body.inputs[:5])
            raise InvalidInput(
                f"this model takes one input tensor, got {len(body.inputs)} ({names}); send "
                "the instances as the elements of one BYTES tensor"
            )
        tensor = body.inputs[0]
        binary = self._binary(spec, tensor)
        # The shape's dimensions are bounded (_check_v2_structure), so their product is cheap
        # and counts the instances before the data is read.
        spec.check_count(math.prod(tensor.shape))
        values = [
            _v2_value(item, f"{self.FIELD}[{index}]", binary)
            for index, item in enumerate(_elements(tensor))
        ]
        return Parsed(values, self.FIELD, self, _parameters(spec, body.parameters))

    @staticmethod
    def _binary(spec: TaskSpec, tensor: InferInput) -> bool:
        what = "one base64-encoded image" if spec.binary else "one text"
        if tensor.datatype != "BYTES":
            raise InvalidInput(
                f"inputs[0].datatype is {tensor.datatype}; this model takes BYTES, {what} "
                "per element"
            )
        content_type = tensor.parameters.content_type if tensor.parameters else None
        if spec.binary and content_type == "str":
            raise InvalidInput(
                'inputs[0].parameters.content_type "str" does not fit an image: send each '
                'image base64-encoded (content_type "base64", or leave it out)'
            )
        return spec.binary or content_type == "base64"

    def wrap(self, answers: Any, decoded: Decoded, spec: TaskSpec) -> Any:
        return self._response(answers, spec)

    def wrap_explanations(self, explanations: list[Any], decoded: Decoded, spec: TaskSpec) -> Any:
        return self._response([json_per_input("explanations", explanations)], spec)

    def _response(self, tensors: list[OutputTensor], spec: TaskSpec) -> dict[str, Any]:
        if self.requested is not None:
            produced = {tensor.name: tensor for tensor in tensors}
            unknown = [name for name in self.requested if name not in produced]
            if unknown:
                raise InvalidInput(
                    f"outputs names {', '.join(preview(name) for name in unknown)}, which this "
                    f"model does not produce; its outputs are {', '.join(produced)}"
                )
            tensors = [produced[name] for name in self.requested]
        response = {"model_name": spec.model_name, "id": self.id}
        if spec.model_version:
            response["model_version"] = spec.model_version
        response["outputs"] = [tensor.to_json() for tensor in tensors]
        return response


def recognise(payload: Any) -> KServeProtocol | None:
    """The KServe protocol a parsed JSON body is in; None for every other body."""
    if not isinstance(payload, dict):
        return None
    if "instances" in payload:
        return V1Request(payload)
    inputs = payload.get("inputs")
    if isinstance(inputs, list) and any(
        isinstance(item, dict) and not _is_text_pair(item) for item in inputs
    ):
        return V2Request(payload)
    return None


def _is_text_pair(item: dict[str, Any]) -> bool:
    """``{"text": a, "text_pair": b}``, transformers.pipeline's text pair: the task's own
    form, never a v2 tensor (which has a name, a datatype and data)."""
    return "text" in item and not {"name", "datatype", "data", "shape"} & item.keys()


def json_object(payload: Any, request: Request, shape: str) -> dict[str, Any]:
    """A protocol's body as a JSON object: ``payload`` when the body was recognised by its
    shape (already parsed), else the request's body, read now; ``shape`` is named in errors."""
    if payload is None:
        if request.is_empty:
            raise InvalidInput(f"the request body is empty; send {shape}")
        payload = request.json()
    if not isinstance(payload, dict):
        raise InvalidInput(f"the body must be a JSON object, {shape}")
    return payload


# ---- internals ----------------------------------------------------------------------------


def _validate(model: type[_Body], payload: dict[str, Any], shape: str) -> Any:
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        # Only the listed problems are formatted; the structure checks before validation keep
        # their number small anyway.
        problems = [_problem(item) for item in error.errors()[:MAX_LISTED_ERRORS]]
        listed = "; ".join(problems)
        if error.error_count() > MAX_LISTED_ERRORS:
            listed += f"; and {error.error_count() - MAX_LISTED_ERRORS} more"
        raise InvalidInput(f"{listed}. The body must be {shape}") from None


def _check_fields(value: Any, model: type[_Body], where: str, shape: str) -> None:
    """Unknown keys of one object, refused in one message (the first few and a count) before
    validation, which would make one error per key."""
    if not isinstance(value, dict):
        return  # validation says what was expected
    unknown = [key for key in value if key not in model.model_fields]
    if unknown:
        prefix = "" if where == "the body" else f"{where}."
        shown = ", ".join(f"{prefix}{preview(key, quote=False)}" for key in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        fields = "field" if len(unknown) == 1 else "fields"
        raise InvalidInput(f"unknown {fields} {shown}{more}. The body must be {shape}")


def _check_length(value: Any, limit: int, what: str, unit: str) -> None:
    if isinstance(value, list | dict) and len(value) > limit:
        raise InvalidInput(f"{what} has {len(value)} {unit}; at most {limit} are accepted")


def _check_v2_structure(payload: dict[str, Any]) -> None:
    """Every count of a v2 body, and every shape entry, bounded before validation.

    A body of a few MB can hold millions of list entries; validating them one by one made one
    error object per entry (gigabytes, and a minute). Each list's length is checked here first,
    and each shape entry's size, so validation sees a body of bounded size.
    """
    _check_fields(payload, InferRequest, "the body", V2_SHAPE)
    inputs = payload.get("inputs")
    _check_length(inputs, MAX_INPUT_TENSORS, "inputs", "tensors")
    _check_length(payload.get("outputs"), MAX_OUTPUTS, "outputs", "entries")
    _check_length(payload.get("parameters"), MAX_PARAMETERS, "parameters", "entries")
    outputs = payload.get("outputs")
    for index, item in enumerate(outputs if isinstance(outputs, list) else ()):
        _check_fields(item, RequestedOutput, f"outputs[{index}]", V2_SHAPE)
    for index, tensor in enumerate(inputs if isinstance(inputs, list) else ()):
        if not isinstance(tensor, dict):
            continue
        where = f"inputs[{index}]"
        _check_fields(tensor, InferInput, where, V2_SHAPE)
        _check_fields(tensor.get("parameters"), InputParameters, f"{where}.parameters", V2_SHAPE)
        shape = tensor.get("shape")
        _check_length(shape, MAX_SHAPE_DIMS, f"{where}.shape", "dimensions")
        for dim, size in enumerate(shape if isinstance(shape, list) else ()):
            if isinstance(size, int) and not 0 <= size <= MAX_DIMENSION:
                raise InvalidInput(
                    f"{where}.shape[{dim}] is {preview(size)}; a dimension is a whole number "
                    f"from 0 to {MAX_DIMENSION}"
                )


def _problem(item: Any) -> str:
    """One validation problem, naming its field as the client wrote it: inputs[0].shape."""
    key = field_path(item["loc"], "the body")
    kind = item["type"]
    if kind == "extra_forbidden":
        return f"unknown field {key}"
    if kind == "missing":
        return f"{key} is required"
    if kind == "too_short":
        return f"{key} is empty"
    if kind == "literal_error":
        choices = (item.get("ctx") or {}).get("expected", "")
        return f"{key}={preview(item.get('input'))} is not supported; choose one of {choices}"
    return f"{key}: {item['msg'].lower()}, got {preview(item.get('input'))}"


def _elements(tensor: InferInput) -> list[Any]:
    """The tensor's elements in row-major order, checked against its shape.

    Reading stops as soon as the data holds more elements, or more nested lists, than the
    shape allows, so its cost follows the shape (bounded by the instance limit), not the data.
    """
    count = math.prod(tensor.shape)
    lists = count * len(tensor.shape) + 1  # nested as the shape: fewer lists than this
    flat: list[Any] = []
    stack = [iter(tensor.data)]
    while stack:  # nesting is bounded by the JSON depth limit (payload.MAX_JSON_DEPTH)
        item = next(stack[-1], stack)
        if item is stack:
            stack.pop()
        elif isinstance(item, list):
            lists -= 1
            if lists < 0:
                raise InvalidInput(
                    f"inputs[0].data nests more lists than inputs[0].shape {tensor.shape} has "
                    "rows; send it flat or nested as the shape"
                )
            stack.append(iter(item))
        else:
            flat.append(item)
            if len(flat) > count:
                raise InvalidInput(
                    f"inputs[0].shape {tensor.shape} holds {count} elements but inputs[0].data "
                    "has more"
                )
    if count != len(flat):
        raise InvalidInput(
            f"inputs[0].shape {tensor.shape} holds {count} elements but inputs[0].data has "
            f"{len(flat)}"
        )
    if not flat:
        raise InvalidInput("inputs[0].data is empty; send at least one element")
    return flat


def _parameters(spec: TaskSpec, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The request's v2 parameters as request options; a name the task does not take: 400."""
    parameters = parameters or {}
    accepted = spec.option_names
    unknown = sorted(set(parameters) - set(accepted))
    if unknown:
        raise InvalidInput(
            f"unknown parameter(s) {', '.join(preview(name) for name in unknown[:10])}; this "
            f"model accepts {', '.join(accepted) or 'none'}"
        )
    return parameters


def _v1_value(item: Any, where: str, binary: bool) -> str | bytes:
    if isinstance(item, dict) and len(item) == 1 and isinstance(item.get("b64"), str):
        return decode_base64(item["b64"], what=where)
    if isinstance(item, dict) and len(item) == 1 and isinstance(item.get("data"), str):
        item = item["data"]
    if not isinstance(item, str):
        raise InvalidInput(
            f'{where} must be a string, {{"data": "..."}} or {{"b64": "<base64>"}}; got '
            f"{preview(item)}"
        )
    return decode_base64(item, what=where) if binary else item


def _v2_value(item: Any, where: str, binary: bool) -> str | bytes:
    if not isinstance(item, str):
        raise InvalidInput(f"{where} must be a string (BYTES), got {preview(item)}")
    return decode_base64(item, what=where) if binary else item
