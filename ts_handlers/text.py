"""What every transformer text task shares: request parsing, tokenizing, padding.

Its export plan is export-time code, apart: ``ts_handlers/exporters/text.py``.

A request is ``text/plain``, JSON ``{"inputs": "text" | ["t1", ...], <options>}``, or a bare
JSON string or list. Each text is tokenized when its request is decoded (so a text that is too
long can be refused on its own), and the batch is collated in ``forward``: inputs are sorted by
length, cut into groups of ``inference_batch_size``, each group padded only to its own longest
sequence (or to ``max_length`` when the export verified only that shape), and the original order
is restored. Before any model work a request is held to ``max_texts_per_request``,
``max_tokens_per_request`` and an answer of at most ``max_response_size`` bytes, and a text is
cut to ``max_length`` x CHARS_PER_TOKEN characters before tokenizing (docs/limits.md).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import orjson
import torch
from pydantic import Field, ValidationError, model_validator
from torch import nn
from typing_extensions import TypeVar

from ts_handlers.base import Decoded, Route, TaskHandler
from ts_handlers.batch import TOKENS_HEADER as TOKENS_HEADER  # where tests import it from
from ts_handlers.config import (
    SETUP_CONFIG_FILE,
    ConfigError,
    HandlerConfig,
    OptionBool,
    PositiveInt,
    RequestOptions,
    validation_message,
)
from ts_handlers.errors import InvalidInput, NotFound, PayloadTooLarge, check_count, first_lines
from ts_handlers.metrics import TOKENIZE
from ts_handlers.openai_api import EMBEDDINGS_PATH
from ts_handlers.payload import (
    DEFAULT_MAX_RESPONSE_SIZE,
    Request,
    preview,
    reject_unknown_fields,
)
from ts_handlers.protocols import TASK_FORM, Parsed, TextPair, WireProtocol
from ts_handlers.protocols import answer_bytes as answer_bytes  # the task modules' import

logger = logging.getLogger(__name__)

# Tokenizer and model files copied into an archive beside the exported model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "config.json",
)
# Files that hold a tokenizer's vocabulary, one of which every served text model needs.
VOCABULARY_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
# Defaults of the per-request limits (docs/limits.md); setup_config.json may change them. Each
# text costs a share of a forward call however short it is (inference_batch_size per call).
MAX_TEXTS_PER_REQUEST = 256
# text-embeddings-inference's max_batch_tokens is 16384 per batch on a GPU; this is per request,
# and a full TorchServe batch of such requests must finish inside responseTimeout on a small CPU
# (measured on 2 cores: docs/limits.md).
MAX_TOKENS_PER_REQUEST = 2048
# Per handled batch: text-embeddings-inference's max_batch_tokens default.
MAX_TOKENS_PER_BATCH = 16384
# A bound on the characters one token stands for in ordinary text (English averages about 4,
# the longest WordPiece/BPE vocabulary entries about 20). With truncation on, a text is cut to
# max_length x CHARS_PER_TOKEN characters before tokenizing, so tokenizing costs O(max_length)
# whatever its length; the first max_length tokens of ordinary text are the same either way.
CHARS_PER_TOKEN = 32
# curl -d sends application/x-www-form-urlencoded, and TorchServe parses such a body into form
# fields (plain text becomes a field name, or nothing at all), so the handler gets no body.
FORM_URLENCODED = "application/x-www-form-urlencoded"
# The route of a tokenize request (text-embeddings-inference's /tokenize), under
# /predictions/<model>/<version>/.
TOKENIZE_PATH = "tokenize"
FORM_FIELDS_HINT = (
    "no text found: the body was sent as form fields (curl -d does that); send the text with "
    'Content-Type: text/plain, as JSON {"inputs": ...}, or as a form field named "data"'
)


# Which end of a text over max_length is cut (the tokenizer's truncation_side).
TruncationSide = Literal["right", "left"]
# The graph inputs of a model that reads segment ids (BERT-style text pairs), in this order.
TOKEN_TYPE_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class TextConfig(HandlerConfig):
    max_length: Annotated[int, Field(ge=2)] = 128
    # The default of the per-request "truncation_side": "left" keeps a text's end (the latest
    # turns of a conversation, say), as text-embeddings-inference's truncation_direction.
    truncation_side: TruncationSide = "right"
    # TorchServe's key: lower-case the text before tokenizing (for uncased checkpoints whose
    # tokenizer does not do it itself).
    do_lower_case: bool = False
    # Decided by the export: True when the traced graph holds only at max_length.
    pad_to_max_length: bool = False
    # Per-request limits, checked before the model runs; over one: 413 (docs/limits.md).
    max_texts_per_request: PositiveInt = MAX_TEXTS_PER_REQUEST
    # Tokens after truncation summed over the request's texts (each text counts max_length when
    # the archive pads every text to it). Bounds the work a request brings to a batch.
    max_tokens_per_request: PositiveInt = MAX_TOKENS_PER_REQUEST
    # Tokens one handled batch may run, summed over its requests (text-embeddings-inference's
    # max_batch_tokens); requests past it get 429 + Retry-After and come back in a later batch.
    max_tokens_per_batch: PositiveInt = MAX_TOKENS_PER_BATCH
    # Bytes one answer may take, bounded from the request before the model runs. TorchServe's
    # frontend drops the worker (every request in its batch gets 500) when one answer is longer
    # than the server's max_response_size, so this must not exceed that.
    max_response_size: PositiveInt = DEFAULT_MAX_RESPONSE_SIZE

    @model_validator(mode="after")
    def _one_full_text_fits_a_request(self) -> TextConfig:
        if self.max_length is not None and self.max_tokens_per_request < self.max_length:
            raise ValueError(
                f"max_tokens_per_request ({self.max_tokens_per_request}) is below max_length "
                f"({self.max_length}): one full-length text would be refused"
            )
        if self.max_tokens_per_batch < self.max_tokens_per_request:
            raise ValueError(
                f"max_tokens_per_batch ({self.max_tokens_per_batch}) is below "
                f"max_tokens_per_request ({self.max_tokens_per_request}): the largest request "
                "would never run"
            )
        return self

    @property
    def max_text_chars(self) -> int:
        """Characters of one text that are tokenized (see CHARS_PER_TOKEN)."""
        return self.max_length * CHARS_PER_TOKEN


class TextOptions(RequestOptions):
    """Options every text task accepts; a task's own options class extends this one."""

    # Cut a text longer than max_length (true, what the pipelines do) or refuse it with 413.
    truncate: OptionBool = True
    # Which end a text over max_length loses; None: the archive's truncation_side.
    truncation_side: TruncationSide | None = None


