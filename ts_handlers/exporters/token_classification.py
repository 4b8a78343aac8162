"""The token_classification export: a Hugging Face checkpoint's logits per token, traced.

Export-time only; a worker never imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ts_handlers.config import ConfigError
from ts_handlers.export import ExportPlan
from ts_handlers.exporters.text import checkpoint_setup, text_export_plan, tokenizer_files
from ts_handlers.tasks import InitSetup
from ts_handlers.text import LogitsOnly, checkpoint_labels, load_pretrained, load_tokenizer
from ts_handlers.token_classification import TokenClassificationConfig


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


# ---- for the tools: how init recognises a model of this task, how predict prints an answer --


def init_setup(model_path: Path, relative: str, options: dict[str, Any]) -> InitSetup | None:
    return checkpoint_setup(model_path, relative, "token_classification", "ForTokenClassification")


def format_answer(answer: Any, inputs: Sequence[str] | None) -> str | None:
    """Entities as rows: group (or label), score, character span, the words."""
    entities = isinstance(answer, list) and bool(answer)
    entities = entities and all(
        isinstance(item, dict) and ("entity_group" in item or "entity" in item) for item in answer
    )
    if not entities:
        return None
    rows = [
        (
            str(item.get("entity_group", item.get("entity"))),
            f"{item.get('score', float('nan')):.4f}",
            f"{item.get('start', '')}-{item.get('end', '')}",
            repr(item.get("word", "")),
        )
        for item in answer
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join(
        f"{label:<{widths[0]}}  {score:>{widths[1]}}  {span:>{widths[2]}}  {word}"
        for label, score, span, word in rows
    )
