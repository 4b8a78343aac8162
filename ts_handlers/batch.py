"""The batch runner: one :class:`Batch` per dynamic batch TorchServe hands a worker.

It holds what belongs to that batch (the context, the stage metrics, one :class:`Slot` per
request: its wire protocol, decoded inputs and answer) and runs the task's hooks in order:

1. each request: its protocol found (the ``url_path`` route, else the body's shape), the body
   parsed by that protocol, the task's decode hook; a ``RequestError`` is that request's 4xx;
2. admission (admission.py): explanations within their budget, predictions within the batch's
   token budget; the rest 429 + Retry-After;
3. one forward of every admitted input under ``torch.inference_mode()``; on a failure each
   request alone, so its neighbours still answer;
4. each request's answer from the task's encode hook, wrapped by its protocol; errors in its
   protocol's error body.

The handler (base.py) keeps the lifecycle, the hooks and describe; the wire protocols
(protocols.py, openai_api.py) parse and wrap. Dependence runs one way: base -> batch ->
protocols.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import orjson
import torch

from ts_handlers.admission import Budget, over_budget
from ts_handlers.config import SETUP_CONFIG_FILE
from ts_handlers.errors import InvalidInput, RequestError, TooManyRequests
from ts_handlers.metrics import DECODE, ENCODE, FORWARD, BatchMetrics
from ts_handlers.openai_api import OpenAIEmbeddings, is_openai_body
from ts_handlers.payload import Request
from ts_handlers.protocols import TASK_FORM, Decoded, TaskSpec, WireProtocol, recognise
from ts_handlers.rerank import Rerank, is_rerank_body

if TYPE_CHECKING:
    from ts_handlers.base import TaskHandler

logger = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"
BATCH_SIZE_HEADER = "X-Batch-Size"
# text-embeddings-inference's response header: the tokens the model ran for this request.
TOKENS_HEADER = "X-Compute-Tokens"


@dataclass(frozen=True)
class Route:
    """How a request sent to a ``url_path`` route is read: its wire protocol, and the task's
    hook that decodes it. Without ``decode``, the protocol parses the body into instances and
    the task's ``decode_instances`` decodes them."""

    protocol: WireProtocol
    decode: Callable[[Request], Decoded] | None = None


@dataclass
class Slot:
    """One request of the batch: its wire protocol (the task's own form until another is
    recognised), what it decoded to, and its answer."""

    index: int
    protocol: WireProtocol = TASK_FORM
    decoded: Decoded | None = None
    answer: str | bytes | None = None


def task_spec(handler: TaskHandler) -> TaskSpec:
    """What the wire protocols may know of ``handler``'s task: data only."""
    model = (handler.manifest or {}).get("model", {})
    limits: dict[str, Any] = {}
    if handler.instance_limit is not None:
        unit, key = handler.instance_limit
        limits = {
            "max_instances": getattr(handler.config, key),
            "instance_unit": unit,
            "max_instances_key": f"{SETUP_CONFIG_FILE} {key}",
        }
    return TaskSpec(
        task=type(handler).__name__,
        model_name=model.get("modelName", ""),
        model_version=model.get("modelVersion") or "",
        binary=handler.kserve_binary,
        option_names=handler.options_class.names(),
        embeds_text=handler.openai_embeddings,
        reads_text_pairs=handler.reads_text_pairs,
        num_labels=len(handler.labels) if handler.labels else None,
        score_activation=handler.score_activation,
        **limits,
    )