class TokenizeOptions(RequestOptions):
    """A tokenize request's options: the text is cut as the model would read it."""

    truncate: OptionBool = True
    truncation_side: TruncationSide | None = None
    # False: the text's own tokens only, without [CLS]/[SEP] or <s>/</s>.
    add_special_tokens: OptionBool = True


@dataclass
class Tokenized:
    """One text (or text pair), tokenized but not padded."""

    input_ids: list[int]
    text: str
    # With ``TextHandler.token_outputs``: each token's (start, end) in ``text``, and 1 for the
    # tokens the tokenizer added ([CLS], [SEP], <s>, ...); None otherwise.
    offsets: list[tuple[int, int]] | None = None
    special_tokens_mask: list[int] | None = None
    # Tokens of an instruction prompt at the start, left out of the pooling (sentence embedding
    # with include_prompt false); 0: none.
    prompt_length: int = 0
    # False for the second and later windows of a text read with stride (token
    # classification): its outputs join the window before.
    first_window: bool = True
    # A text pair's segment ids (0 for the first text, 1 for the second) when the tokenizer
    # gives them; None: a single text, all zeros.
    token_type_ids: list[int] | None = None
    # True for a text pair (TextPair), with or without segment ids.
    pair: bool = False


TextConfigT = TypeVar("TextConfigT", bound=TextConfig)
TextOptionsT = TypeVar("TextOptionsT", bound=TextOptions, default=TextOptions)


