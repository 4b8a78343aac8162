"""OpenAI's embeddings API, as the official ``openai`` clients speak it.

TorchServe 0.12 hands the part of the URL after ``/predictions/<model>/<version>/`` to the
handler as the ``url_path`` header, and its token authorization is a ``Bearer`` header, as the
``openai`` client sends. So a client made with
``OpenAI(base_url=".../predictions/<model>/<version>/v1", api_key=<inference key>)`` posts
``client.embeddings.create(...)`` to ``.../v1/embeddings`` and reaches this module; the same body
posted to ``/predictions/<model>`` is recognised by its shape (``input``, never the text tasks'
``inputs``). Either way the request's texts join the dynamic batch with every other form.

* request: ``{"input": str | [str], "model": str, "dimensions"?: int,
  "encoding_format"?: "float" | "base64", "user"?: str}``, plus the task's own options
  (``normalize``, ``truncate``), which the client sends through ``extra_body``
* answer: ``{"object": "list", "data": [{"object": "embedding", "index": i, "embedding": ...}],
  "model": <served model>, "usage": {"prompt_tokens": n, "total_tokens": n}}``; ``n`` counts
  the tokens the model ran (after truncation, special tokens included)
* errors: ``{"error": {"message", "type", "param", "code"}}`` with the request's own status,
  the shape the client turns into ``openai.BadRequestError`` and its siblings

A wire protocol (protocols.py), data only: it parses a body into texts and options and wraps
an answer or an error; the base calls the task's hooks between them.
"""

from __future__ import annotations

import base64
from http import HTTPStatus
from typing import Any, Literal

import numpy as np
import orjson

from ts_handlers.errors import InvalidInput, NotFound, shorten
from ts_handlers.payload import Request, preview, reject_unknown_fields
from ts_handlers.protocols import Decoded, Parsed, TaskSpec, WireProtocol, json_object

# The route under /predictions/<model>/<version>/ (the client appends /embeddings to its
# base_url, which ends in /v1).
EMBEDDINGS_PATH = "v1/embeddings"
# The fields of OpenAI's embeddings request; the task's own options are accepted beside them.
OPENAI_FIELDS = ("input", "model", "dimensions", "encoding_format", "user")
ENCODING_FORMATS = ("float", "base64")
# A request's model and user are read, never echoed; still bounded, like every field.
MAX_NAME_CHARS = 256
# Bytes one item of "data" adds around its vector: {"object":"embedding","index":N,...}.
ITEM_ENVELOPE_BYTES = 64
# The answer's object, model and usage around the items.
ANSWER_ENVELOPE_BYTES = 1024
SHAPE = (
    '{"input": "text" | ["text", ...], "model": "...", "dimensions"?: int, '
    '"encoding_format"?: "float" | "base64"}'
)


def is_openai_body(payload: Any) -> bool:
    """An OpenAI embeddings body: an object with ``input`` (the text tasks' key is ``inputs``)."""
    return isinstance(payload, dict) and "input" in payload and "inputs" not in payload


class OpenAIEmbeddings(WireProtocol):
    """One request in OpenAI's embeddings API: parses its texts, wraps its vectors."""

    name = "OpenAI embeddings"
    unit = "inputs"

    def __init__(self, payload: Any = None) -> None:
        # The body, when it was recognised by its shape (already parsed); None: read on parse.
        self.payload = payload
        self.encoding_format: Literal["float", "base64"] = "float"

    def parse(self, request: Request, spec: TaskSpec) -> Parsed:
        if not spec.embeds_text:
            raise NotFound(
                f"{EMBEDDINGS_PATH}: this model ({spec.task}) does not embed text; OpenAI's "
                "embeddings API is served by sentence_embedding archives"
            )
        payload = json_object(self.payload, request, SHAPE)
        reject_unknown_fields(payload, [*OPENAI_FIELDS, *spec.option_names])
        texts = _texts(payload.get("input", None), "input" in payload)
        _name(payload, "model", required=True)
        _name(payload, "user", required=False)
        encoding_format = payload.get("encoding_format", "float")
        if encoding_format not in ENCODING_FORMATS:
            raise InvalidInput(
                f"encoding_format={preview(encoding_format)} is not supported; choose one of "
                f"{', '.join(map(repr, ENCODING_FORMATS))}"
            )
        self.encoding_format = encoding_format
        return Parsed(list(texts), "input", self, payload)

    def answer_bound(self, count: int, per_input: int, limit: int) -> tuple[int, int, int]:
        """The float form is the longer of the two."""
        per_item = per_input + ITEM_ENVELOPE_BYTES
        size = ANSWER_ENVELOPE_BYTES + count * (per_item + 1)
        return size, limit, max((limit - ANSWER_ENVELOPE_BYTES) // (per_item + 1), 0)

    def wrap(self, answers: Any, decoded: Decoded, spec: TaskSpec) -> Any:
        vectors = np.asarray(answers, dtype=np.float32)
        if self.encoding_format == "base64":
            # What the client decodes: the little-endian float32 bytes of each vector.
            rows: list[Any] = [
                base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in vectors
            ]
        else:
            rows = list(vectors)  # float32 rows, written at float32's precision by orjson
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": index, "embedding": row}
                for index, row in enumerate(rows)
            ],
            "model": spec.model_name,
            "usage": {"prompt_tokens": decoded.tokens, "total_tokens": decoded.tokens},
        }

    def wrap_explanations(self, explanations: list[Any], decoded: Decoded, spec: TaskSpec) -> Any:
        raise InvalidInput("OpenAI's embeddings API has no explanations; post to /predictions")

    def error_body(self, status: HTTPStatus | int, error_type: str, message: str) -> str:
        """OpenAI's error shape, which its clients raise as ``openai.APIStatusError``s."""
        status = HTTPStatus(status)
        if status == HTTPStatus.TOO_MANY_REQUESTS:
            kind = "rate_limit_error"
        elif status >= 500:
            kind = "server_error"
        else:
            kind = "invalid_request_error"
        error = {"message": shorten(message), "type": kind, "param": None, "code": None}
        return orjson.dumps({"error": error}).decode()


def _texts(value: Any, present: bool) -> list[str]:
    if not present:
        raise InvalidInput(f"input is required; the body must be {SHAPE}")
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise InvalidInput(
            f"input must be a string or a non-empty list of strings, got {preview(value)}"
        )
    for index, item in enumerate(value):
        if isinstance(item, int | list) and not isinstance(item, bool):
            raise InvalidInput(
                f"input[{index}] is a token id or a list of them: this server tokenizes with "
                "the model's own tokenizer, whose ids differ from OpenAI's; send the text"
            )
        if not isinstance(item, str):
            raise InvalidInput(f"input[{index}] must be a string, got {type(item).__name__}")
    return value


def _name(payload: dict[str, Any], key: str, *, required: bool) -> None:
    if key not in payload:
        if required:
            raise InvalidInput(f"{key} is required; the body must be {SHAPE}")
        return
    value = payload[key]
    if not isinstance(value, str):
        raise InvalidInput(f"{key} must be a string, got {preview(value)}")
    if len(value) > MAX_NAME_CHARS:
        raise InvalidInput(f"{key} is {len(value)} characters; the limit is {MAX_NAME_CHARS}")
