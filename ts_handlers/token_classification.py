"""Hugging Face token classification (named entities), answered as ``transformers.pipeline``.

Request: as every text task (``text/plain``, JSON ``{"inputs": "text" | ["t1", ...],
"aggregation_strategy": ..., "truncate": ...}``, a bare JSON string or list). Answer per text:
its entities, ``[{"entity_group", "score", "word", "start", "end"}, ...]`` (``"entity"`` and
``"index"`` instead of ``"entity_group"`` with aggregation ``none``); a list input gets a list
of those, in order. The entities are the pipeline's own: its ``gather_pre_entities`` and
``aggregate`` run on the exported model's logits, with the tokenizer's offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import torch

from ts_handlers.base import Decoded, entry_point
from ts_handlers.config import ConfigError
from ts_handlers.errors import InvalidInput
from ts_handlers.export import ExportPlan
from ts_handlers.payload import preview
from ts_handlers.text import (
    TextConfig,
    TextHandler,
    Tokenized,
    load_tokenizer,
    text_export_plan,
    tokenizer_files,
)
from ts_handlers.text_classification import LogitsOnly

# transformers' AggregationStrategy values.
STRATEGIES = ("none", "simple", "first", "average", "max")


@dataclass(frozen=True)
class TokenClassificationConfig(TextConfig):
    mode: str = "token_classification"
    aggregation_strategy: str = "simple"  # the default; a request may choose another
    ignore_labels: tuple[str, ...] = ("O",)  # labels never answered, as the pipeline's

    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **TextConfig.CHOICES,
        "mode": ("token_classification",),
        "save_mode": ("torchscript",),
        "aggregation_strategy": STRATEGIES,
    }


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
    request_options = ("aggregation_strategy", "truncate")
    token_outputs = True

    def setup(self) -> None:
        super().setup()
        labels = self.labels or self.export_metadata["labels"]
        self.pipeline = pipeline_postprocessing(self.tokenizer, labels)

    def parse_options(self, raw: dict[str, Any]) -> dict[str, Any]:
        strategy = raw.get("aggregation_strategy")
        if strategy is not None and strategy not in STRATEGIES:
            raise InvalidInput(
                f"aggregation_strategy must be one of {', '.join(STRATEGIES)}, "
                f"got {preview(strategy)}"
            )
        strategy = strategy or self.config.aggregation_strategy
        return {**super().parse_options(raw), "aggregation_strategy": strategy}

    def encode(self, outputs: list[torch.Tensor], decoded: Decoded) -> Any:
        from transformers.pipelines.token_classification import AggregationStrategy

        strategy = AggregationStrategy(decoded.options["aggregation_strategy"])
        answers = [
            self.entities(item, logits, strategy)
            for item, logits in zip(decoded.inputs, outputs, strict=True)
        ]
        return answers[0] if decoded.single else answers

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
            {key: float(value) if key == "score" else value for key, value in entity.items()}
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
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(str(folder), local_files_only=True)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and config.max_length > positions:
        raise ConfigError(
            f"max_length is {config.max_length} but the checkpoint reads at most {positions} "
            "tokens (max_position_embeddings); lower max_length"
        )
    labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    metadata = {"num_classes": len(labels), "labels": labels}
    model = LogitsOnly(model.eval()).eval()
    plan = text_export_plan(config, model, tokenizer, tokenizer_files(folder), metadata)
    plan.num_classes = len(labels)
    return plan


handle = entry_point(TokenClassificationHandler)