class TextHandler(TaskHandler[TextConfigT, TextOptionsT]):
    """Base of the text tasks; subclasses implement ``run_model`` and ``encode``."""

    options_class: ClassVar[type[RequestOptions]] = TextOptions
    instance_limit = ("texts", "max_texts_per_request")
    prediction_budget = "max_tokens_per_batch"
    # True for a task that answers per token (token classification): ``tokenize`` keeps the
    # character offsets and the special-tokens mask, and ``forward`` cuts each text's output
    # rows to its own tokens.
    token_outputs: ClassVar[bool] = False
    # The options of a tokenize request (a task with prompts extends them).
    tokenize_options_class: ClassVar[type[RequestOptions]] = TokenizeOptions

    # True for a graph with no attention_mask input (an archive made by hand): texts are
    # batched only with texts of their own length, so no padding reaches it (handmade.py).
    same_length_batches = False
    # True when the graph takes token_type_ids (a third input): collate pads them per group.
    token_types = False
    # True when this model's tokenizer gives a pair's second text segment id 1 and the model
    # reads it (BERT): a graph without token_type_ids cannot answer pairs as the pipeline does.
    pairs_need_token_types = False

    def setup(self) -> None:
        if getattr(self, "tokenizer", None) is None:  # a hand-made archive loads it earlier
            self.tokenizer = load_archive_tokenizer(self.model_dir)
        check_tokenizer_fits(self.tokenizer, self.embedding_rows(), str(self.model_dir))

    def embedding_rows(self) -> int | None:
        """Rows of the model's token-embedding table, as the export recorded them."""
        return self.export_metadata.get("embedding_rows")

    # ---- decode ----------------------------------------------------------------------------

    def decode(self, request: Request) -> Decoded[TextOptionsT]:
        if request.is_empty:
            if request.params or request.content_type == FORM_URLENCODED:
                raise InvalidInput(FORM_FIELDS_HINT)
            raise InvalidInput('the request body is empty; send text or JSON {"inputs": ...}')
        payload: Any = None
        if request.looks_like_json():
            payload = request.json()
            texts, single = self._texts_from_json(payload)
        else:
            texts, single = [request.text()], True
        options = self.read_options(request, payload)
        self.check_answer_size(len(texts), options)
        return self.decode_texts(texts, options, single)

    # ---- tokenize (text-embeddings-inference's /tokenize) ----------------------------------

    def route(self, path: str) -> Route:
        if path == TOKENIZE_PATH:
            return Route(TASK_FORM, self.decode_tokenize)
        if path == EMBEDDINGS_PATH:
            return super().route(path)
        raise NotFound(
            f"this model serves no route {path!r}; its routes are {TOKENIZE_PATH!r}"
            + (f", {EMBEDDINGS_PATH!r}" if self.openai_embeddings else "")
            + ", and /predictions/<model> itself"
        )

    def decode_tokenize(self, request: Request) -> Decoded:
        """``{"inputs": "text" | [...], "add_special_tokens"?, "truncate"?}`` (or text/plain)
        -> one list of tokens per input, each ``{"id", "text", "special", "start", "stop",
        "token"}``, as text-embeddings-inference's /tokenize answers (``start``/``stop``:
        character offsets into the text as read; null for special tokens or a tokenizer
        without offsets). The text is read as a prediction reads it, within the same limits,
        so the ids are exactly what the model would run."""
        if request.is_empty:
            raise InvalidInput('the request body is empty; send text or JSON {"inputs": ...}')
        payload: Any = None
        options_class = self.tokenize_options_class
        names = options_class.names()
        if request.looks_like_json():
            payload = request.json()
            texts, _ = self._texts_from_json(payload, names, pairs=False)
        else:
            texts = [request.text()]
        raw = {name: request.option(name, payload) for name in names}
        try:
            options = options_class.model_validate(
                {name: value for name, value in raw.items() if value is not None}
            )
        except ValidationError as error:
            raise InvalidInput(validation_message(error, names)) from None
        texts = self.tokenize_texts(texts, options)
        self.check_text_chars(texts)
        tokens = 0
        items = []
        for index, text in enumerate(texts):
            item = self.tokenize(
                text,
                index,
                options.truncate,
                offsets=True,
                add_special_tokens=options.add_special_tokens,
                side=options.truncation_side,
            )
            tokens += len(item.input_ids)
            if tokens > self.config.max_tokens_per_request:
                raise PayloadTooLarge(
                    f"inputs[:{index + 1}] are already {tokens} tokens after truncation; the "
                    f"limit is {self.config.max_tokens_per_request} tokens per request "
                    f"({SETUP_CONFIG_FILE} max_tokens_per_request). Send fewer or shorter texts"
                )
            items.append(item)
        return Decoded(inputs=[], options=options, answer=lambda: self._tokens(items))

    def tokenize_texts(self, texts: list[str], options: Any) -> list[str]:
        """The texts a tokenize request reads, as a prediction would read them (a task that
        prepends a prompt prepends it here too)."""
        return texts

    def _tokens(self, items: list[Tokenized]) -> list[list[dict[str, Any]]]:
        answer = []
        for item in items:
            strings = self.tokenizer.convert_ids_to_tokens(item.input_ids)
            special = item.special_tokens_mask or [0] * len(item.input_ids)
            offsets = item.offsets or [None] * len(item.input_ids)
            tokens = []
            for token_id, token, is_special, span in zip(
                item.input_ids, strings, special, offsets, strict=True
            ):
                start, stop = span if span and not is_special else (None, None)
                tokens.append(
                    {
                        "id": token_id,
                        "text": token if start is None else item.text[start:stop],
                        "special": bool(is_special),
                        "start": start,
                        "stop": stop,
                        "token": token,
                    }
                )
            answer.append(tokens)
        size = len(orjson.dumps(answer))
        if size > self.config.max_response_size:  # tokenizing is cheap; the answer is bounded
            raise PayloadTooLarge(
                f"the tokens of these texts take {size} bytes as JSON, over the limit of "
                f"{self.config.max_response_size} ({SETUP_CONFIG_FILE} max_response_size); "
                "send fewer or shorter texts"
            )
        return answer

    def decode_instances(self, parsed: Parsed, options: TextOptionsT) -> Decoded[TextOptionsT]:
        """A KServe or OpenAI request's texts; base64-sent ones must be UTF-8."""
        values, field = parsed.instances, parsed.field
        self.check_text_count(len(values))
        self.check_answer_size(len(values), options, parsed.protocol)
        texts = []
        for index, value in enumerate(values):
            try:
                texts.append(value if isinstance(value, str | TextPair) else value.decode("utf-8"))
            except UnicodeDecodeError as error:
                raise InvalidInput(
                    f"{field}[{index}] is base64 of bytes that are not UTF-8 text "
                    f"(byte {error.start}); send the text itself, or its UTF-8 bytes"
                ) from None
        return self.decode_texts(texts, options, single=False, field=field)

    def decode_texts(
        self, texts: list[str], options: Any, single: bool, field: str = "inputs"
    ) -> Decoded:
        """Tokenizes a request's texts within the per-request limits; ``field`` names the
        texts in error messages."""
        self.check_text_chars(texts)
        truncate = options.truncate
        inputs = []
        tokens = 0
        padded = self.config.max_length if self.config.pad_to_max_length else 0
        for index, text in enumerate(texts):
            item = self.tokenize(text, index, truncate, field, side=options.truncation_side)
            tokens += padded or len(item.input_ids)  # the positions the model will run
            if tokens > self.config.max_tokens_per_request:
                raise PayloadTooLarge(
                    f"{field}[:{index + 1}] are already {tokens} tokens after truncation; the "
                    f"limit is {self.config.max_tokens_per_request} tokens per request "
                    f"({SETUP_CONFIG_FILE} max_tokens_per_request). Send fewer or shorter texts"
                )
            inputs.append(item)
        return Decoded(inputs, options, single, tokens=tokens_run(inputs))

    # ---- limits (docs/limits.md) -----------------------------------------------------------

    def prediction_cost(self, decoded: Decoded[TextOptionsT]) -> int:
        """Token positions the request's texts will run (max_length each when padded to it)."""
        if self.config.pad_to_max_length:
            return self.config.max_length * len(decoded.inputs)
        return sum(len(item.input_ids) for item in decoded.inputs)

    def answer_bytes_per_text(self, options: TextOptionsT) -> int:
        """An upper bound on the JSON bytes of one text's answer; 0: no bound to check."""
        return 0

    def check_answer_size(
        self, count: int, options: Any, protocol: WireProtocol = TASK_FORM
    ) -> None:
        """Refuses a request whose answer could exceed max_response_size, before any work;
        ``protocol`` (the request's) knows what its envelope adds.

        TorchServe's frontend checks each answer of a batch on its own against its
        max_response_size (docs/limits.md), so the bound is per request.
        """
        per_text = self.answer_bytes_per_text(options)
        if not per_text:
            return
        size, limit, fits = protocol.answer_bound(count, per_text, self.config.max_response_size)
        if size > limit:
            unit = protocol.unit
            raise PayloadTooLarge(
                f"the answer to {count} {unit} could take {size} bytes, over the limit of "
                f"{limit} ({SETUP_CONFIG_FILE} max_response_size, TorchServe's max_response_size); "
                f"send at most {fits} {unit} per request"
            )

    def check_text_chars(self, texts: list[str]) -> None:
        """Bounds the characters a request makes the tokenizer read, before it reads any.

        Each text counts up to ``max_text_chars`` (the cut ``tokenize`` makes). Text with at
        most CHARS_PER_TOKEN characters per token that passes the token budget passes this.
        """
        cut = self.config.max_text_chars
        chars = sum(
            text.chars(cut) if isinstance(text, TextPair) else min(len(text), cut) for text in texts
        )
        budget = self.config.max_tokens_per_request * CHARS_PER_TOKEN
        if chars > budget:
            raise PayloadTooLarge(
                f"the texts are {chars} characters (each counted up to {cut}); the limit of "
                f"{self.config.max_tokens_per_request} tokens per request ({SETUP_CONFIG_FILE} "
                f"max_tokens_per_request) reads at most {budget} characters, "
                f"{CHARS_PER_TOKEN} per token. Send fewer or shorter texts"
            )

    def _texts_from_json(
        self, payload: Any, options: Sequence[str] | None = None, *, pairs: bool | None = None
    ) -> tuple[list[Any], bool]:
        """The texts of a JSON body, and whether one text (not a list) was sent. With
        ``pairs`` (default: the task's ``reads_text_pairs``), ``{"text": a, "text_pair": b}``
        items are :class:`TextPair`s."""
        pairs = self.reads_text_pairs if pairs is None else pairs
        if isinstance(payload, dict):
            if options is None:
                options = self.options_class.names()
            reject_unknown_fields(payload, ["inputs", *options])
            if "inputs" not in payload:
                raise InvalidInput('the JSON body needs "inputs": a string or a list of strings')
            payload = payload["inputs"]
            if pairs and isinstance(payload, dict) and "text" in payload:
                return [text_pair(payload, "inputs")], True
        if isinstance(payload, str):
            return [payload], True
        if isinstance(payload, list):
            if not payload:
                raise InvalidInput('"inputs" is an empty list; send at least one text')
            self.check_text_count(len(payload))
            texts: list[Any] = []
            for index, item in enumerate(payload):
                if pairs and isinstance(item, dict) and "text" in item:
                    texts.append(text_pair(item, f"inputs[{index}]"))
                elif not isinstance(item, str):
                    kinds = 'a string or {"text": ..., "text_pair": ...}' if pairs else "a string"
                    raise InvalidInput(
                        f"inputs[{index}] must be {kinds}, got {type(item).__name__}"
                    )
                else:
                    texts.append(item)
            return texts, False
        kinds = (
            "a string or a list of strings or text pairs"
            if pairs
            else "a string or a list of strings"
        )
        raise InvalidInput(f'"inputs" must be {kinds}, got {type(payload).__name__}')

    def check_text_count(self, count: int) -> None:
        check_count(
            count,
            self.config.max_texts_per_request,
            "texts",
            f"{SETUP_CONFIG_FILE} max_texts_per_request",
        )

    def tokenize(
        self,
        text: str | TextPair,
        index: int,
        truncate: bool = True,
        field: str = "inputs",
        *,
        offsets: bool = False,
        add_special_tokens: bool = True,
        side: str | None = None,
    ) -> Tokenized:
        """One text (or :class:`TextPair`) as the model reads it; ``side`` ("right", "left";
        None: the archive's truncation_side) says which end of a text over ``max_length`` is
        cut (a pair loses tokens from its longer text first, the tokenizer's
        ``longest_first``). Offsets always index the text as sent."""
        if isinstance(text, TextPair):
            return self._tokenize_pair(text, index, truncate, field, add_special_tokens, side)
        text = self._checked(text, f"{field}[{index}]")
        max_length = self.config.max_length
        cut = self.config.max_text_chars
        side = side or self.config.truncation_side
        sent = text
        shift = 0  # characters cut from the text's start (left truncation)
        if len(text) > cut:
            if not truncate:
                raise PayloadTooLarge(
                    f"{field}[{index}] is {len(text)} characters; with truncate: false a text "
                    f"may have at most {cut} ({CHARS_PER_TOKEN} per token of max_length "
                    f"{max_length}). Shorten it or send truncate: true"
                )
            shift, text = self._cut(text, side)
        if self.config.do_lower_case:
            text = text.lower()
        # One tokenizer pass: truncate while tokenizing, or count every token to refuse.
        per_token = self.token_outputs or offsets
        # The tokenizer reads its truncation_side at each call; a worker handles one batch at
        # a time, so setting it per text is safe.
        self.tokenizer.truncation_side = side
        encoding = self._encode(
            f"{field}[{index}]",
            (text,),
            truncation=truncate,
            max_length=max_length,
            add_special_tokens=add_special_tokens,
            return_offsets_mapping=self.token_outputs or (offsets and self.tokenizer.is_fast),
            return_special_tokens_mask=per_token,
        )
        input_ids = encoding["input_ids"]
        spans = encoding.get("offset_mapping")
        if shift:  # offsets into the text as sent, as the pipeline gives them
            text = sent.lower() if self.config.do_lower_case else sent
            if spans is not None:
                spans = [(start + shift, end + shift) if end else (0, 0) for start, end in spans]
        return Tokenized(
            input_ids=input_ids,
            text=text,
            offsets=spans,
            special_tokens_mask=encoding.get("special_tokens_mask"),
        )

    def _encode(self, name: str, texts: tuple[str, ...], **settings: Any) -> Any:
        """The tokenizer's encoding of one text or one pair, timed; refused when it is longer
        than ``settings["max_length"]`` (truncation off)."""
        with self.batch.metrics.timed(TOKENIZE):
            encoding = self.tokenizer(*texts, **settings)
        count, max_length = len(encoding["input_ids"]), settings["max_length"]
        if count > max_length:
            pair = " as a pair" if len(texts) == 2 else ""
            raise PayloadTooLarge(
                f"{name} is {count} tokens{pair}; this model reads at most {max_length}. "
                "Shorten it or send truncate: true"
            )
        return encoding

    def _checked(self, text: str, name: str) -> str:
        if not text.strip():
            raise InvalidInput(f"{name} is empty or whitespace only")
        try:  # JSON may carry "\ud800" escapes that no UTF-8 tokenizer can take
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise InvalidInput(
                f"{name} has an unpaired surrogate at char {error.start}; send valid Unicode text"
            ) from None
        return text

    def _cut(self, text: str, side: str) -> tuple[int, str]:
        """(characters cut from the start, the text cut to ``max_text_chars``).

        Only the first max_length tokens are kept, and ordinary text has them well inside the
        first max_length x CHARS_PER_TOKEN characters: tokenizing the rest would cost time
        and change nothing (tests/test_limits.py checks that). Cut on the left, the last
        max_length tokens are inside the last characters likewise.
        """
        cut = self.config.max_text_chars
        if len(text) <= cut:
            return 0, text
        if side == "left":
            return len(text) - cut, text[len(text) - cut :]
        return 0, text[:cut]

    def _tokenize_pair(
        self,
        pair: TextPair,
        index: int,
        truncate: bool,
        field: str,
        add_special_tokens: bool,
        side: str | None,
    ) -> Tokenized:
        """A pair as ``tokenizer(text, text_pair, truncation="longest_first")`` reads it, what
        ``transformers.pipeline`` (with truncation) and sentence-transformers' CrossEncoder
        run; its segment ids when the tokenizer gives them."""
        name = f"{field}[{index}]"
        first = self._checked(pair.text, f"{name}.text" if field == "inputs" else "query")
        second = self._checked(pair.text_pair, f"{name}.text_pair" if field == "inputs" else name)
        max_length = self.config.max_length
        cut = self.config.max_text_chars
        side = side or self.config.truncation_side
        if not truncate and max(len(first), len(second)) > cut:
            raise PayloadTooLarge(
                f"{name} has a text of {max(len(first), len(second))} characters; with "
                f"truncate: false a text may have at most {cut} ({CHARS_PER_TOKEN} per token "
                f"of max_length {max_length}). Shorten it or send truncate: true"
            )
        first, second = self._cut(first, side)[1], self._cut(second, side)[1]
        if self.config.do_lower_case:
            first, second = first.lower(), second.lower()
        self.tokenizer.truncation_side = side
        encoding = self._encode(
            name,
            (first, second),
            truncation="longest_first" if truncate else False,
            max_length=max_length,
            add_special_tokens=add_special_tokens,
        )
        input_ids = encoding["input_ids"]
        token_type_ids = encoding.get("token_type_ids")
        if token_type_ids is not None and not any(token_type_ids):
            token_type_ids = None
        if token_type_ids is not None and not self.token_types and self.pairs_need_token_types:
            raise InvalidInput(
                "this archive's graph takes no token_type_ids, which this model reads to tell "
                "a pair's two texts apart (an archive built before text pairs were served, or "
                "a graph traced without them); rebuild it with ts-handlers build to serve text "
                "pairs"
            )
        return Tokenized(
            input_ids=input_ids,
            text=first,
            token_type_ids=token_type_ids if self.token_types else None,
            pair=True,
        )

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, inputs: list[Tokenized]) -> list[Any]:
        """Sorted by length and padded per group; outputs come back in the original order."""
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i].input_ids))
        outputs: list[Any] = [None] * len(inputs)
        for group in self.batch_groups(order, inputs):
            tensors = self.collate([inputs[i] for i in group])
            # Tokens per batch: the texts' own, and the positions the model runs (padding too).
            self.batch.metrics.tokens += sum(len(inputs[i].input_ids) for i in group)
            self.batch.metrics.padded_tokens += tensors[0].numel()
            # (input_ids, attention_mask), and token_type_ids for a graph that takes them.
            results = self.run_model(*(tensor.to(self.device) for tensor in tensors))
            for position, index in enumerate(group):
                row = results[position]
                if self.token_outputs:  # (padded width, ...) -> this text's own tokens
                    row = row[: len(inputs[index].input_ids)]
                outputs[index] = row.cpu()
        return outputs

    def batch_groups(self, order: list[int], inputs: list[Tokenized]) -> list[list[int]]:
        """``order`` (sorted by length) cut into forward calls of ``inference_batch_size``;
        with ``same_length_batches``, also wherever the length changes."""
        size = self.config.inference_batch_size
        groups: list[list[int]] = []
        for index in order:
            fits = bool(groups) and len(groups[-1]) < size
            if fits and self.same_length_batches:
                fits = len(inputs[groups[-1][0]].input_ids) == len(inputs[index].input_ids)
            if fits:
                groups[-1].append(index)
            else:
                groups.append([index])
        return groups

    def collate(self, items: Sequence[Tokenized]) -> tuple[torch.Tensor, ...]:
        """(input_ids, attention_mask), and token_type_ids when the graph takes them."""
        width = self.config.max_length if self.config.pad_to_max_length else None
        token_ids = [item.input_ids for item in items]
        input_ids, attention_mask = padded(token_ids, self.tokenizer.pad_token_id or 0, width)
        if not self.token_types:
            return input_ids, attention_mask
        token_type_ids = torch.zeros_like(input_ids)
        for row, item in enumerate(items):
            if item.token_type_ids is not None:
                token_type_ids[row, : len(item.token_type_ids)] = torch.tensor(item.token_type_ids)
        return input_ids, attention_mask, token_type_ids

    def run_model(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)


