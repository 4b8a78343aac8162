"""The sequence_classification export: a Hugging Face checkpoint folder, or the user's own
model files with the folder's tokenizer, planned for the build (explanations checked once).

Export-time only; a worker never imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ts_handlers.config import ConfigError, read_json_object
from ts_handlers.errors import InvalidInput
from ts_handlers.export import ExportPlan
from ts_handlers.exporters import user_files
from ts_handlers.exporters.answers import format_labels, is_label_list
from ts_handlers.exporters.text import (
    PairLogits,
    checkpoint_setup,
    text_export_plan,
    tokenizer_files,
)
from ts_handlers.sequence_classification import (
    SequenceClassificationConfig,
    apply_function,
    checkpoint_metadata,
    embedding_layer,
    function_for,
    integrated_gradients,
    load_classifier,
)
from ts_handlers.tasks import InitSetup
from ts_handlers.text import (
    LogitsOnly,
    check_tokenizer_fits,
    embedding_rows,
    load_tokenizer,
    output_width,
    uses_token_types,
)


def prepare_export(config: SequenceClassificationConfig) -> ExportPlan:
    """Plans the export of a Hugging Face checkpoint folder, or of the user's own model files.

    With ``serialized_file`` (a TorchScript file, or a state_dict with ``model_file``),
    ``model_name`` is the folder holding the tokenizer (and optionally a ``config.json`` with
    ``id2label`` and ``problem_type``); the model maps ``(input_ids, attention_mask)`` to logits.
    """
    folder = Path(config.model_name)
    if config.captum_explanation and config.save_mode != "pretrained":
        raise ConfigError(
            "captum_explanation needs save_mode 'pretrained': explanations run the eager model"
        )

    if user_files.user_model_kind(config):
        plan = _plan_user_model(config, folder)
    else:
        plan = _plan_checkpoint(config, folder)
    num_classes = plan.metadata["num_classes"]
    if config.num_labels is not None and config.num_labels != num_classes:
        raise ConfigError(
            f"num_labels is {config.num_labels} but the checkpoint has {num_classes} labels"
        )
    plan.num_classes = num_classes
    function = config.function_to_apply or function_for(
        plan.metadata.get("problem_type"), num_classes
    )
    plan.resolved["function_to_apply"] = function
    # Reduced precision is gated on the scores clients get, not on the logits.
    plan.gate_rows = lambda logits, *inputs: apply_function(logits, function)
    return plan


def _plan_checkpoint(config: SequenceClassificationConfig, folder: Path) -> ExportPlan:
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model_name {config.model_name!r} is not a checkpoint folder")
    model = load_classifier(folder, config.max_length)
    metadata = checkpoint_metadata(model, folder)
    tokenizer = load_tokenizer(folder)
    if config.save_mode != "pretrained":
        # A model that reads segment ids (BERT) is exported with token_type_ids, so text pairs
        # run as the pipeline runs them; one that does not (RoBERTa) with two inputs.
        token_types = uses_token_types(tokenizer, model.config, model.forward)
        wrapper = PairLogits(model) if token_types else LogitsOnly(model)
        return text_export_plan(
            config,
            wrapper.eval(),
            tokenizer,
            tokenizer_files(folder),
            metadata,
            token_types=token_types,
        )
    check_tokenizer_fits(tokenizer, embedding_rows(model), str(folder))
    files = [path for path in folder.iterdir() if path.is_file() and path.suffix != ".tsv"]
    plan = ExportPlan(model=None, extra_files=files, metadata=metadata)
    if config.captum_explanation:
        plan.resolved["embedding_name"] = _check_explanation(config, model, tokenizer)
    return plan


def _check_explanation(
    config: SequenceClassificationConfig, model: nn.Module, tokenizer: Any
) -> str:
    """Runs one explanation, as a request would: a broken setup fails the build, not a client."""
    name, layer = embedding_layer(model, config.embedding_name)
    token_ids = tokenizer("ts-handlers checks explanations at build time")["input_ids"]
    try:
        integrated_gradients(
            LogitsOnly(model), layer, token_ids, tokenizer.pad_token_id or 0, steps=4
        )
    except InvalidInput as error:  # captum is missing
        raise ConfigError(error.message) from None
    except Exception as error:
        raise ConfigError(f"an explanation over {name!r} fails: {error}") from None
    print(f"explanation check over {name!r}: ok")
    return name


def _plan_user_model(config: SequenceClassificationConfig, folder: Path) -> ExportPlan:
    if config.save_mode == "pretrained":
        raise ConfigError(
            "save_mode 'pretrained' serves a save_pretrained folder; serialized_file is "
            "served with save_mode 'torchscript'"
        )
    if not config.model_name or not folder.is_dir():
        raise ConfigError(
            "with serialized_file, model_name must name the folder holding the tokenizer "
            f"(tokenizer.json or vocab files) the model was trained with; got {config.model_name!r}"
        )

    tokenizer = load_tokenizer(folder)
    model, exported = user_files.load_user_model(config)
    checkpoint = read_json_object(folder / "config.json") or {}
    num_classes = output_width(model, tokenizer, config.max_length)
    id2label = checkpoint.get("id2label") or {}
    labels = [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(num_classes)]
    metadata = {
        "num_labels": num_classes,
        "num_classes": num_classes,
        "labels": labels,
        "problem_type": checkpoint.get("problem_type"),
    }
    files = [path for path in tokenizer_files(folder) if path.name != "config.json"]
    if checkpoint:
        files.append(folder / "config.json")
    return text_export_plan(config, model, tokenizer, files, metadata, exported=exported)


# ---- for the tools: how init recognises a model of this task, how predict prints an answer --


def init_setup(model_path: Path, relative: str, options: dict[str, Any]) -> InitSetup | None:
    return checkpoint_setup(
        model_path, relative, "sequence_classification", "ForSequenceClassification"
    )


def format_answer(answer: Any, inputs: Sequence[str] | None) -> str | None:
    """Labels and scores as aligned rows; a rerank answer as its ranking."""
    if is_label_list(answer):
        return format_labels(answer)
    ranking = isinstance(answer, list) and bool(answer)
    ranking = ranking and all(
        isinstance(item, dict) and {"index", "score"} <= set(item) for item in answer
    )
    return format_ranking(answer, inputs) if ranking else None


def format_ranking(answer: list[dict[str, Any]], inputs: Sequence[str] | None) -> str:
    """A rerank answer, best first: rank, score, the text's index and the text."""
    rows = []
    for rank, item in enumerate(answer, start=1):
        text = item.get("text")
        if text is None and inputs and 0 <= item["index"] < len(inputs):
            text = inputs[item["index"]]
        shown = "" if text is None else f"  {text}"
        rows.append(f"{rank:>3}. {item['score']:.4f}  [{item['index']}]{shown}")
    return "\n".join(rows)
