"""Hugging Face token classification (named entities), answered as ``transformers.pipeline``.

Request: as every text task (``text/plain``, JSON ``{"inputs": "text" | ["t1", ...],
"aggregation_strategy": ..., "truncate": ...}``, a bare JSON string or list). Answer per text:
its entities, ``[{"entity_group", "score", "word", "start", "end"}, ...]`` (``"entity"`` and
``"index"`` instead of ``"entity_group"`` with aggregation ``none``); a list input gets a list
of those, in order. The entities are the pipeline's own: its ``gather_pre_entities`` and
``aggregate`` run on the exported model's logits, with the tokenizer's offsets.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, get_args

import numpy as np
import torch

from ts_handlers.base import Decoded, entry_point
from ts_handlers.config import ConfigError, PositiveInt, StrTuple
from ts_handlers.export import ExportPlan
from ts_handlers.protocols import OutputTensor, json_per_input
from ts_handlers.tasks import Task
from ts_handlers.text import (
    MAX_FLOAT_CHARS,
    LogitsOnly,
    TextConfig,
    TextHandler,
    TextOptions,
    Tokenized,
    checkpoint_labels,
    load_pretrained,
    load_tokenizer,
    text_export_plan,
    tokenizer_files,
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


class TokenClassificationOptions(TextOptions):
    aggregation_strategy: Strategy | None = None


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


class TokenClassificationHandler(TextHandler):
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
        return options.model_copy(update={"aggregation_strategy": strategy})

    def answer_bytes_per_text(self, options: Any) -> int:
        """At most one entity per token, each with its word (escaped, at most 6 bytes a
        character), label, score and positions."""
        longest_label = max(map(len, self.pipeline.model.config.id2label.values()))
        per_entity = ENTITY_BYTES + longest_label + MAX_FLOAT_CHARS
        return self.config.max_length * per_entity + 6 * self.config.max_text_chars

    def encode(self, outputs: list[torch.Tensor], decoded: Decoded) -> Any:
        from transformers.pipelines.token_classification import AggregationStrategy

        strategy = AggregationStrategy(decoded.options.aggregation_strategy)
        answers = [
            self.entities(item, logits, strategy)
            for item, logits in zip(decoded.inputs, outputs, strict=True)
        ]
        return answers[0] if decoded.single else answers

    def kserve_outputs(self, outputs: list[torch.Tensor], decoded: Decoded) -> list[OutputTensor]:
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


def prepare_export(config: TokenClassificationConfig) -> ExportPlan:
    """Traces the checkpoint's logits, (texts, tokens, labels); the build verifies the trace."""
    folder = Path(config.model_name)
    if config.serialized_file or not (folder / "config.json").is_file():
        raise ConfigError(
            f"model_name {config.model_name!r} must be a checkpoint folder (save_pretrained "
            "files and tokenizer); token_classification takes no serialized_file"
        )
    tokenizer = load_tokenizer(folder)  # offline from here on
    if not tokenizer.is_fast:
        raise ConfigError("token_classification needs a fast tokenizer (tokenizer.json)")
    model = load_pretrained("AutoModelForTokenClassification", folder, config.max_length)
    labels = checkpoint_labels(model)
    metadata = {"num_classes": len(labels), "labels": labels}
    model = LogitsOnly(model.eval()).eval()
    plan = text_export_plan(config, model, tokenizer, tokenizer_files(folder), metadata)
    plan.num_classes = len(labels)
    plan.gate_rows = token_scores
    return plan


def token_scores(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The label scores of every real token, (tokens, labels): what the gates compare."""
    return torch.softmax(logits[attention_mask.bool()], dim=-1)


handle = entry_point(TokenClassificationHandler)
TASK = Task(
    TokenClassificationConfig,
    TokenClassificationOptions,
    TokenClassificationHandler,
    prepare_export,
)