# Characters of the longest number JSON writes for a float ("-2.2250738585072014e-308").
MAX_FLOAT_CHARS = 24


def tokens_run(inputs: Sequence[Tokenized]) -> int:
    """The tokens the model runs for a request's texts: after truncation, special tokens
    included (padding excluded); what OpenAI's ``usage`` and the X-Compute-Tokens header
    report."""
    return sum(len(item.input_ids) for item in inputs)


def text_pair(item: dict[str, Any], name: str) -> TextPair | str:
    """``{"text": a, "text_pair": b}`` as ``transformers.pipeline("text-classification")``
    takes it; ``{"text": a}`` alone is one text."""
    unknown = sorted(set(item) - {"text", "text_pair"})
    if unknown:
        shown = ", ".join(preview(key, quote=False) for key in unknown[:10])
        raise InvalidInput(f"{name}: unknown field(s) {shown}; a text pair has text, text_pair")
    values = []
    for key in ("text", "text_pair"):
        value = item.get(key)
        if value is None and key == "text_pair":
            return values[0]
        if not isinstance(value, str):
            raise InvalidInput(
                f"{name}.{key} must be a string, got "
                f"{'nothing' if value is None else type(value).__name__}; a text pair is "
                '{"text": "...", "text_pair": "..."}'
            )
        values.append(value)
    return TextPair(*values)


