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

Like openai_api.py this is data only (a :class:`~ts_handlers.protocols.WireProtocol`): it parses
a body into pairs and wraps the task's logits into the ranking; the batch runner calls the
task's hooks between the two.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal

import orjson
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from ts_handlers.config import ConfigError, validation_message
from ts_handlers.errors import InvalidInput
from ts_handlers.payload import Request, preview
from ts_handlers.protocols import (
    TASK_FORM,
    Decoded,
    Parsed,
    TaskSpec,
    TextPair,
    WireProtocol,
    json_object,
)

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


class Rerank(WireProtocol):
    """One rerank request: parses it into (query, text) pairs; wraps the model's logits into
    the ranking. Data only, like every wire protocol: the task tokenizes and runs the pairs."""

    name = "rerank"

    def __init__(self, payload: Any = None) -> None:
        # The body, when it was recognised by its shape (already parsed); None: read on parse.
        self.payload = payload
        self.body: RerankRequest | None = None

    def parse(self, request: Request, spec: TaskSpec) -> Parsed:
        if spec.num_labels != 1:
            raise InvalidInput(
                f"{RERANK_PATH}: this model has {spec.num_labels or 0} labels; reranking needs a "
                "cross-encoder with one output (num_labels 1). Send text pairs as "
                '{"inputs": [{"text": ..., "text_pair": ...}]} to classify them'
            )
        payload = json_object(self.payload, request, SHAPE)
        texts = payload.get("texts")
        # Counted before the fields are validated one by one: each text is a pair to run.
        if isinstance(texts, list):
            spec.check_count(len(texts))
        try:
            body = RerankRequest.model_validate(payload)
        except ValidationError as error:
            raise InvalidInput(
                validation_message(error, list(RerankRequest.model_fields))
            ) from None
        for index, text in enumerate(body.texts):
            if not isinstance(text, str):
                raise InvalidInput(f"texts[{index}] must be a string, got {preview(text)}")
        self.body = body
        side = body.truncation_direction.lower() if body.truncation_direction else None
        # The logits themselves: wrap applies the cross-encoder's activation.
        options = {"truncate": body.truncate, "truncation_side": side, "function_to_apply": "none"}
        pairs: list[str | bytes | TextPair] = [TextPair(body.query, text) for text in body.texts]
        return Parsed(pairs, "texts", self, options)

    def answer_bound(self, count: int, per_input: int, limit: int) -> tuple[int, int, int]:
        """Each item of the ranking, with its text when asked for (the longest texts it could
        carry, as JSON writes them)."""
        body = self.body
        assert body is not None
        kept = min(body.top_n or count, count)
        size = 2 + kept * (ITEM_BYTES + 1)
        if body.return_text:
            lengths = sorted((len(orjson.dumps(text)) for text in body.texts), reverse=True)
            size += sum(lengths[:kept]) + 8 * kept
        return size, limit, max((limit - 2) // (ITEM_BYTES + 1), 0)

    def wrap(self, answers: Any, decoded: Decoded, spec: TaskSpec) -> Any:
        """``answers``: the task's ``[{"label", "score": logit}]`` per pair."""
        body = self.body
        assert body is not None
        logits = torch.tensor([answer[0]["score"] for answer in answers], dtype=torch.float32)
        activation = "none" if body.raw_scores else spec.score_activation or "sigmoid"
        values = _apply(logits, activation).numpy()
        # Highest first; equal scores keep the order sent (a stable sort).
        order = sorted(range(len(values)), key=lambda i: -float(values[i]))
        ranking = []
        for index in order[: body.top_n]:
            item: dict[str, Any] = {"index": index, "score": values[index]}
            if body.return_text:
                item["text"] = body.texts[index]
            ranking.append(item)
        return ranking

    def wrap_explanations(self, explanations: list[Any], decoded: Decoded, spec: TaskSpec) -> Any:
        raise InvalidInput("reranking has no explanations; post to /predictions/<model>/rerank")

    def error_body(self, status: HTTPStatus, error_type: str, message: str) -> str:
        return TASK_FORM.error_body(status, error_type, message)


def _apply(logits: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.sigmoid(logits) if activation == "sigmoid" else logits


__all__ = ["RERANK_PATH", "Rerank", "RerankRequest", "activation_for", "is_rerank_body"]
