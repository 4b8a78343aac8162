"""What the text tasks' exports share: the plan handed to the build, calibration texts.

Export-time only: a worker serving an archive never imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from ts_handlers.config import ConfigError, read_json_object
from ts_handlers.export import ExportPlan
from ts_handlers.exporters.answers import is_number
from ts_handlers.tasks import InitSetup
from ts_handlers.text import (
    TOKEN_TYPE_INPUTS,
    TOKENIZER_FILES,
    LogitsOnly,
    TextConfig,
    _check_largest_id_runs,
    check_tokenizer_fits,
    embedding_rows,
    one_text_at_a_time,
    padded,
    text_export_inputs,
)
from ts_handlers.verification import one_at_a_time


class PairLogits(LogitsOnly):
    """The logits of a model that reads segment ids: exported with three inputs (named so in
    the TorchScript, AOTInductor and ONNX signatures), so a text pair's second text keeps
    segment id 1."""

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        return super().forward(input_ids, attention_mask, token_type_ids)


def text_export_plan(
    config: TextConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    files: list[Path],
    metadata: dict[str, Any],
    *,
    exported: torch.nn.Module | None = None,
    token_types: bool = False,
) -> ExportPlan:
    """The plan both text tasks hand to the build: trace on (2, 16), verify ragged batches.

    ``model`` maps ``(input_ids, attention_mask)`` to one output row per text, or, with
    ``token_types``, ``(input_ids, attention_mask, token_type_ids)``: the exported signature
    then has the three, and verification runs text pairs' segment ids. With
    ``exported`` (the user's own TorchScript, ``model`` is then that same graph) there is no
    eager model: each text run alone and unpadded is the reference, which also decides whether
    batches may be padded per group or must be padded to ``max_length``.
    """
    rows = check_tokenizer_fits(tokenizer, embedding_rows(model), "the model")
    if rows is None:
        _check_largest_id_runs(model, tokenizer, config.max_length)
    dynamic, fixed = text_export_inputs(tokenizer, config.max_length, token_types=token_types)
    example = text_export_inputs(
        tokenizer, config.max_length, (2,), (16,), token_types=token_types
    )[0][0]
    if token_types:
        metadata = {**metadata, "inputs": list(TOKEN_TYPE_INPUTS)}
    plan = ExportPlan(
        model=None if exported is not None else model,
        example_inputs=example,
        verify_inputs=dynamic,
        fixed_shape_inputs=fixed,
        extra_files=files,
        metadata={**metadata, "embedding_rows": rows} if rows else metadata,
    )
    # torch.export: any batch size, any sequence length up to max_length, shared by both inputs.
    batch, sequence = Dim("batch", min=1), Dim("sequence", min=1, max=config.max_length)
    plan.dynamic_shapes = [{0: batch, 1: sequence} for _ in example]
    if exported is not None:
        plan.exported = exported
        plan.reference = one_text_at_a_time(exported)
        plan.fixed_shape_reference = one_at_a_time(exported)
    elif config.calibration_file:
        texts = read_calibration_texts(Path(config.calibration_file))
        if config.do_lower_case:
            texts = [text.lower() for text in texts]
        plan.calibration_inputs = calibration_batches(
            tokenizer, texts, config.max_length, config.inference_batch_size
        )
        if token_types:  # one text each: segment 0 throughout
            plan.calibration_inputs = [
                (*batch, torch.zeros_like(batch[0])) for batch in plan.calibration_inputs
            ]
        plan.calibration_source = f"{len(texts)} texts of {config.calibration_file}"
    return plan


def read_calibration_texts(path: Path) -> list[str]:
    """One text per line; blank lines and lines starting with "# " are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ConfigError(f"calibration_file {str(path)!r} cannot be read: {error}") from None
    texts = [line for line in lines if line.strip() and not line.startswith("# ")]
    if len(texts) < 3:
        raise ConfigError(
            f"calibration_file {str(path)!r} holds {len(texts)} texts; the accuracy gates need "
            "real inputs, one per line (a few hundred, as varied as the traffic)"
        )
    return texts


def calibration_batches(
    tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Texts as the handler batches them: sorted by length, padded per group."""
    encoded = sorted(
        (tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts),
        key=len,
    )
    pad_id = tokenizer.pad_token_id or 0
    return [
        padded(encoded[start : start + batch_size], pad_id)
        for start in range(0, len(encoded), batch_size)
    ]


def tokenizer_files(folder: Path) -> list[Path]:
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


# ---- for ts-handlers init: a Hugging Face checkpoint folder ---------------------------------

# The text models' own longest input is often far past what a served request should carry;
# BERT-family position tables stop at 512 anyway.
MAX_TEXT_LENGTH = 512


def checkpoint_setup(model_path: Path, relative: str, mode: str, suffix: str) -> InitSetup | None:
    """A Hugging Face folder whose ``config.json`` names a ``*<suffix>`` architecture (and not
    a sentence-transformers folder): ``mode``'s setup_config.json and the checkpoint's labels."""
    if not model_path.is_dir() or (model_path / "modules.json").is_file():
        return None
    hf_config = read_json_object(model_path / "config.json") or {}
    architectures = hf_config.get("architectures") or []
    if not any(str(architecture).endswith(suffix) for architecture in architectures):
        return None
    setup = {"mode": mode, "model_name": relative, "max_length": text_max_length(model_path)}
    id2label = hf_config.get("id2label")
    labels = None
    if isinstance(id2label, dict) and id2label:
        labels = {str(index): str(label) for index, label in sorted(id2label.items(), key=_index)}
    return setup, labels


def _index(item: tuple[Any, Any]) -> int:
    return int(item[0])


def text_max_length(folder: Path) -> int:
    """The tokenizer's model_max_length, capped at the position table and MAX_TEXT_LENGTH."""
    limits = [MAX_TEXT_LENGTH]
    tokenizer_config = read_json_object(folder / "tokenizer_config.json") or {}
    model_config = read_json_object(folder / "config.json") or {}
    # Tokenizers without a limit store a huge number (1e30); the cap takes care of it.
    for value in (
        tokenizer_config.get("model_max_length"),
        model_config.get("max_position_embeddings"),
    ):
        if is_number(value) and value >= 2:
            limits.append(int(value))
    return min(limits)
