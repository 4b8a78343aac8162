"""Hugging Face sequence classification, verified against ``transformers.pipeline``.

Request: ``text/plain``, JSON ``{"inputs": "text" | ["t1", ...], "top_k": k}``, or a bare JSON
string or list. Answer per text: ``[{"label": ..., "score": ...}, ...]`` sorted by score (all
labels unless ``top_k``); a list input gets a list of those, in order.

``POST /explanations/<model>`` returns per-token layer-integrated-gradients attributions when the
archive was built with ``save_mode: pretrained`` and ``captum_explanation: true``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ts_handlers.base import Decoded, entry_point, top_k_labels
from ts_handlers.config import ConfigError
from ts_handlers.errors import InvalidInput
from ts_handlers.export import ExportPlan
from ts_handlers.payload import int_option
from ts_handlers.text import (
    TextConfig,
    TextHandler,
    Tokenized,
    load_tokenizer,
    text_export_plan,
    tokenizer_files,
    use_offline_hub,
)


@dataclass(frozen=True)
class TextClassificationConfig(TextConfig):
    mode: str = "sequence_classification"
    num_labels: int | None = None
    # Explanations need the eager model, so they require save_mode "pretrained".
    captum_explanation: bool = False
    # Attribute of the model holding the embeddings layer to attribute over ("bert", "roberta").
    embedding_name: str = "bert"
    top_k: int | None = None  # None: every label
    explanation_steps: int = 50

    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **TextConfig.CHOICES,
        "mode": ("sequence_classification",),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("num_labels", "top_k", "explanation_steps"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be at least 1, got {value}")


class LogitsOnly(nn.Module):
    """Returns the logits tensor alone, so the model traces cleanly under transformers 5."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]


class TransformerClassificationHandler(TextHandler):
    config_class = TextClassificationConfig
    request_options = ("top_k", "truncate")

    def load_model(self) -> Any:
        if self.config.save_mode == "pretrained":
            self.eager_model = load_classifier(self.model_dir).to(self.device)
            return LogitsOnly(self.eager_model)
        return super().load_model()

    def setup(self) -> None:
        super().setup()
        if self.labels is None:
            self.labels = labels_from_checkpoint(self.model_dir)

    def parse_options(self, raw: dict[str, Any]) -> dict[str, Any]:
        default = self.config.top_k or len(self.labels)
        return {
            **super().parse_options(raw),
            "top_k": int_option("top_k", raw.get("top_k"), default),
        }

    def run_model(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(input_ids, attention_mask).float(), dim=-1)

    def encode(self, outputs: list[torch.Tensor], decoded: Decoded) -> Any:
        answers = [top_k_labels(probs, self.labels, decoded.options["top_k"]) for probs in outputs]
        return answers[0] if decoded.single else answers

    def explain_inputs(self, inputs: list[Tokenized], decoded: Decoded) -> Any:
        if self.config.save_mode != "pretrained" or not self.config.captum_explanation:
            raise InvalidInput(
                "explanations need an archive built with save_mode 'pretrained' and "
                "captum_explanation true; this one is "
                f"save_mode {self.config.save_mode!r}, captum_explanation "
                f"{str(self.config.captum_explanation).lower()}"
            )
        answers = [self._explain_one(item) for item in inputs]
        return answers[0] if decoded.single else answers

    def _explain_one(self, item: Tokenized) -> dict[str, Any]:
        try:
            from captum.attr import LayerIntegratedGradients
        except ImportError:  # pragma: no cover - depends on the serving environment
            raise InvalidInput(
                "explanations need captum in the TorchServe environment: "
                "pip install 'ts-handlers[explain]'"
            ) from None
        # One text, unpadded (even where the archive pads batches): one attribution per token.
        input_ids = torch.tensor([item.input_ids], device=self.device)
        attention_mask = torch.ones_like(input_ids)
        baseline = torch.full_like(input_ids, self.tokenizer.pad_token_id or 0)
        baseline[:, 0], baseline[:, -1] = input_ids[:, 0], input_ids[:, -1]  # keep [CLS]/[SEP]
        with torch.no_grad():
            probabilities = torch.softmax(self.model(input_ids, attention_mask).float(), dim=-1)[0]
        target = int(probabilities.argmax())
        embeddings = getattr(self.eager_model, self.config.embedding_name).embeddings
        integrated = LayerIntegratedGradients(self.model, embeddings)
        attributions, delta = integrated.attribute(
            input_ids,
            baselines=baseline,
            additional_forward_args=(attention_mask,),
            target=target,
            n_steps=self.config.explanation_steps,
            return_convergence_delta=True,
        )
        scores = attributions.sum(dim=-1)[0]
        scores = scores / scores.norm().clamp_min(1e-12)
        return {
            "label": self.labels[target],
            "score": float(probabilities[target]),
            "tokens": self.tokenizer.convert_ids_to_tokens(item.input_ids),
            "attributions": [float(value) for value in scores.detach().cpu()],
            "delta": float(delta.detach().cpu().abs().max()),
        }


def load_classifier(folder: str | Path) -> nn.Module:
    use_offline_hub()
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True)
    return model.eval()


def labels_from_checkpoint(folder: Path) -> list[str]:
    """Class names from the checkpoint's config.json ``id2label``, ordered by class index."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    id2label = config.get("id2label") or {}
    return [str(id2label[key]) for key in sorted(id2label, key=int)]


def prepare_export(config: TextClassificationConfig) -> ExportPlan:
    folder = Path(config.model_name)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model_name {config.model_name!r} is not a checkpoint folder")
    model = load_classifier(folder)
    num_labels = model.config.num_labels
    if config.num_labels is not None and config.num_labels != num_labels:
        raise ConfigError(
            f"num_labels is {config.num_labels} but the checkpoint has {num_labels} labels"
        )
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and config.max_length > positions:
        raise ConfigError(
            f"max_length is {config.max_length} but the checkpoint reads at most {positions} "
            "tokens (max_position_embeddings); lower max_length"
        )
    metadata = {"num_labels": num_labels, "labels": labels_from_checkpoint(folder)}
    if config.save_mode == "pretrained":
        files = [path for path in folder.iterdir() if path.is_file() and path.suffix != ".tsv"]
        return ExportPlan(model=None, extra_files=files, metadata=metadata)
    return text_export_plan(
        config, LogitsOnly(model).eval(), load_tokenizer(folder), tokenizer_files(folder), metadata
    )


handle = entry_point(TransformerClassificationHandler)