def uses_token_types(tokenizer: Any, model_config: Any, forward: Any = None) -> bool:
    """True when the tokenizer gives a pair's second text segment id 1 and the model reads it
    (BERT, ELECTRA, ALBERT: ``type_vocab_size`` 2); not for RoBERTa (its tokenizer gives
    none, its one segment embedding) or DeBERTa-v2 (``type_vocab_size`` 0: read as none).
    ``model_config`` is the checkpoint's config (an object or its config.json as a dict);
    ``forward``, when given, must take ``token_type_ids``."""
    if "token_type_ids" not in getattr(tokenizer, "model_input_names", ()):
        return False
    if isinstance(model_config, dict):
        types = model_config.get("type_vocab_size")
    else:
        types = getattr(model_config, "type_vocab_size", None)
    if not isinstance(types, int) or types < 2:
        return False
    if forward is not None:
        return "token_type_ids" in inspect.signature(forward).parameters
    return True


class LogitsOnly(nn.Module):
    """Returns the logits tensor alone, so the model traces cleanly under transformers 5."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if token_type_ids is None:  # one text, or a model without segment ids
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, return_dict=False
            )[0]
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_dict=False,
        )[0]


def load_tokenizer(folder: str | Path) -> Any:
    """The archived tokenizer, never a download."""
    use_offline_hub()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_archive_tokenizer(folder: Path) -> Any:
    """The tokenizer inside an archive; one missing (an archive made by hand) fails the load
    with which files to add."""
    fix = (
        "the archive holds no tokenizer this handler can read (tokenizer.json, or "
        "tokenizer_config.json with its vocabulary files): save it with "
        "tokenizer.save_pretrained(folder) and add the files with torch-model-archiver "
        "--extra-files"
    )
    # transformers 5 builds an empty tokenizer (special tokens only) from a bare config.json,
    # which would serve every text as unknown tokens: a vocabulary file must be there.
    if not any((Path(folder) / name).is_file() for name in VOCABULARY_FILES):
        raise ConfigError(f"{fix} (found none of {', '.join(VOCABULARY_FILES)})")
    try:
        return load_tokenizer(folder)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(f"{fix} ({type(error).__name__}: {first_lines(error)})") from None


def load_pretrained(auto_class: str, folder: str | Path, max_length: int | None = None) -> Any:
    """A checkpoint folder loaded by transformers' ``auto_class``, offline, in eval mode.

    With ``max_length``, a length past the model's position embeddings is refused.
    """
    use_offline_hub()
    import transformers

    model = getattr(transformers, auto_class).from_pretrained(str(folder), local_files_only=True)
    positions = getattr(model.config, "max_position_embeddings", None)
    if max_length is not None and positions is not None and max_length > positions:
        raise ConfigError(
            f"max_length is {max_length} but the checkpoint reads at most {positions} "
            "tokens (max_position_embeddings); lower max_length"
        )
    return model.eval()


def checkpoint_labels(model: Any) -> list[str]:
    """Class names from the checkpoint's ``id2label``, in class order."""
    config = model.config
    return [str(config.id2label[index]) for index in range(config.num_labels)]


