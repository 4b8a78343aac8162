"""``ts-handlers import OLD.mar`` on archives made for TorchServe's example handler (issue 21).

The old archives are written as torch-model-archiver lays them out (MAR-INF/MANIFEST.json, the
handler file, the serialized file and the extra files at the root).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from harness import (
    TINY_TEXT_MAX_LENGTH,
    TORCHSERVE_EXAMPLE_SETUP,
    load_text_handler,
    save_tiny_classifier,
    trace_like_torchserve_example,
)

from ts_handlers.tools import cli

LABELS = {"0": "bad", "1": "so-so", "2": "good"}
EXAMPLE_HANDLER = "Transformer_handler_generalized.py"


def old_archive(path: Path, serialized: Path, checkpoint: Path, setup: dict[str, Any]) -> Path:
    manifest = {
        "createdOn": "01/01/2024 00:00:00",
        "runtime": "python",
        "model": {
            "modelName": path.stem,
            "serializedFile": serialized.name,
            "handler": EXAMPLE_HANDLER,
            "modelVersion": "1.0",
        },
        "archiverVersion": "0.12.0",
    }
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        archive.writestr(EXAMPLE_HANDLER, "# TorchServe's example handler (never run here)\n")
        archive.writestr("setup_config.json", json.dumps(setup))
        archive.writestr("index_to_name.json", json.dumps(LABELS))
        archive.write(serialized, serialized.name)
        for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
            archive.write(checkpoint / name, name)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("ckpt") / "bert", "bert", "single_label")


def pipeline_scores(checkpoint: Path, texts: list[str]) -> list[dict[str, float]]:
    from transformers import pipeline

    classify = pipeline(
        "text-classification",
        model=str(checkpoint),
        top_k=None,
        truncation=True,
        max_length=TINY_TEXT_MAX_LENGTH,
    )
    return [
        {LABELS[item["label"].rsplit("_", 1)[1]]: item["score"] for item in answer}
        for answer in classify(texts)
    ]


def served_scores(mar_path: Path, model_dir: Path, texts: list[str]) -> list[dict[str, float]]:
    handler = load_text_handler(mar_path, model_dir)
    logits = handler.forward([handler.tokenize(text, i) for i, text in enumerate(texts)])
    from ts_handlers.sequence_classification import apply_function

    return [
        dict(zip(handler.labels, apply_function(row, handler.function).tolist(), strict=True))
        for row in logits
    ]


@pytest.mark.parametrize("kind", ["traced", "pretrained", "pretrained_explained"])
def test_an_example_archive_imports_as_a_verified_archive(
    kind: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if kind == "traced":
        serialized = trace_like_torchserve_example(checkpoint, tmp_path / "traced_model.pt", 1)
        setup = TORCHSERVE_EXAMPLE_SETUP
    else:  # TorchServe's default: pretrained, with explanations unless switched off
        serialized = checkpoint / "model.safetensors"
        explained = kind == "pretrained_explained"
        setup = {
            **TORCHSERVE_EXAMPLE_SETUP,
            "save_mode": "pretrained",
            "captum_explanation": explained,
        }
    old = old_archive(tmp_path / "old.mar", serialized, checkpoint, setup)
    store = tmp_path / "store"
    assert cli.main(["import", str(old), "--name", "reviews", "--model-store", str(store)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((store / "reviews.import.json").read_text())
    assert report["imported_from"]["handler"] == EXAMPLE_HANDLER
    changes = " ".join(report["imported_from"]["config_changes"])
    assert "FasterTransformer dropped" in changes and "model_name dropped" in changes
    assert report["checks"]["answers"]["passed"] and "PASSED" in printed
    assert "index_to_name.json checked" in report["checks"]["labels"]
    with zipfile.ZipFile(store / "reviews.mar") as archive:
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        export_report = json.loads(archive.read("export_report.json"))
        assert EXAMPLE_HANDLER not in archive.namelist()
    assert manifest["model"]["handler"] == "ts_handlers.sequence_classification:handle"
    if kind == "pretrained_explained":  # explanations need the eager model: kept as it is
        assert export_report["save_mode"] == "pretrained"
        assert export_report["resolved"]["embedding_name"] == "bert.embeddings"
    else:
        assert manifest["model"]["serializedFile"] == "model.pt"
    verification = export_report.get("verification", {})
    if kind == "traced":
        assert verification["eager_reference"] is False and export_report["inputs"] == ["input_ids"]
    elif kind == "pretrained":  # exported by the build and verified against eager
        assert verification["eager_reference"] is True
        assert verification["dynamic_shapes"]["passed"]
    texts = ["the movie was great", "tea", "i hated every minute of this awful boring film"]
    served = served_scores(store / "reviews.mar", tmp_path / "served", texts)
    for got, want in zip(served, pipeline_scores(checkpoint, texts), strict=True):
        assert got == pytest.approx(want, abs=1e-4)


def test_an_archive_of_another_mode_is_refused_with_what_to_do(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serialized = checkpoint / "model.safetensors"
    setup = {**TORCHSERVE_EXAMPLE_SETUP, "mode": "question_answering", "save_mode": "pretrained"}
    old = old_archive(tmp_path / "qa.mar", serialized, checkpoint, setup)
    assert cli.main(["import", str(old), "--model-store", str(tmp_path / "store")]) == 1
    assert "mode 'question_answering'" in capsys.readouterr().err
    assert not (tmp_path / "store" / "qa.mar").exists()
