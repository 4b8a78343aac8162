"""Reranking, as text-embeddings-inference's ``/rerank`` takes it, on a cross-encoder archive.

A ``sequence_classification`` archive of a model with one output (a cross-encoder:
``cross-encoder/ms-marco-MiniLM-L6-v2``, ``BAAI/bge-reranker-base``) scores how well each text
answers a query. TorchServe hands the URL tail after ``/predictions/<model>/<version>/`` to the
handler as the ``url_path`` header, so ``POST .../rerank`` reaches this module; the same body
posted to ``/predictions/<model>`` is recognised by its shape (``query`` and ``texts``, never
the task's ``inputs``).

* request: ``{"query": str, "texts": [str, ...], "raw_scores"?: bool, "return_text"?: bool,
  "top_n"?: int, "truncate"?: bool, "truncation_direction"?: "right" | "left"}``
* answer: ``[{"index": i, "score": s, "text"?: t}, ...]``, highest score first (equal scores
  in the order sent), at most ``top_n`` of them

Each (query, text) pair is one input of the dynamic batch, tokenized as
``tokenizer(query, text, truncation="longest_first")`` with the segment ids the model reads:
what sentence-transformers' ``CrossEncoder.predict`` runs. The score is the model's one logit
through the cross-encoder's activation (sigmoid unless its config.json names another, as
``CrossEncoder`` reads it), or the logit itself with ``raw_scores: true``:
``CrossEncoder.rank(query, texts)`` and ``rank(..., activation_fn=nn.Identity())``.

Like openai_api.py this is data only: it parses a body and wraps an answer, and calls the task
through the handler's hooks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from ts_handlers.config import SETUP_CONFIG_FILE, ConfigError, explain
from ts_handlers.errors import InvalidInput, PayloadTooLarge
from ts_handlers.payload import Request, preview
from ts_handlers.text import TextPair

if TYPE_CHECKING:
    from ts_handlers.base import Decoded
    from ts_handlers.text import TextHandler

# The route under /predictions/<model>/<version>/ (text-embeddings-inference's path).
RERANK_PATH = "rerank"
SHAPE = (
    '{"query": "...", "texts": ["...", ...], "raw_scores"?: bool, "return_text"?: bool, '
    '"top_n"?: int}'
)
# The activations a cross-encoder may be saved with, by the class's full name, and the score
# each gives. sentence-transformers 6 writes it to config_sentence_transformers.json
# ("activation_fn"), 4 and 5 to config.json ("sentence_transformers": {"activation_fn"}),
# older versions to config.json ("sbert_ce_default_activation_function").
ACTIVATIONS = {
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.modules.linear.Identity": "none",
}
ST_CONFIG_FILE = "config_sentence_transformers.json"
# Bytes of one answer item around its text: {"index":N,"score":F,"text":} at their longest.
ITEM_BYTES = 64


class RerankRequest(BaseModel):
    """The body's fields, declared once; any other field is a 400 naming it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    query: StrictStr
    texts: list[Any] = Field(min_length=1)
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    top_n: StrictInt | None = Field(default=None, ge=1)
    truncate: StrictBool = True
    # text-embeddings-inference's name and values ("Right", "Left"); ours are lower-case.
    truncation_direction: Literal["right", "left", "Right", "Left"] | None = None


def is_rerank_body(payload: Any) -> bool:
    """A rerank body: an object with ``query`` and ``texts`` (the task's own key is ``inputs``)."""
    return (
        isinstance(payload, dict)
        and "query" in payload
        and "texts" in payload
        and "inputs" not in payload
    )


def activation_for(model_config: Any, folder: str | Path | None = None) -> str:
    """The score function ``CrossEncoder`` applies by default: the activation the checkpoint
    was saved with (``folder``'s config_sentence_transformers.json, else its config.json, an
    object or a dict), else sigmoid, the default for one label. One ts-handlers does not
    apply is refused, naming it."""

    def read(key: str) -> Any:
        if isinstance(model_config, dict):
            return model_config.get(key)
        return getattr(model_config, key, None)

    name = None
    saved = Path(folder) / ST_CONFIG_FILE if folder is not None else None
    if saved is not None and saved.is_file():
        try:
            name = json.loads(saved.read_text(encoding="utf-8")).get("activation_fn")
        except (OSError, ValueError, AttributeError):
            name = None
    if name is None:
        settings = read("sentence_transformers")
        name = settings.get("activation_fn") if isinstance(settings, dict) else None
    if name is None:
        name = read("sbert_ce_default_activation_function")
    if name is None:
        return "sigmoid"
    if name not in ACTIVATIONS:
        raise ConfigError(
            f"the cross-encoder was saved with activation_fn {preview(name)}; ts-handlers "
            f"scores reranks with {', '.join(ACTIVATIONS)} (raw_scores gives the logit)"
        )
    return ACTIVATIONS[name]


