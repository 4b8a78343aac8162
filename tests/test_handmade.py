"""Archives made by hand, as TorchServe's Hugging Face example makes them (issue 21).

No ``ts_handlers.json`` in the graph: the handler derives the inputs, the class count and the
padding policy at load, runs the batch-consistency and label checks, and answers as
``transformers.pipeline`` does; what cannot work fails the load with what to change.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import (
    TINY_TEXT_MAX_LENGTH,
    TORCHSERVE_EXAMPLE_SETUP,
    body_headers,
    handmade_model_dir,
    make_context,
    run_batch,
    save_tiny_classifier,
    trace_like_torchserve_example,
)
from torch import nn

from ts_handlers.config import ConfigError, parse_config
from ts_handlers.export import ExportError
from ts_handlers.sequence_classification import (
    SequenceClassificationConfig,
    SequenceClassificationHandler,
)

TEXTS = [
    "the movie was great",
    "i hated every minute of this awful boring film, and the popcorn was stale too",
    "tea",
    "rain",
    "What a WONDERFUL surprise!!!",
]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("ckpt") / "bert", "bert", "single_label")


@pytest.fixture(scope="module")
def pipeline_answers(checkpoint: Path) -> list[Any]:
    from transformers import pipeline

    classify = pipeline(
        "text-classification",
        model=str(checkpoint),
        top_k=None,
        truncation=True,
        max_length=TINY_TEXT_MAX_LENGTH,
    )
    return classify(TEXTS)


def load(model_dir: Path, manifest: dict[str, Any]) -> SequenceClassificationHandler:
    handler = SequenceClassificationHandler()
    handler.initialize(make_context(model_dir, manifest))
    return handler


def answers(handler: SequenceClassificationHandler) -> list[Any]:
    request = ({"body": {"inputs": TEXTS}}, body_headers("application/json"))
    [(status, answer, _)] = run_batch(handler, [request])
    assert status == 200
    return answer


def assert_pipeline_parity(served: list[Any], expected: list[Any]) -> None:
    for got, want in zip(served, expected, strict=True):
        assert [item["label"] for item in got] == [item["label"] for item in want]
        for got_item, want_item in zip(got, want, strict=True):
            assert got_item["score"] == pytest.approx(want_item["score"], abs=TOLERANCE)


# ---- TorchServe's example setup_config.json -------------------------------------------------


def test_torchserve_example_config_is_understood(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ts_handlers.config"):
        config = parse_config(SequenceClassificationConfig, TORCHSERVE_EXAMPLE_SETUP, "example")
    assert (config.num_labels, config.max_length) == (3, TINY_TEXT_MAX_LENGTH)
    [record] = caplog.records  # one line, naming each ignored switch and why
    for key in ("FasterTransformer", "BetterTransformer", "model_parallel"):
        assert key in record.getMessage()
    # The example's own default (pretrained, explanations on, max_length "150") loads: the
    # explanation steps left at their default are fitted to the explanation budget.
    example = {**TORCHSERVE_EXAMPLE_SETUP, "save_mode": "pretrained", "max_length": "150"}
    assert parse_config(SequenceClassificationConfig, example, "x").explanation_steps == 42
    with pytest.raises(ConfigError, match=r"unknown key\(s\) hardware; valid keys are mode, "):
        parse_config(
            SequenceClassificationConfig, {**TORCHSERVE_EXAMPLE_SETUP, "hardware": "neuron"}, "x"
        )
    # The project's own keys stay strict: no number read from text there.
    for key, value in (("max_tokens_per_request", "256"), ("verify_atol", "1e-3")):
        with pytest.raises(ConfigError, match=key):
            parse_config(
                SequenceClassificationConfig, {"mode": "sequence_classification", key: value}, "x"
            )
    with pytest.raises(ConfigError, match="max_length must be an integer"):
        parse_config(
            SequenceClassificationConfig, {**TORCHSERVE_EXAMPLE_SETUP, "max_length": "1e2"}, "x"
        )


# ---- graphs traced by hand ------------------------------------------------------------------


@pytest.mark.parametrize("inputs", [1, 2, 3])
def test_a_graph_traced_as_the_example_does_serves_at_pipeline_parity(
    inputs: int, checkpoint: Path, pipeline_answers: list[Any], tmp_path: Path
) -> None:
    traced = trace_like_torchserve_example(checkpoint, tmp_path / "traced_model.pt", inputs)
    labels = {"0": "bad", "1": "so-so", "2": "good"}
    model_dir, manifest = handmade_model_dir(
        tmp_path / "model", checkpoint, traced, TORCHSERVE_EXAMPLE_SETUP
    )
    handler = load(model_dir, manifest)
    names = ["input_ids", "attention_mask", "token_type_ids"][:inputs]
    assert handler.export_metadata["inputs"] == names
    assert handler.export_metadata["num_classes"] == 3
    # It holds at every length: no padding to max_length; with no mask, no padding at all.
    assert handler.config.pad_to_max_length is False
    assert handler.same_length_batches is (inputs == 1)
    checks = handler.export_metadata["load_checks"]
    assert checks["max_length"]["passed"] and checks["other_lengths"]["passed"]
    assert_pipeline_parity(answers(handler), pipeline_answers)
    # The archive's labels file is checked against the derived class count, and used.
    (model_dir / "index_to_name.json").write_text(json.dumps(labels))
    assert load(model_dir, manifest).labels == list(labels.values())
    (model_dir / "index_to_name.json").write_text(json.dumps({"0": "no", "1": "yes"}))
    with pytest.raises(ConfigError, match="model outputs 3 classes"):
        load(model_dir, manifest)


class BakedLength(nn.Module):
    """A graph that holds only at the length it was traced at (the length becomes a constant)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[
            0
        ]
        return logits + 0 * input_ids.reshape(-1, TINY_TEXT_MAX_LENGTH)[:, :1].float()