def use_offline_hub() -> None:
    """Nothing is downloaded at run time: every Hugging Face load in this process stays local."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def text_export_inputs(
    tokenizer: Any,
    max_length: int,
    batch_sizes: Sequence[int] = (1, 3, 8),
    seq_lengths: Sequence[int] = (7, 33),
    token_types: bool = False,
) -> tuple[list[tuple[torch.Tensor, ...]], list[tuple[torch.Tensor, ...]]]:
    """Random token batches with ragged padding: (every shape, max_length-only shapes).

    With ``token_types``, each batch also has token_type_ids as text pairs have them: each
    row's tokens after a random point are segment 1 (the first row stays one text), so
    verification covers what segment ids change."""
    generator = torch.Generator().manual_seed(0)
    high = len(tokenizer)
    low = max(tokenizer.all_special_ids or [0]) + 1
    if low >= high:  # special tokens at the end of the vocabulary (or nothing else in it)
        low = 0

    def batch(size: int, length: int) -> tuple[torch.Tensor, ...]:
        length = min(length, max_length)
        input_ids = torch.randint(low, high, (size, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        for row in range(1, size):  # rows after the first are padded to varied lengths
            keep = int(torch.randint(2, length + 1, (1,), generator=generator))
            input_ids[row, keep:] = tokenizer.pad_token_id or 0
            attention_mask[row, keep:] = 0
        input_ids[:, 0] = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else low
        if not token_types:
            return input_ids, attention_mask
        token_type_ids = torch.zeros_like(input_ids)
        for row in range(1, size):
            real = int(attention_mask[row].sum())
            split = int(torch.randint(1, real, (1,), generator=generator)) if real > 1 else real
            token_type_ids[row, split:real] = 1
        return input_ids, attention_mask, token_type_ids

    dynamic = [batch(size, length) for size in batch_sizes for length in (*seq_lengths, max_length)]
    fixed = [batch(size, max_length) for size in batch_sizes]
    return dynamic, fixed


def padded(
    token_ids: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded to ``width`` (default: the longest row)."""
    width = width or max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def one_text_at_a_time(model: Any) -> Any:
    """Runs each row alone, cut to its own length: what an unbatched, unpadded call answers."""

    def reference(
        input_ids: torch.Tensor, attention_mask: torch.Tensor, *more: torch.Tensor
    ) -> torch.Tensor:
        rows = []
        for row in range(len(input_ids)):
            length = int(attention_mask[row].sum())
            rows.append(
                model(
                    *(
                        tensor[row : row + 1, :length]
                        for tensor in (input_ids, attention_mask, *more)
                    )
                )
            )
        return torch.cat(rows)

    return reference