class Rerank:
    """One rerank request: decodes it into (query, text) pairs, wraps the model's scores."""

    protocol = "rerank"

    def __init__(self, payload: Any = None) -> None:
        self.payload = payload
        self.request: RerankRequest | None = None

    def decode(self, handler: TextHandler, request: Request) -> Decoded:
        labels = handler.labels or []
        if len(labels) != 1:
            raise InvalidInput(
                f"{RERANK_PATH}: this model has {len(labels)} labels; reranking needs a "
                "cross-encoder with one output (num_labels 1). Send text pairs as "
                '{"inputs": [{"text": ..., "text_pair": ...}]} to classify them'
            )
        payload = self.payload
        if payload is None:
            if request.is_empty:
                raise InvalidInput(f"the request body is empty; send {SHAPE}")
            payload = request.json()
        if not isinstance(payload, dict):
            raise InvalidInput(f"the body must be a JSON object, {SHAPE}")
        texts = payload.get("texts")
        # Counted before the fields are validated one by one: each text is a pair to run.
        if isinstance(texts, list):
            handler.check_text_count(len(texts))
        try:
            body = RerankRequest.model_validate(payload)
        except ValidationError as error:
            raise InvalidInput(explain(error, list(RerankRequest.model_fields))) from None
        for index, text in enumerate(body.texts):
            if not isinstance(text, str):
                raise InvalidInput(f"texts[{index}] must be a string, got {preview(text)}")
        self.request = body
        self._check_answer_size(handler, body)
        side = body.truncation_direction.lower() if body.truncation_direction else None
        options = handler.options_class.model_validate({"truncate": body.truncate})
        options = handler.with_defaults(options).model_copy(update={"truncation_side": side})
        pairs = [TextPair(body.query, text) for text in body.texts]
        decoded = handler.decode_texts(pairs, options, single=False, field="texts")
        decoded.protocol = self  # type: ignore[assignment]
        return decoded

    @staticmethod
    def _check_answer_size(handler: TextHandler, body: RerankRequest) -> None:
        """The answer's bound, before any work: each item, with its text when asked for."""
        count = min(body.top_n or len(body.texts), len(body.texts))
        size = 2 + count * (ITEM_BYTES + 1)
        if body.return_text:  # the longest texts the answer could carry, as JSON writes them
            lengths = sorted((len(orjson.dumps(text)) for text in body.texts), reverse=True)
            size += sum(lengths[:count]) + 8 * count
        limit = handler.config.max_response_size
        if size > limit:
            raise PayloadTooLarge(
                f"the answer to {len(body.texts)} texts could take {size} bytes, over the "
                f"limit of {limit} ({SETUP_CONFIG_FILE} max_response_size, TorchServe's "
                "max_response_size); send fewer texts, a smaller top_n, or return_text: false"
            )

    def answer(self, handler: Any, outputs: list[torch.Tensor], decoded: Decoded) -> Any:
        body = self.request
        assert body is not None
        logits = torch.stack([row.reshape(-1)[0] for row in outputs]).float()
        scores = logits if body.raw_scores else _apply(logits, handler.rerank_activation)
        values = scores.numpy()
        # Highest first; equal scores keep the order sent (a stable sort).
        order = sorted(range(len(values)), key=lambda i: -float(values[i]))
        answer = []
        for index in order[: body.top_n]:
            item: dict[str, Any] = {"index": index, "score": values[index]}
            if body.return_text:
                item["text"] = body.texts[index]
            answer.append(item)
        return answer

    def explanation(self, handler: Any, decoded: Decoded) -> Any:
        raise InvalidInput("reranking has no explanations; post to /predictions/<model>/rerank")


def _apply(logits: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.sigmoid(logits) if activation == "sigmoid" else logits


__all__ = ["RERANK_PATH", "Rerank", "RerankRequest", "activation_for", "is_rerank_body"]
