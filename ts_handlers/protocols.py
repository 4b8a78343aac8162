"""KServe's two inference protocols, recognised per request: v1 and v2 (Open Inference Protocol).

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
its answers become v2 output tensors (``TaskHandler.kserve_outputs``); everything else is here.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ts_handlers.errors import MAX_MESSAGE_CHARS, InvalidInput
from ts_handlers.payload import Request, decode_base64, preview

if TYPE_CHECKING:
    from ts_handlers.base import Decoded, TaskHandler

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


def error_body(message: str) -> str:
    """The error body both KServe protocols define: ``{"error": "..."}``, kept small."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    return orjson.dumps({"error": message}).decode()


# ---- the protocols ------------------------------------------------------------------------


class KServeRequest:
    """One request in a KServe protocol: decodes it through the task, and wraps its answers."""

    protocol: str

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload

    def decode(self, handler: TaskHandler, request: Request) -> Decoded:
        raise NotImplementedError

    def answer(self, handler: TaskHandler, outputs: list[Any], decoded: Decoded) -> Any:
        raise NotImplementedError

    def explanation(self, handler: TaskHandler, decoded: Decoded) -> Any:
        raise NotImplementedError


class V1Request(KServeRequest):
    """``{"instances": [...]}``; an instance is a string, ``{"data": ...}`` or
    ``{"b64": "<base64>"}`` (binary data, TensorFlow Serving's form). Options come from
    ``X-<Option>`` headers: the v1 body has no place for them."""

    protocol = "KServe v1"

    def decode(self, handler: TaskHandler, request: Request) -> Decoded:
        _check_fields(self.payload, InstancesRequest, "the body", V1_SHAPE)
        instances = self.payload.get("instances")
        if isinstance(instances, list):  # counted before any is validated or decoded
            handler.check_instance_count(len(instances))
        body = _validate(InstancesRequest, self.payload, V1_SHAPE)
        values = [
            _v1_value(item, f"instances[{index}]", handler.kserve_binary)
            for index, item in enumerate(body.instances)
        ]
        decoded = handler.decode_instances(values, handler.read_options(request), "instances")
        decoded.single, decoded.protocol = False, self
        return decoded

    def answer(self, handler: TaskHandler, outputs: list[Any], decoded: Decoded) -> Any:
        return {"predictions": handler.encode(outputs, decoded)}

    def explanation(self, handler: TaskHandler, decoded: Decoded) -> Any:
        return {"explanations": handler.explain_inputs(decoded.inputs, decoded)}


class V2Request(KServeRequest):
    """An Open Inference Protocol request with one BYTES input tensor: each element is one
    instance (a text, or a base64-encoded image)."""

    protocol = "KServe v2"
    FIELD = "inputs[0].data"

    def __init__(self, payload: dict[str, Any]) -> None:
        super().__init__(payload)
        # Filled by decode; a request that fails before has no answer to carry them.
        self.id = ""
        self.requested: list[str] | None = None

    def decode(self, handler: TaskHandler, request: Request) -> Decoded:
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
        binary = self._binary(handler, tensor)
        # The shape's dimensions are bounded (_check_v2_structure), so their product is cheap
        # and counts the instances before the data is read.
        handler.check_instance_count(math.prod(tensor.shape))
        values = [
            _v2_value(item, f"{self.FIELD}[{index}]", binary)
            for index, item in enumerate(_elements(tensor))
        ]
        options = handler.read_options(request, _parameters(handler, body.parameters))
        decoded = handler.decode_instances(values, options, self.FIELD)
        decoded.single, decoded.protocol = False, self
        return decoded

    @staticmethod
    def _binary(handler: TaskHandler, tensor: InferInput) -> bool:
        what = "one base64-encoded image" if handler.kserve_binary else "one text"
        if tensor.datatype != "BYTES":
            raise InvalidInput(
                f"inputs[0].datatype is {tensor.datatype}; this model takes BYTES, {what} "
                "per element"
            )
        content_type = tensor.parameters.content_type if tensor.parameters else None
        if handler.kserve_binary and content_type == "str":
            raise InvalidInput(
                'inputs[0].parameters.content_type "str" does not fit an image: send each '
                'image base64-encoded (content_type "base64", or leave it out)'
            )
        return handler.kserve_binary or content_type == "base64"

    def answer(self, handler: TaskHandler, outputs: list[Any], decoded: Decoded) -> Any:
        return self._response(handler, handler.kserve_outputs(outputs, decoded))

    def explanation(self, handler: TaskHandler, decoded: Decoded) -> Any:
        answers = handler.explain_inputs(decoded.inputs, decoded)
        return self._response(handler, [json_per_input("explanations", answers)])

    def _response(self, handler: TaskHandler, tensors: list[OutputTensor]) -> dict[str, Any]:
        if self.requested is not None:
            produced = {tensor.name: tensor for tensor in tensors}
            unknown = [name for name in self.requested if name not in produced]
            if unknown:
                raise InvalidInput(
                    f"outputs names {', '.join(preview(name) for name in unknown)}, which this "
                    f"model does not produce; its outputs are {', '.join(produced)}"
                )
            tensors = [produced[name] for name in self.requested]
        model = (handler.manifest or {}).get("model", {})
        response = {"model_name": model.get("modelName", ""), "id": self.id}
        if model.get("modelVersion"):
            response["model_version"] = model["modelVersion"]
        response["outputs"] = [tensor.to_json() for tensor in tensors]
        return response


def recognise(payload: Any) -> KServeRequest | None:
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
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in item["loc"])
    key = key.lstrip(".") or "the body"
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


def _parameters(handler: TaskHandler, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The request's v2 parameters as request options; a name the task does not take: 400."""
    parameters = parameters or {}
    accepted = handler.options_class.names()
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
