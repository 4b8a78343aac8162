"""Hugging Face sequence classification, verified against ``transformers.pipeline``.

Request: ``text/plain``, JSON ``{"inputs": "text" | ["t1", ...], "top_k": k,
"function_to_apply": "softmax" | "sigmoid" | "none"}``, or a bare JSON string or list. Text
pairs as ``transformers.pipeline`` takes them: ``{"inputs": {"text": a, "text_pair": b}}`` or a
list of those (mixed with plain texts if need be), tokenized as ``tokenizer(a, b)`` with the
segment ids the model reads. A cross-encoder (one output) also reranks: ``{"query": q,
"texts": [...]}`` on ``/predictions/<model>/<version>/rerank`` or ``/predictions/<model>``
(rerank.py). Answer
per text: ``[{"label": ..., "score": ...}, ...]`` sorted by score (all labels unless ``top_k``);
a list input gets a list of those, in order. Scores are what the pipeline answers for the
checkpoint's ``problem_type``: softmax (single label), sigmoid (multi-label, or one output with
no problem type) or the raw value (regression).

``POST /explanations/<model>`` returns per-token layer-integrated-gradients attributions when the
archive was built with ``save_mode: pretrained`` and ``captum_explanation: true``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import model_validator
from torch import nn

from ts_handlers.base import Decoded, entry_point, top_k_labels
from ts_handlers.batch import Route
from ts_handlers.config import (
    SETUP_CONFIG_FILE,
    ConfigError,
    OptionInt,
    PositiveInt,
    read_json_object,
)
from ts_handlers.errors import InvalidInput, PayloadTooLarge
from ts_handlers.labels import check_label_count
from ts_handlers.protocols import OutputTensor, labels_and_scores
from ts_handlers.rerank import RERANK_PATH, Rerank, activation_for
from ts_handlers.tasks import Task
from ts_handlers.text import (
    MAX_FLOAT_CHARS,
    TOKEN_TYPE_INPUTS,
    LogitsOnly,
    TextConfig,
    TextHandler,
    TextOptions,
    Tokenized,
    answer_bytes,
    checkpoint_labels,
    embedding_rows,
    load_archive_tokenizer,
    load_pretrained,
    uses_token_types,
)

# transformers.pipeline's ``function_to_apply`` values.
Function = Literal["softmax", "sigmoid", "none"]
FUNCTIONS = get_args(Function)
# An explanation has a cost per text whatever its length (a forward for the prediction,
# captum's set-up, small kernels): measured on 2 cores, a text of up to about 32 tokens costs
# about what a 32-token text costs, so every text counts as at least this many tokens.
MIN_EXPLANATION_TOKENS = 32


class SequenceClassificationConfig(TextConfig):
    mode: Literal["sequence_classification"] = "sequence_classification"
    num_labels: PositiveInt | None = None
    # What turns logits into scores, as transformers.pipeline names it. None: decided by the
    # checkpoint's problem_type and num_labels, as the pipeline decides (see function_for).
    function_to_apply: Function | None = None
    # Explanations need the eager model, so they require save_mode "pretrained".
    captum_explanation: bool = False
    # The layer explanations attribute over: a module path ("bert.embeddings"), or the base
    # model's attribute name as TorchServe's handler takes it ("bert"). Empty: the layer that
    # holds the model's input embeddings, found by the export.
    embedding_name: str = ""
    top_k: PositiveInt | None = None  # None: every label
    # Integrated-gradients steps per explained text. An explanation runs the model forward and
    # backward on steps x tokens positions, so its cost is counted in token-steps.
    explanation_steps: PositiveInt = 50
    # Texts in one explanation request; more: 413.
    max_explanation_texts: PositiveInt = 4
    # Explanation work one handled batch may run: the sum of tokens x explanation_steps over
    # its explanation texts, each counted as at least MIN_EXPLANATION_TOKENS tokens (6400: one
    # text of 128 tokens, or four short ones, at 50 steps). A request over it alone: 413;
    # requests past it in a batch: 429 with Retry-After (docs/sequence_classification.md).
    max_explanation_token_steps: PositiveInt = 6400

    @model_validator(mode="after")
    def _one_text_can_be_explained(self) -> SequenceClassificationConfig:
        length = max(self.max_length, MIN_EXPLANATION_TOKENS)
        worst = length * self.explanation_steps
        # Only an eager model explains; on a graph, explanation requests get 400 saying so.
        explains = self.captum_explanation and self.save_mode == "pretrained"
        if explains and worst > self.max_explanation_token_steps:
            if "explanation_steps" not in self.model_fields_set:
                # Left at its default (TorchServe's example file has max_length 150): the most
                # steps one full-length text fits in the budget, rather than a refusal.
                steps = max(self.max_explanation_token_steps // length, 1)
                self.__dict__["explanation_steps"] = steps  # frozen: set during validation
                return self
            raise ValueError(
                f"explaining one text of max_length {self.max_length} tokens at "
                f"explanation_steps {self.explanation_steps} is {worst} token-steps, over "
                f"max_explanation_token_steps {self.max_explanation_token_steps}; lower "
                "explanation_steps or max_length, or raise max_explanation_token_steps (and "
                "responseTimeout in model-config.yaml with it)"
            )
        return self


class SequenceClassificationOptions(TextOptions):
    top_k: OptionInt | None = None
    function_to_apply: Function | None = None


def function_for(problem_type: str | None, num_labels: int) -> str:
    """The pipeline's default: regression -> none; multi-label or one output -> sigmoid."""
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    return "softmax"