def embedding_rows(model: Any) -> int | None:
    """Rows of a Hugging Face model's input-embedding table (None for other models)."""
    inner = getattr(model, "model", model)  # our export wrappers keep the HF model as .model
    get_embeddings = getattr(inner, "get_input_embeddings", None)
    layer = get_embeddings() if callable(get_embeddings) else None
    return int(layer.num_embeddings) if isinstance(layer, torch.nn.Embedding) else None


def check_tokenizer_fits(tokenizer: Any, rows: int | None, where: str) -> int | None:
    """Refuses a tokenizer that was not made for the model's embedding table."""
    size = len(tokenizer)
    if rows is None:
        return None
    if size > rows:
        problem = f"produces ids up to {size - 1}, past the model's {rows}-row embedding table"
    elif size * 2 < rows:
        problem = f"has {size} tokens for a model whose embedding table has {rows} rows"
    else:
        return rows
    raise ConfigError(
        f"the tokenizer in {where} {problem}: it was not made for this model. Use the tokenizer "
        "saved with the checkpoint (tokenizer.save_pretrained into the model folder), or, if "
        "you added tokens, call model.resize_token_embeddings(len(tokenizer)) before saving"
    )


def _check_largest_id_runs(model: Any, tokenizer: Any, length: int) -> None:
    """Runs the tokenizer's largest id through the model: the one check a bare graph allows."""
    mask = torch.ones((1, length), dtype=torch.long)
    with torch.inference_mode():
        try:
            model(torch.zeros_like(mask), mask)
        except Exception:
            return  # the graph fails at this shape anyway; verification reports that
        try:
            model(torch.full_like(mask, len(tokenizer) - 1), mask)
        except Exception as error:
            raise ConfigError(
                f"the model fails on the tokenizer's largest id {len(tokenizer) - 1} (is the "
                f"tokenizer the model's own?): {first_lines(error)}"
            ) from None


def output_width(model: Any, tokenizer: Any, max_length: int) -> int:
    """Runs one text; refuses a model that does not answer one (1, width) row per text.

    The text is tried unpadded, then padded to ``max_length`` (a graph traced at that length).
    """
    token_ids = tokenizer("ts-handlers")["input_ids"][:max_length]
    padding = max_length - len(token_ids)
    shapes = [
        (token_ids, [1] * len(token_ids)),
        (token_ids + [tokenizer.pad_token_id or 0] * padding, [1] * len(token_ids) + [0] * padding),
    ]
    for ids, mask in shapes:
        input_ids = torch.tensor([ids])
        try:
            with torch.inference_mode():
                output = model(input_ids, torch.tensor([mask]))
        except Exception as error:
            failure = f"the model fails on (input_ids, attention_mask) of shape 1x{len(ids)}: "
            failure += first_lines(error)
            continue
        if not isinstance(output, torch.Tensor) or output.ndim != 2 or len(output) != 1:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ConfigError(
                "the model must map (input_ids, attention_mask) to one row per text, "
                f"(batch, width); got {got}"
            )
        return int(output.shape[-1])
    raise ConfigError(failure)
