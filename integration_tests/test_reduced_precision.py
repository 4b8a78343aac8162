"""Reduced precision on the real models, against oracles the project did not write.

- ``minilm_bf16.mar`` and ``minilm_int8.mar`` (``make archives``) on real TorchServe, against
  ``SentenceTransformer.encode`` in float32, over held-out text (not the calibration set);
- the demo classifiers built here in int8: digits against the held-out digits, sentiment
  against ``transformers.pipeline``; and the text classifiers the bfloat16 gate refuses.

The thresholds are the build's own gates (ts_handlers/precision.py); the archive's report must
say what the build measured and whether this CPU runs the dtype natively.
"""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from harness import body_headers, load_text_handler, make_context, run_batch, unpack_archive
from serving import MODEL_STORE, ROOT, described, png_bytes, require

from ts_handlers import cpu
from ts_handlers.export import ExportError
from ts_handlers.tools.build import REPORT_FILE, build_archive

MINILM = ROOT / "build/checkpoints/minilm"
SENTIMENT = ROOT / "build/checkpoints/sentiment"
CALIBRATION = ROOT / "datasets/calibration.txt"
MIN_COSINE = {"minilm_bf16": 0.999, "minilm_int8": 0.99}


def heldout_texts() -> list[str]:
    """Real text that is not in the calibration set: the sentiment held-out split, NER lines."""
    with (require(SENTIMENT) / "heldout.tsv").open(encoding="utf-8") as file:
        texts = [row["text"] for row in csv.DictReader(file, delimiter="\t")]
    sentence: list[str] = []
    for line in (ROOT / "datasets/ner.conll").read_text(encoding="utf-8").splitlines():
        if line.strip():
            sentence.append(line.split()[0])
        elif sentence:
            texts.append(" ".join(sentence))
            sentence = []
    return texts[:200]


def archive_report(mar_path: Path) -> dict:
    with zipfile.ZipFile(require(mar_path)) as archive:
        return json.loads(archive.read(REPORT_FILE))


@pytest.fixture(scope="module")
def encoded() -> tuple[list[str], np.ndarray]:
    from sentence_transformers import SentenceTransformer

    texts = heldout_texts()
    model = SentenceTransformer(str(require(MINILM)), device="cpu")
    return texts, model.encode(texts, normalize_embeddings=True)


@pytest.mark.parametrize("archive", ["minilm_bf16", "minilm_int8"])
def test_reduced_minilm_is_served_within_its_gate(inference, torchserve, encoded, archive):
    texts, expected = encoded
    url = f"{torchserve.inference_url}/predictions/{archive}"
    groups = [texts[start : start + 5] for start in range(0, len(texts), 5)]
    with ThreadPoolExecutor(max_workers=8) as pool:  # concurrent: TorchServe batches them
        responses = list(pool.map(lambda g: inference.post(url, json={"inputs": g}), groups))
    assert all(response.status_code == 200 for response in responses)
    served = np.array([vector for response in responses for vector in response.json()])
    assert served.shape == expected.shape
    cosine = (served * expected).sum(axis=1) / (
        np.linalg.norm(served, axis=1) * np.linalg.norm(expected, axis=1)
    )
    print(f"{archive}: min cosine {cosine.min():.6f} over {len(texts)} held-out texts")
    assert cosine.min() >= MIN_COSINE[archive]

    report = archive_report(MODEL_STORE / f"{archive}.mar")["verification"]["precision"]
    assert report["calibration"]["inputs"] == 400  # the texts of datasets/calibration.txt
    assert report["calibration"]["min_cosine"] >= MIN_COSINE[archive]
    name = "bfloat16" if archive.endswith("bf16") else "dynamic_int8"
    kernel = report.get("recipe", {}).get("kernel")
    if report["cpu"]["cpu_capability"] == cpu.instruction_sets()["cpu_capability"]:
        assert report["cpu"]["fast"] == cpu.fast_here(name, kernel)[0]
    assert {"short", "long"} == set(report["speed"]["cases"])  # timed by the build
    if archive.endswith("int8"):
        assert report["calibration"]["neighbour_agreement"] >= 0.98
        assert report["recipe"]["quantized_layers"] > len(report["recipe"]["float32_layers"])

    # What runs here: the archive's precision where this CPU runs it fast, else float32.
    metadata = described(torchserve, archive)
    recorded = {"name": name, "kernel": kernel, "float32_file": "float32_model.pt"}
    expected = cpu.serving_precision({**recorded, "speed": report["speed"]})
    assert metadata["precision"] == expected
    print(f"{archive} on this CPU: serving {expected['serving']} ({expected['reason']})")


