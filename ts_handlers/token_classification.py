"""Hugging Face token classification (named entities), answered as ``transformers.pipeline``.

Request: as every text task (``text/plain``, JSON ``{"inputs": "text" | ["t1", ...],
"aggregation_strategy": ..., "truncate": ...}``, a bare JSON string or list). Answer per text:
its entities, ``[{"entity_group", "score", "word", "start", "end"}, ...]`` (``"entity"`` and
``"index"`` instead of ``"entity_group"`` with aggregation ``none``); a list input gets a list
of those, in order. The entities are the pipeline's own: its ``gather_pre_entities`` and
``aggregate`` run on the exported model's logits, with the tokenizer's offsets.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Annotated, Any, Literal, get_args

import numpy as np
import torch
from pydantic import BeforeValidator, Field

from ts_handlers.base import Decoded, entry_point
from ts_handlers.config import SETUP_CONFIG_FILE, ConfigError, PositiveInt, StrTuple
from ts_handlers.errors import InvalidInput, PayloadTooLarge
from ts_handlers.protocols import OutputTensor, json_per_input
from ts_handlers.tasks import Task
from ts_handlers.text import (
    CHARS_PER_TOKEN,
    MAX_FLOAT_CHARS,
    TextConfig,
    TextHandler,
    TextOptions,
    Tokenized,
    tokens_run,
)

# transformers' AggregationStrategy values.
Strategy = Literal["none", "simple", "first", "average", "max"]
STRATEGIES = get_args(Strategy)
# JSON keys, quotes and separators of one entity, and its index/start/end numbers.
ENTITY_BYTES = 96


class TokenClassificationConfig(TextConfig):
    mode: Literal["token_classification"] = "token_classification"
    save_mode: Literal["torchscript", "aot_inductor", "onnx"] = "torchscript"
    aggregation_strategy: Strategy = "simple"  # the default; a request may choose another
    ignore_labels: StrTuple = ("O",)  # labels never answered, as the pipeline's
    # TorchServe's example key: when given, the model's label count must equal it.
    num_labels: PositiveInt | None = None
    # The pipeline's stride: a text over max_length is read whole, in windows of max_length
    # tokens that overlap by this many; None: the text is truncated. The default of the
    # per-request "stride".
    stride: Annotated[int, Field(ge=0)] | None = None


def _no_bool(value: Any) -> Any:
    """true is not a stride (lax int parsing would read it as 1)."""
    if isinstance(value, bool):
        raise ValueError("stride must be a whole number of tokens, not true/false")
    return value


class TokenClassificationOptions(TextOptions):
    aggregation_strategy: Strategy | None = None
    stride: Annotated[int, BeforeValidator(_no_bool), Field(ge=0)] | None = None


def pipeline_postprocessing(tokenizer: Any, labels: list[str]) -> Any:
    """transformers' TokenClassificationPipeline with no model: only its post-processing runs.

    ``gather_pre_entities`` and ``aggregate`` read nothing but ``tokenizer`` and
    ``model.config.id2label``, so they serve a TorchScript graph's logits as they serve eager.
    """
    from transformers import TokenClassificationPipeline

    postprocessing = TokenClassificationPipeline.__new__(TokenClassificationPipeline)
    postprocessing.tokenizer = tokenizer
    postprocessing.model = SimpleNamespace(config=SimpleNamespace(id2label=dict(enumerate(labels))))
    return postprocessing


class TokenClassificationHandler(
    TextHandler[TokenClassificationConfig, TokenClassificationOptions]
):
    config_class = TokenClassificationConfig
    options_class = TokenClassificationOptions
    token_outputs = True

    def setup(self) -> None:
        if not self.export_metadata:
            raise ConfigError(
                "the archive's graph carries no ts_handlers.json (it was made by hand): "
                "TokenClassificationHandler serves graphs exported by ts-handlers build, which "
                "records the labels and verifies the export; run `ts-handlers init <checkpoint>` "
                "and `ts-handlers build` (docs/migrating-from-torchserve-examples.md)"
            )
        super().setup()
        labels = self.labels or self.export_metadata["labels"]
        if self.config.num_labels is not None and self.config.num_labels != len(labels):
            raise ConfigError(
                f"num_labels is {self.config.num_labels} but the model has {len(labels)} "
                "labels; correct num_labels or leave it out"
            )
        self.pipeline = pipeline_postprocessing(self.tokenizer, labels)

    def with_defaults(self, options: TokenClassificationOptions) -> Any:
        strategy = options.aggregation_strategy or self.config.aggregation_strategy
        stride = self.config.stride if options.stride is None else options.stride
        if stride is not None:
            window = self.config.max_length - self.tokenizer.num_special_tokens_to_add()
            if stride >= window:
                raise InvalidInput(
                    f"stride={stride} must be below the {window} tokens of text a window of "
                    f"max_length {self.config.max_length} holds"
                )
            if strategy == "none":
                raise InvalidInput(
                    'stride reads a text in overlapping windows, which aggregation_strategy "none" '
                    "cannot merge; choose simple, first, average or max (as the pipeline asks)"
                )
        return options.model_copy(update={"aggregation_strategy": strategy, "stride": stride})

    @property
    def _entity_bytes(self) -> int:
        longest_label = max(map(len, self.pipeline.model.config.id2label.values()))
        return ENTITY_BYTES + longest_label + MAX_FLOAT_CHARS

    def answer_bytes_per_text(self, options: TokenClassificationOptions) -> int:
        """At most one entity per token, each with its word (escaped, at most 6 bytes a
        character), label, score and positions. With stride the bound is taken once the texts
        are tokenized (decode_texts): a text has as many tokens as it has."""
        if options.stride is not None:
            return 0
        return self.config.max_length * self._entity_bytes + 6 * self.config.max_text_chars

    def decode_texts(
        self, texts: list[str], options: Any, single: bool, field: str = "inputs"
    ) -> Decoded[TokenClassificationOptions]:
        """With ``stride``, each text in the pipeline's overlapping windows (one model input
        each, counted against max_tokens_per_request and the batch's budget); else truncated."""
        if options.stride is None:
            return super().decode_texts(texts, options, single, field)
        config = self.config
        budget = config.max_tokens_per_request * CHARS_PER_TOKEN
        chars = sum(len(text) for text in texts)
        if chars > budget:  # read whole: every character counts
            raise PayloadTooLarge(
                f"with stride the texts are read whole: {chars} characters, over the "
                f"{budget} that {config.max_tokens_per_request} tokens per request "
                f"({SETUP_CONFIG_FILE} max_tokens_per_request) allow, {CHARS_PER_TOKEN} per "
                "token. Send fewer or shorter texts"
            )
        inputs: list[Tokenized] = []
        tokens = 0
        answer = 2
        for index, text in enumerate(texts):
            windows = self.windows(text, index, options.stride, field)
            tokens += sum(len(window.input_ids) for window in windows)
            if tokens > config.max_tokens_per_request:
                raise PayloadTooLarge(
                    f"{field}[:{index + 1}] are already {tokens} tokens in windows of stride "
                    f"{options.stride}; the limit is {config.max_tokens_per_request} tokens per "
                    f"request ({SETUP_CONFIG_FILE} max_tokens_per_request). Send fewer or "
                    "shorter texts, or a smaller stride"
                )
            answer += 2 + sum(len(w.input_ids) for w in windows) * self._entity_bytes
            answer += 6 * len(text)
            inputs.extend(windows)
        if answer > config.max_response_size:
            raise PayloadTooLarge(
                f"the entities of these texts could take {answer} bytes, over the limit of "
                f"{config.max_response_size} ({SETUP_CONFIG_FILE} max_response_size); send "
                "fewer or shorter texts"
            )
        return Decoded(inputs, options, single, tokens=tokens_run(inputs))

    def windows(self, text: str, index: int, stride: int, field: str) -> list[Tokenized]:
        """The text's windows, as the pipeline's tokenizer call with ``stride`` makes them."""
        if not text.strip():
            raise InvalidInput(f"{field}[{index}] is empty or whitespace only")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise InvalidInput(
                f"{field}[{index}] has an unpaired surrogate at char {error.start}; "
                "send valid Unicode text"
            ) from None
        if self.config.do_lower_case:
            text = text.lower()
        self.tokenizer.truncation_side = "right"
        encoding = self.tokenizer(
            text,
            truncation=True,
            max_length=self.config.max_length,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        return [
            Tokenized(
                input_ids=ids,
                text=text,
                offsets=offsets,
                special_tokens_mask=mask,
                first_window=position == 0,
            )
            for position, (ids, offsets, mask) in enumerate(
                zip(
                    encoding["input_ids"],
                    encoding["offset_mapping"],
                    encoding["special_tokens_mask"],
                    strict=True,
                )
            )
        ]

    def encode(
        self, outputs: list[torch.Tensor], decoded: Decoded[TokenClassificationOptions]
    ) -> Any:
        from transformers.pipelines.token_classification import AggregationStrategy

        strategy = AggregationStrategy(decoded.options.aggregation_strategy)
        # One list of entities per text: a text read in windows (stride) has several inputs,
        # whose entities are merged where they overlap, as the pipeline merges them.
        texts: list[list[list[dict]]] = []
        for item, logits in zip(decoded.inputs, outputs, strict=True):
            if item.first_window:
                texts.append([])
            texts[-1].append(self.entities(item, logits, strategy))
        answers = [
            windows[0]
            if len(windows) == 1
            else self.pipeline.aggregate_overlapping_entities([e for w in windows for e in w])
            for windows in texts
        ]
        return answers

    def kserve_outputs(
        self, outputs: list[torch.Tensor], decoded: Decoded[TokenClassificationOptions]
    ) -> list[OutputTensor]:
        # Entities per text vary in number and fields: one JSON list per text.
        return [json_per_input("entities", self.encode(outputs, decoded))]

    def entities(self, item: Tokenized, logits: torch.Tensor, strategy: Any) -> list[dict]:
        scores = torch.softmax(logits.float(), dim=-1).numpy()
        found = self.pipeline.aggregate(
            self.pipeline.gather_pre_entities(
                item.text, item.input_ids, scores, item.offsets, item.special_tokens_mask, strategy
            ),
            strategy,
        )
        ignore = self.config.ignore_labels
        return [
            {key: np.float32(value) if key == "score" else value for key, value in entity.items()}
            for entity in found
            if entity.get("entity", entity.get("entity_group")) not in ignore
        ]


handle = entry_point(TokenClassificationHandler)
TASK = Task(
    TokenClassificationConfig,
    TokenClassificationOptions,
    TokenClassificationHandler,
    export="ts_handlers.exporters.token_classification:prepare_export",
    extra="text",
    init="ts_handlers.exporters.token_classification:init_setup",
    init_takes="a Hugging Face *ForTokenClassification folder",
    answer="ts_handlers.exporters.token_classification:format_answer",
)