class Batch:
    """One handled batch; ``run`` returns exactly one answer per request, in order."""

    def __init__(self, handler: TaskHandler, context: Any, size: int) -> None:
        self.handler = handler
        self.context = context
        self.metrics = BatchMetrics()
        self.slots = [Slot(index) for index in range(size)]
        self.spec = TaskSpec()

    def run(self, data: list[Any]) -> list[str | bytes | None]:
        self.spec = task_spec(self.handler)
        predictions, explanations = self._decode_all(data)
        self._run_explanations(explanations, bool(predictions))
        predictions = self._admit(predictions)
        if predictions:
            self._predict(predictions)
        batch_size = sum(len(slot.decoded.inputs) for slot in predictions if slot.decoded)
        for slot in self.slots:
            self.context.set_response_header(slot.index, BATCH_SIZE_HEADER, str(batch_size))
        for slot in predictions:
            if slot.decoded is not None and slot.decoded.tokens:
                self.context.set_response_header(
                    slot.index, TOKENS_HEADER, str(slot.decoded.tokens)
                )
        return [slot.answer for slot in self.slots]

    # ---- 1. decode ---------------------------------------------------------------------------

    def _decode_all(self, data: list[Any]) -> tuple[list[Slot], list[tuple[Slot, int]]]:
        handler, context = self.handler, self.context
        predictions: list[Slot] = []
        explanations: list[tuple[Slot, int]] = []
        started = time.perf_counter()
        for slot, row in zip(self.slots, data, strict=True):
            index = slot.index
            if (
                len(data) == 1
                and not row
                and context.get_request_header(index, "describe") == "True"
            ):
                # GET /models/<name>?customized=true reaches the worker as a batch of one
                # request with no body and the header describe=True. A client can send that
                # header to /predictions too, so a request that carries a body is always a
                # prediction, and describe() holds nothing secret (docs/security.md).
                self._answer(slot, handler.describe)
                continue
            try:
                request = Request.from_row(
                    row, _content_type(context, index), context.get_all_request_header(index)
                )
                decoded = slot.decoded = self._decode(slot, request)
                if decoded.answer is not None:  # answered without the model
                    self._answer(slot, decoded.answer)
                    continue
                if not decoded.inputs:
                    raise InvalidInput("the request contains no inputs")
                if context.get_request_header(index, "explain") == "True":
                    explanations.append((slot, handler.explanation_cost(decoded)))
                else:
                    predictions.append(slot)
            except RequestError as error:
                # One line, no payload and no message (it may quote the client's text).
                logger.info(
                    "request %d rejected: %d %s", index, int(error.status), error.error_type
                )
                self._reject(slot, error)
            except Exception:  # an unexpected decode failure must not take the batch down
                logger.exception("decoding request %d failed", index)
                self._internal_error(slot)
        self.metrics.add_time(DECODE, time.perf_counter() - started)
        return predictions, explanations

    def _decode(self, slot: Slot, request: Request) -> Decoded:
        """The one place a request's protocol is decided: a ``url_path`` route's own; else a
        KServe v1/v2 or OpenAI embeddings body's, by its shape; else the task's own form.

        A JSON object or list is parsed here once and handed on parsed, as TorchServe hands on
        a body it decoded itself.
        """
        path = str(request.headers.get("url_path") or "").strip("/")
        if path:
            # Recognised by its route before the body is read: every error is in its protocol.
            route = self.handler.route(path)
            slot.protocol = route.protocol
            if route.decode is not None:
                return route.decode(request)
            return self._decode_instances(route.protocol, request)
        payload = None
        if request.looks_like_json() and _opens_json_container(request.body):
            if isinstance(request.body, dict):  # TorchServe parsed it: recognised before checks
                slot.protocol = self._protocol_of(request.body)
            try:
                payload = request.json()
            except InvalidInput:  # refused while parsing: a KServe body still gets its own body
                if not isinstance(request.body, dict):  # else recognised above
                    slot.protocol = self._protocol_of(request.json_structure())
                raise
            slot.protocol = self._protocol_of(payload)
            if slot.protocol is not TASK_FORM:
                return self._decode_instances(slot.protocol, request)
        if isinstance(payload, dict | list) and not isinstance(request.body, dict | list):
            request = replace(request, body=payload)
        return self.handler.decode(request)

    def _protocol_of(self, payload: Any) -> WireProtocol:
        """The wire protocol a parsed JSON body is in, by its shape."""
        kserve = recognise(payload)
        if kserve is not None:
            return kserve
        if self.spec.embeds_text and is_openai_body(payload):
            return OpenAIEmbeddings(payload)
        if self.spec.reads_text_pairs and is_rerank_body(payload):
            return Rerank(payload)
        return TASK_FORM

    def _decode_instances(self, protocol: WireProtocol, request: Request) -> Decoded:
        parsed = protocol.parse(request, self.spec)
        options = self.handler.read_options(request, parsed.options)
        return self.handler.decode_instances(parsed, options)

    # ---- 2. admission ------------------------------------------------------------------------

    def _run_explanations(self, explanations: list[tuple[Slot, int]], predictions: bool) -> None:
        """Runs the explanations that fit this batch's budget (admission.py); the rest get
        429 + Retry-After."""
        if not explanations:
            return
        handler = self.handler
        scheduler = handler.explanations
        costs = [cost for _, cost in explanations]
        budget = self._budget(handler.explanation_budget)
        admitted = scheduler.admit(costs, budget, predictions)
        for position in admitted.run:
            slot = explanations[position][0]
            self._answer(slot, lambda s=slot: self._explanation_of(s))
        scheduler.ran(admitted)
        if admitted.error is not None:
            logger.info("%d explanation requests deferred: 429", len(admitted.deferred))
            for position in admitted.deferred:
                self._reject(explanations[position][0], admitted.error)

    def _explanation_of(self, slot: Slot) -> Any:
        decoded = slot.decoded
        assert decoded is not None
        explanations = self.handler.explain_inputs(decoded.inputs, decoded)
        return slot.protocol.wrap_explanations(explanations, decoded, self.spec)

    def _admit(self, predictions: list[Slot]) -> list[Slot]:
        """Predictions that would take the batch past its token budget get 429 + Retry-After
        (admission.over_budget); the rest run."""
        handler = self.handler
        budget = self._budget(handler.prediction_budget)
        if budget is None:
            return predictions
        costs = [handler.prediction_cost(slot.decoded) for slot in predictions if slot.decoded]
        deferred, error = over_budget(costs, budget)
        if not deferred:
            return predictions
        logger.info("%d prediction requests deferred: 429", len(deferred))
        for position in deferred:
            self._reject(predictions[position], error)
        return [slot for position, slot in enumerate(predictions) if position not in deferred]

    def _budget(self, key: str | None) -> Budget | None:
        """The budget the config key ``key`` sets for one handled batch; None: no bound."""
        if key is None:
            return None
        return Budget(getattr(self.handler.config, key), f"{SETUP_CONFIG_FILE} {key}")

    # ---- 3. forward, 4. encode ---------------------------------------------------------------

    def _predict(self, slots: list[Slot]) -> None:
        items = [slot.decoded for slot in slots if slot.decoded is not None]
        try:
            outputs = self._infer([value for item in items for value in item.inputs])
        except Exception:
            # Isolate the culprit: run each request alone so its neighbours still get answers.
            logger.exception("batched forward failed; retrying %d requests one by one", len(slots))
            for slot, item in zip(slots, items, strict=True):
                self._answer(slot, lambda s=slot, i=item: self._wrap(s, self._infer(i.inputs)))
            return
        offset = 0
        started = time.perf_counter()
        for slot, item in zip(slots, items, strict=True):
            chunk = list(outputs[offset : offset + len(item.inputs)])
            offset += len(item.inputs)
            self._answer(slot, lambda s=slot, c=chunk: self._wrap(s, c))
        self.metrics.add_time(ENCODE, time.perf_counter() - started)

    def _infer(self, inputs: list[Any]) -> list[Any]:
        with torch.inference_mode(), self.metrics.timed(FORWARD):
            outputs = list(self.handler.forward(inputs))
        if len(outputs) != len(inputs):
            raise RuntimeError(f"forward returned {len(outputs)} outputs for {len(inputs)} inputs")
        self.metrics.inputs += len(inputs)  # inputs the model ran, retries included
        return outputs

    def _wrap(self, slot: Slot, outputs: list[Any]) -> Any:
        """The task's answers (or output tensors) for one request, in its protocol."""
        decoded = slot.decoded
        assert decoded is not None
        if slot.protocol.tensors:
            answers = self.handler.kserve_outputs(outputs, decoded)
        else:
            answers = self.handler.encode(outputs, decoded)
        return slot.protocol.wrap(answers, decoded, self.spec)

    # ---- responses ---------------------------------------------------------------------------

    def _answer(self, slot: Slot, produce: Callable[[], Any]) -> None:
        try:
            # orjson writes a float32 (a numpy array or scalar) at float32's own precision, in
            # the shortest text that reads back to the same value, where json.dumps writes
            # float64's 17 digits: about half the bytes, and far less time, for embeddings.
            slot.answer = orjson.dumps(produce(), option=orjson.OPT_SERIALIZE_NUMPY)
        except RequestError as error:
            self._reject(slot, error)
            return
        except Exception:
            logger.exception("request %d failed", slot.index)
            self._internal_error(slot)
            return
        self.context.set_response_content_type(slot.index, JSON_CONTENT_TYPE)

    def _reject(self, slot: Slot, error: RequestError) -> None:
        self._error(slot, error.status, error.error_type, error.message)
        if isinstance(error, TooManyRequests):
            self.context.set_response_header(slot.index, "Retry-After", str(error.retry_after))

    def _internal_error(self, slot: Slot) -> None:
        status = HTTPStatus.INTERNAL_SERVER_ERROR
        self._error(slot, status, "InternalServerError", "the model failed on this request")

    def _error(self, slot: Slot, status: HTTPStatus, error_type: str, message: str) -> None:
        self.context.set_response_status(int(status), status.phrase, slot.index)
        self.context.set_response_content_type(slot.index, JSON_CONTENT_TYPE)
        slot.answer = slot.protocol.error_body(status, error_type, message)


def _content_type(context: Any, index: int) -> str:
    for key in ("body", "data"):
        header = context.get_request_header(index, key)
        if isinstance(header, dict) and header.get("content-type"):
            return header["content-type"]
    return context.get_request_header(index, "Content-Type") or ""


def _opens_json_container(body: Any) -> bool:
    """True for a parsed object or list, or text that starts one: what may be a KServe body."""
    if isinstance(body, dict | list):
        return True
    if isinstance(body, bytes | bytearray | str):
        return body[:64].lstrip()[:1] in (b"{", b"[", "{", "[")
    return False