class BakedBatch(BakedLength):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[
            0
        ]
        return logits[:1].expand(int(input_ids.shape[0]), -1)  # every row answers the first's


def traced_with(wrapper: type[nn.Module], checkpoint: Path, path: Path, batch: int) -> Path:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint))
    ids = torch.randint(5, 100, (batch, TINY_TEXT_MAX_LENGTH))
    traced = torch.jit.trace(wrapper(model.eval()), (ids, torch.ones_like(ids)), strict=False)
    torch.jit.save(traced, str(path))
    return path


def test_a_graph_that_holds_only_at_max_length_pads_every_text_to_it(
    checkpoint: Path, pipeline_answers: list[Any], tmp_path: Path
) -> None:
    traced = traced_with(BakedLength, checkpoint, tmp_path / "fixed.pt", batch=2)
    setup = {**TORCHSERVE_EXAMPLE_SETUP, "captum_explanation": False}
    handler = load(*handmade_model_dir(tmp_path / "model", checkpoint, traced, setup))
    assert handler.config.pad_to_max_length is True
    assert handler.export_metadata["load_checks"]["other_lengths"]["passed"] is False
    assert_pipeline_parity(answers(handler), pipeline_answers)  # the mask hides the padding


def test_a_graph_that_cannot_be_batched_fails_its_load_saying_why(
    checkpoint: Path, tmp_path: Path
) -> None:
    traced = traced_with(BakedBatch, checkpoint, tmp_path / "batch.pt", batch=1)
    model_dir, manifest = handmade_model_dir(
        tmp_path / "model", checkpoint, traced, TORCHSERVE_EXAMPLE_SETUP
    )
    with pytest.raises(ConfigError, match="differently from each text alone.*cannot be batched"):
        load(model_dir, manifest)


def test_archive_mistakes_fail_the_load_with_what_to_change(
    checkpoint: Path, tmp_path: Path
) -> None:
    traced = trace_like_torchserve_example(checkpoint, tmp_path / "traced_model.pt", 2)
    wrong_count = {**TORCHSERVE_EXAMPLE_SETUP, "num_labels": "2"}
    with pytest.raises(ConfigError, match="num_labels is 2 but the model outputs 3 classes"):
        load(*handmade_model_dir(tmp_path / "a", checkpoint, traced, wrong_count))
    no_tokenizer = handmade_model_dir(
        tmp_path / "b", checkpoint, traced, TORCHSERVE_EXAMPLE_SETUP, files=("config.json",)
    )
    with pytest.raises(ConfigError, match="no tokenizer.*--extra-files"):
        load(*no_tokenizer)
    weights = checkpoint / "model.safetensors"
    as_graph = handmade_model_dir(tmp_path / "c", checkpoint, weights, TORCHSERVE_EXAMPLE_SETUP)
    with pytest.raises(ExportError, match="holds weights.*save_mode 'pretrained'"):
        load(*as_graph)


def test_a_pretrained_archive_made_by_hand_serves_at_pipeline_parity(
    checkpoint: Path, pipeline_answers: list[Any], tmp_path: Path
) -> None:
    setup = {**TORCHSERVE_EXAMPLE_SETUP, "save_mode": "pretrained", "captum_explanation": False}
    model_dir, manifest = handmade_model_dir(
        tmp_path / "model", checkpoint, checkpoint / "model.safetensors", setup
    )
    assert_pipeline_parity(answers(load(model_dir, manifest)), pipeline_answers)


def test_handler_files_name_each_tasks_handle() -> None:
    from ts_handlers.handler_files import handler_file, modes

    assert {"sequence_classification", "image_classification"} <= set(modes())
    text = handler_file("sequence_classification").read_text()
    assert "from ts_handlers.sequence_classification import handle" in text
    with pytest.raises(KeyError, match="tasks with one"):
        handler_file("question_answering")


def test_a_vision_graph_made_by_hand_derives_its_class_count_at_load(tmp_path: Path) -> None:
    from harness import RGB_SETUP, UserCNN

    from ts_handlers.image_classification import ImageClassificationHandler

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    torch.jit.script(UserCNN().eval()).save(str(model_dir / "my_cnn.pt"))
    (model_dir / "setup_config.json").write_text(json.dumps(RGB_SETUP))
    manifest = {"model": {"modelName": "cnn", "serializedFile": "my_cnn.pt", "handler": "h.py"}}
    handler = ImageClassificationHandler()
    handler.initialize(make_context(model_dir, manifest))
    assert handler.export_metadata["num_classes"] == 5
    assert handler.labels == ["0", "1", "2", "3", "4"]  # not the 10 a default would guess
    assert handler.export_metadata["load_checks"]["passed"]