@pytest.mark.parametrize("archive", ["minilm_bf16", "minilm_int8"])
def test_the_reduced_graph_itself_keeps_its_gate_on_heldout_text(
    encoded, archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Where this CPU serves an archive's float32 graph (above), its reduced graph is still
    checked on held-out text: in-process, the reduced graph forced as a fast CPU would load it."""
    from ts_handlers.sentence_embedding import SentenceEmbeddingHandler

    monkeypatch.setattr(cpu, "fast_here", lambda *_: (True, "forced by the test"))
    monkeypatch.setattr(cpu, "instruction_sets", lambda: {"cpu_capability": "forced"})
    texts, expected = encoded
    model_dir = tmp_path / "model"
    handler = SentenceEmbeddingHandler()
    manifest = unpack_archive(require(MODEL_STORE / f"{archive}.mar"), model_dir)
    handler.initialize(make_context(model_dir, manifest))
    assert handler.describe()["precision"]["serving"] != "float32"
    requests = [({"body": {"inputs": texts[i : i + 8]}}, {}) for i in range(0, len(texts), 8)]
    answers = run_batch(handler, requests)
    assert all(status == 200 for status, _, _ in answers)
    served = np.array([vector for _, answer, _ in answers for vector in answer])
    cosine = (served * expected).sum(axis=1) / (
        np.linalg.norm(served, axis=1) * np.linalg.norm(expected, axis=1)
    )
    print(f"{archive}, its own graph: min cosine {cosine.min():.6f} over {len(texts)} texts")
    assert cosine.min() >= MIN_COSINE[archive]


def build_reduced(name: str, tmp_path: Path, **changes: object) -> Path:
    """archiver_configs/<name> at a reduced precision (bfloat16 unless changed), built here."""
    source = ROOT / "archiver_configs" / name
    config_dir = tmp_path / "archiver_configs" / f"{name}_reduced"
    shutil.copytree(source, config_dir)
    setup = json.loads((source / "setup_config.json").read_text())
    # Absolute: the copied folder sits elsewhere than the relative paths were written for.
    setup["model_name"] = str((source / setup["model_name"]).resolve())
    setup.update({"dtype": "bfloat16", "calibration_file": str(CALIBRATION), **changes})
    (config_dir / "setup_config.json").write_text(json.dumps(setup))
    mar_path = build_archive(config_dir, tmp_path / "store", force=True)
    assert mar_path is not None
    return mar_path


@pytest.mark.parametrize("name", ["sentiment", "ner"])
def test_bf16_text_classifiers_are_refused_where_scores_move_over_1e_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
):
    """bfloat16's 8-bit mantissa moves a borderline probability by 0.03 (sentiment) to 0.045
    (one NER token of 13,160); NER also flips 12 tokens' top label. Both are over the dtype gate
    (top-1 100%, scores within 1e-2), so the build refuses and writes nothing. Layer norms and
    the head in float32 do not change that (measured on sentiment: 0.0298)."""
    with pytest.raises(ExportError, match=r"fails its accuracy gate .*max_score_diff"):
        build_reduced(name, tmp_path)
    assert not (tmp_path / "store" / f"{name}_reduced.mar").exists()
    assert "bfloat16 against float32 over" in capsys.readouterr().out


def test_int8_sentiment_keeps_the_pipelines_answers(tmp_path: Path):
    """The classifier's int8 gate (top-1 agreement >= 99% on the calibration text), then the
    served answers against transformers.pipeline on the held-out sentiment split."""
    from transformers import pipeline

    mar_path = build_reduced("sentiment", tmp_path, dtype="float32", quantization="dynamic_int8")
    report = archive_report(mar_path)["verification"]["precision"]
    assert report["calibration"]["top1_agreement"] >= 0.99
    assert report["recipe"]["quantized_layers"] >= 1
    handler = load_text_handler(mar_path, tmp_path / "model")
    texts = heldout_texts()[:80]
    classify = pipeline("text-classification", model=str(SENTIMENT), top_k=None, device="cpu")
    expected = [max(result, key=lambda r: r["score"])["label"] for result in classify(texts)]
    answers = run_batch(handler, [({"body": {"inputs": text}}, {}) for text in texts])
    agree = sum(
        status == 200 and answer[0]["label"] == label
        for (status, answer, _), label in zip(answers, expected, strict=True)
    )
    print(f"sentiment int8: {report['recipe']['quantized_layers']} layers int8; top-1 {agree}/80")
    assert agree >= 79  # 99%


def test_int8_digits_keep_their_heldout_accuracy(tmp_path: Path, heldout_digits):
    """bfloat16 moves a digit's probability by 0.018, over the dtype gate; int8 Linear layers
    (the convolutions stay float32) keep the answers."""
    from sklearn.datasets import load_digits

    # The calibration images: the first 300 scans of the library's digits, as PNG files, the
    # way a user points calibration_file at a folder of their own images.
    calibration = tmp_path / "calibration_images"
    calibration.mkdir()
    for index, image in enumerate(load_digits().images[:300]):
        pixels = np.clip(image * 16.0, 0, 255).astype(np.uint8)
        (calibration / f"{index:04}.png").write_bytes(png_bytes(pixels))
    mar_path = build_reduced(
        "mnist",
        tmp_path,
        dtype="float32",
        quantization="dynamic_int8",
        calibration_file=str(calibration),
    )
    report = archive_report(mar_path)["verification"]["precision"]
    assert report["calibration"]["inputs"] == 300
    assert report["calibration"]["top1_agreement"] >= 0.99

    from ts_handlers.image_classification import ImageClassificationHandler

    model_dir = tmp_path / "model"
    handler = ImageClassificationHandler()
    handler.initialize(make_context(model_dir, unpack_archive(mar_path, model_dir)))
    images, labels = heldout_digits
    requests = [({"body": png_bytes(image)}, body_headers("image/png")) for image in images[:200]]
    answers = run_batch(handler, requests)
    correct = sum(
        answer[0]["label"] == str(label)
        for (_, answer, _), label in zip(answers, labels[:200], strict=True)
    )
    print(f"digits int8: {correct} of 200 held-out digits right")
    assert correct >= 190