def apply_function(logits: torch.Tensor, function: str) -> torch.Tensor:
    if function == "softmax":
        return torch.softmax(logits, dim=-1)
    if function == "sigmoid":
        return torch.sigmoid(logits)
    return logits


class SequenceClassificationHandler(
    TextHandler[SequenceClassificationConfig, SequenceClassificationOptions]
):
    config_class = SequenceClassificationConfig
    options_class = SequenceClassificationOptions
    explanation_budget = "max_explanation_token_steps"
    reads_text_pairs = True

    def load_model(self) -> Any:
        if self.config.save_mode == "pretrained":
            self.eager_model = load_classifier(self.model_dir).to(self.device)
            if self.config.captum_explanation:  # a wrong layer fails the load, not a request
                self.embedding_layer = embedding_layer(
                    self.eager_model, self.config.embedding_name
                )[1]
            self.export_metadata = checkpoint_metadata(self.eager_model, self.model_dir)
            return LogitsOnly(self.eager_model)
        model = super().load_model()
        if not self.export_metadata:
            return self.load_handmade(model)
        inputs = tuple(self.export_metadata.get("inputs") or ())
        self.token_types = "token_type_ids" in inputs
        if inputs == TOKEN_TYPE_INPUTS:  # our own export of a model that reads segment ids
            return model
        if inputs and inputs != ("input_ids", "attention_mask"):
            # A user's graph with its own inputs, recorded by ts-handlers import.
            from ts_handlers.handmade import TextGraph

            self.same_length_batches = bool(self.export_metadata.get("same_length_batches"))
            return TextGraph(model, inputs)
        return model

    def load_handmade(self, graph: Any) -> Any:
        """A graph from an archive made by hand (no ts_handlers.json): its inputs, class count
        and padding policy derived and checked now, as the build would have (handmade.py)."""
        from ts_handlers.handmade import derive_text_graph

        self.tokenizer = load_archive_tokenizer(self.model_dir)
        model, derived = derive_text_graph(
            graph,
            self.tokenizer,
            self.config.max_length,
            pad_to_max_length=self.config.pad_to_max_length,
            atol=self.config.verify_atol,
        )
        checkpoint = read_json_object(self.model_dir / "config.json") or {}
        id2label = checkpoint.get("id2label") or {}
        self.export_metadata = {
            **derived.metadata(),
            "labels": [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(derived.num_classes)],
            "problem_type": checkpoint.get("problem_type"),
        }
        if derived.pad_to_max_length != self.config.pad_to_max_length:
            self.config = self.config.replace(pad_to_max_length=derived.pad_to_max_length)
        self.same_length_batches = derived.same_length_batches
        self.token_types = "token_type_ids" in derived.inputs
        return model

    def embedding_rows(self) -> int | None:
        if self.config.save_mode == "pretrained":
            return embedding_rows(self.eager_model)
        return super().embedding_rows()

    def num_classes(self) -> int | None:
        metadata = self.export_metadata
        return metadata.get("num_classes", metadata.get("num_labels"))

    def setup(self) -> None:
        super().setup()
        if self.config.save_mode == "pretrained":
            checkpoint = self.eager_model.config
            self.token_types = uses_token_types(
                self.tokenizer, checkpoint, self.eager_model.forward
            )
        else:
            checkpoint = read_json_object(self.model_dir / "config.json") or {}
        # Pairs whose segment ids this graph cannot take are refused (text.py) rather than
        # answered differently from the pipeline.
        self.pairs_need_token_types = uses_token_types(self.tokenizer, checkpoint)
        # The rerank score's activation, for a cross-encoder (one output): as the build
        # recorded it, else as CrossEncoder reads it from the archive's files.
        self.score_activation = self.export_metadata.get("rerank_activation")
        if self.score_activation is None and self.num_classes() == 1:
            self.score_activation = activation_for(checkpoint, self.model_dir)
        metadata = self.export_metadata
        num_classes = int(self.num_classes())
        if self.config.num_labels is not None and self.config.num_labels != num_classes:
            raise ConfigError(
                f"{SETUP_CONFIG_FILE} num_labels is {self.config.num_labels} but the model "
                f"outputs {num_classes} classes; correct num_labels or leave it out"
            )
        if self.labels is None:
            self.labels = metadata.get("labels") or [f"LABEL_{i}" for i in range(num_classes)]
        check_label_count(self.labels, num_classes, "the archive's labels")
        self.function = self.config.function_to_apply or function_for(
            metadata.get("problem_type"), num_classes
        )
        # The longest {"label": ..., "score": ...} entry an answer can hold, as JSON writes it.
        self.entry_bytes = MAX_FLOAT_CHARS + max(
            len(json.dumps({"label": label, "score": 0})) - 1 for label in self.labels
        )

    def with_defaults(self, options: SequenceClassificationOptions) -> Any:
        return options.model_copy(
            update={
                "top_k": options.top_k or self.config.top_k or len(self.labels),
                "function_to_apply": options.function_to_apply or self.function,
            }
        )

    def run_model(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if token_type_ids is None:
            return self.model(input_ids, attention_mask).float()
        return self.model(input_ids, attention_mask, token_type_ids).float()

    def route(self, path: str) -> Route:
        if path == RERANK_PATH:
            return Route(Rerank())
        return super().route(path)

    def answer_bytes_per_text(self, options: SequenceClassificationOptions) -> int:
        """top_k entries (at most one per label), each at most ``entry_bytes``."""
        return answer_bytes(min(options.top_k, len(self.labels)), self.entry_bytes)

    def encode(
        self, outputs: list[torch.Tensor], decoded: Decoded[SequenceClassificationOptions]
    ) -> Any:
        function, top_k = decoded.options.function_to_apply, decoded.options.top_k
        answers = [
            top_k_labels(apply_function(logits, function), self.labels, top_k) for logits in outputs
        ]
        return answers

    def kserve_outputs(
        self, outputs: list[torch.Tensor], decoded: Decoded[SequenceClassificationOptions]
    ) -> list[OutputTensor]:
        return labels_and_scores(self.encode(outputs, decoded))

    def explanation_cost(self, decoded: Decoded[SequenceClassificationOptions]) -> int:
        """Token-steps the request would run; refuses, before any work, an archive that cannot
        explain (400) and a request over max_explanation_texts or max_explanation_token_steps
        (413)."""
        self._check_explains()
        if any(item.pair for item in decoded.inputs):
            raise InvalidInput(
                "explanations take single texts; a text pair (or a rerank request) is "
                "answered by /predictions"
            )
        config = self.config
        texts = len(decoded.inputs)
        if texts > config.max_explanation_texts:
            raise PayloadTooLarge(
                f"{texts} texts in one explanation request; the limit is "
                f"{config.max_explanation_texts} ({SETUP_CONFIG_FILE} max_explanation_texts). "
                "Send them in several requests"
            )
        tokens = sum(max(len(item.input_ids), MIN_EXPLANATION_TOKENS) for item in decoded.inputs)
        cost = tokens * config.explanation_steps
        if cost > config.max_explanation_token_steps:
            raise PayloadTooLarge(
                f"explaining these {texts} texts counts {tokens} tokens (each at least "
                f"{MIN_EXPLANATION_TOKENS}) x {config.explanation_steps} steps = {cost} "
                "token-steps; one batch runs at most "
                f"{config.max_explanation_token_steps} ({SETUP_CONFIG_FILE} "
                "max_explanation_token_steps). Send fewer or shorter texts per request"
            )
        return cost

    def explain_inputs(
        self, inputs: list[Tokenized], decoded: Decoded[SequenceClassificationOptions]
    ) -> Any:
        self._check_explains()
        return [self._explain_one(item) for item in inputs]

    def _check_explains(self) -> None:
        if self.config.save_mode != "pretrained" or not self.config.captum_explanation:
            raise InvalidInput(
                "explanations need an archive built with save_mode 'pretrained' and "
                "captum_explanation true; this one is "
                f"save_mode {self.config.save_mode!r}, captum_explanation "
                f"{str(self.config.captum_explanation).lower()}"
            )

    def _explain_one(self, item: Tokenized) -> dict[str, Any]:
        target, scores, attributions, delta = integrated_gradients(
            self.model,
            self.embedding_layer,
            item.input_ids,
            self.tokenizer.pad_token_id or 0,
            self.config.explanation_steps,
        )
        return {
            "label": self.labels[target],
            "score": float(apply_function(scores, self.function)[target]),
            "tokens": self.tokenizer.convert_ids_to_tokens(item.input_ids),
            "attributions": attributions,
            "delta": delta,
        }


def integrated_gradients(
    model: nn.Module, layer: nn.Module, token_ids: list[int], pad_id: int, steps: int
) -> tuple[int, torch.Tensor, list[float], float]:
    """Layer integrated gradients for one unpadded text, for its top class.

    Returns (target class, the logits, one normalised attribution per token, the convergence
    delta). The baseline is the text with every token but the first and last replaced by
    padding, so [CLS]/[SEP] (or <s>/</s>) keep their places.
    """
    try:
        from captum.attr import LayerIntegratedGradients
    except ImportError:  # pragma: no cover - depends on the serving environment
        raise InvalidInput(
            "explanations need captum in the TorchServe environment: "
            "pip install 'ts-handlers[explain]'"
        ) from None
    device = next(model.parameters()).device
    input_ids = torch.tensor([token_ids], device=device)
    attention_mask = torch.ones_like(input_ids)
    baseline = torch.full_like(input_ids, pad_id)
    baseline[:, 0], baseline[:, -1] = input_ids[:, 0], input_ids[:, -1]
    with torch.no_grad():
        logits = model(input_ids, attention_mask).float()[0]
    target = int(logits.argmax())
    attributions, delta = LayerIntegratedGradients(model, layer).attribute(
        input_ids,
        baselines=baseline,
        additional_forward_args=(attention_mask,),
        target=target,
        n_steps=steps,
        return_convergence_delta=True,
    )
    scores = attributions.sum(dim=-1)[0]
    scores = scores / scores.norm().clamp_min(1e-12)
    return target, logits, scores.detach().cpu().tolist(), float(delta.detach().abs().max())


def embedding_layer(model: nn.Module, name: str = "") -> tuple[str, nn.Module]:
    """The layer to attribute over: (its module path, the module).

    Empty ``name``: the ``embeddings`` block holding the model's input embeddings (word +
    position + type embeddings, as TorchServe's example attributes over), else the input
    embedding itself. A name is a module path; a base model's name ("bert", TorchServe's
    convention) means its ``embeddings``. Anything that does not hold the input embeddings is
    refused, with the name that would work.
    """
    inputs = model.get_input_embeddings()
    paths = {module: path for path, module in model.named_modules()}
    parent = paths[inputs].rpartition(".")[0]
    default = parent if parent.endswith("embeddings") else paths[inputs]
    if not name:
        return default, model.get_submodule(default)
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if isinstance(getattr(module, "embeddings", None), nn.Module):
        name, module = f"{name}.embeddings", module.embeddings
    if module is None or not any(part is inputs for part in module.modules()) or module is model:
        raise ConfigError(
            f"embedding_name {name!r} does not name an embedding layer of "
            f"{type(model).__name__}; use {default!r} (or leave embedding_name out)"
        )
    return name, module


def load_classifier(folder: str | Path, max_length: int | None = None) -> nn.Module:
    return load_pretrained("AutoModelForSequenceClassification", folder, max_length)


def checkpoint_metadata(model: nn.Module, folder: Path | None = None) -> dict[str, Any]:
    """Class count, labels (``id2label``), problem type and, for a cross-encoder, the rerank
    score's activation, from a checkpoint's config (and ``folder``'s sentence-transformers
    config)."""
    config = model.config
    metadata = {
        "num_labels": config.num_labels,
        "num_classes": config.num_labels,
        "labels": checkpoint_labels(model),
        "problem_type": config.problem_type,
    }
    if config.num_labels == 1:
        metadata["rerank_activation"] = activation_for(config, folder)
    return metadata


handle = entry_point(SequenceClassificationHandler)
TASK = Task(
    SequenceClassificationConfig,
    SequenceClassificationOptions,
    SequenceClassificationHandler,
    export="ts_handlers.exporters.sequence_classification:prepare_export",
    extra="text",
    init="ts_handlers.exporters.sequence_classification:init_setup",
    init_takes="a Hugging Face *ForSequenceClassification folder",
    answer="ts_handlers.exporters.sequence_classification:format_answer",
)
