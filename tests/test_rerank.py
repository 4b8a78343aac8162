"""Text pairs and reranking on tiny cross-encoders taken through the real build.

Oracles nobody here wrote: sentence-transformers' ``CrossEncoder.predict`` and ``rank`` (with
its default activation, sigmoid for one output, and without: ``nn.Identity()``), and
``transformers.pipeline("text-classification")`` for text pairs. Two architectures: BERT-style,
whose tokenizer gives a pair's second text segment id 1 (the exported graph takes
``token_type_ids``), and RoBERTa-style, which has no segment ids (two inputs). Each is built as
TorchScript, AOTInductor and ONNX archives, and served eager.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import build_text_archive, load_text_handler, run_batch, save_tiny_cross_encoder

from ts_handlers.text import TextPair
from ts_handlers.tools.build import REPORT_FILE

MAX_LENGTH = 24
ATOL = 1e-4
QUERY = "was the food tasty"
TEXTS = [
    "service was slow but the food was really tasty",
    "tea",
    "the battery died after two days; never again. " * 4,  # the pair is cut, longest first
    "What a WONDERFUL surprise!!!",
    "a quiet afternoon with tea, books and rain",
]
PAIRS = [
    ("the movie was great", "and the acting was superb"),
    ("tea", "books and rain"),
    ("i hated every minute of this awful boring film " * 3, "what a surprise"),
]
ARCHITECTURES = ("bert", "roberta")
SAVE_MODES = ("torchscript", "aot_inductor", "onnx", "pretrained")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cross_encoders")
    return {name: save_tiny_cross_encoder(root / name, name) for name in ARCHITECTURES}


@pytest.fixture(scope="module")
def cross_encoders(checkpoints: dict[str, Path]) -> dict[str, Any]:
    from sentence_transformers import CrossEncoder

    return {
        name: CrossEncoder(str(folder), max_length=MAX_LENGTH, device="cpu")
        for name, folder in checkpoints.items()
    }


@pytest.fixture(scope="module")
def archive(
    checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, str], tuple[Path, Any]]:
    """(architecture, save_mode) -> (the .mar, its handler), built once per module."""
    built: dict[tuple[str, str], tuple[Path, Any]] = {}

    def get(architecture: str, save_mode: str) -> tuple[Path, Any]:
        key = (architecture, save_mode)
        if key not in built:
            root = tmp_path_factory.mktemp(f"rerank_{architecture}_{save_mode}")
            mar_path = build_text_archive(
                root,
                f"rerank_{architecture}",
                checkpoints[architecture],
                save_mode=save_mode,
                max_length=MAX_LENGTH,
                inference_batch_size=4,
            )
            built[key] = (mar_path, load_text_handler(mar_path, root / "model"))
        return built[key]

    return get


def rerank(handler: Any, body: dict[str, Any], route: bool = True) -> tuple[int, Any]:
    headers = {"url_path": "rerank"} if route else {}
    ((status, answer, _),) = run_batch(handler, [({"body": body}, headers)])
    return status, answer


@pytest.mark.parametrize("save_mode", SAVE_MODES)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_rerank_equals_cross_encoder(archive, cross_encoders, architecture, save_mode):
    _, handler = archive(architecture, save_mode)
    oracle = cross_encoders[architecture]
    ranked = oracle.rank(QUERY, TEXTS, return_documents=True)
    raw = oracle.predict([(QUERY, text) for text in TEXTS], activation_fn=torch.nn.Identity())
    body = {"query": QUERY, "texts": TEXTS}
    # One dynamic batch: the route, the body on /predictions, raw scores, text and top_n, and
    # a plain text-pair request beside them.
    results = run_batch(
        handler,
        [
            ({"body": body}, {"url_path": "rerank"}),
            ({"body": body}, {}),
            ({"body": {**body, "raw_scores": True}}, {"url_path": "/rerank/"}),
            ({"body": {**body, "return_text": True, "top_n": 2}}, {"url_path": "rerank"}),
            ({"body": {"inputs": {"text": QUERY, "text_pair": TEXTS[0]}}}, {}),
        ],
    )
    assert [status for status, _, _ in results] == [200] * 5, results
    assert results[0][2]["X-Batch-Size"] == str(4 * len(TEXTS) + 1)
    routed, plain, raw_answer, top, single = (answer for _, answer, _ in results)
    assert routed == plain
    assert [item["index"] for item in routed] == [item["corpus_id"] for item in ranked]
    worst = max(abs(a["score"] - e["score"]) for a, e in zip(routed, ranked, strict=True))
    worst_raw = max(abs(item["score"] - float(raw[item["index"]])) for item in raw_answer)
    print(f"{architecture} {save_mode}: rank {worst:.2e}, raw {worst_raw:.2e}")
    assert worst <= ATOL and worst_raw <= ATOL
    assert [item["index"] for item in raw_answer] == [item["index"] for item in routed]
    assert set(routed[0]) == {"index", "score"}
    assert top == [
        {"index": e["corpus_id"], "score": pytest.approx(e["score"], abs=ATOL), "text": e["text"]}
        for e in ranked[:2]
    ]
    assert single[0]["score"] == pytest.approx(
        float(oracle.predict([(QUERY, TEXTS[0])])[0]), abs=ATOL
    )


@pytest.mark.parametrize("save_mode", ("torchscript", "onnx"))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_text_pairs_equal_the_pipeline(archive, checkpoints, architecture, save_mode):
    from transformers import pipeline

    _, handler = archive(architecture, save_mode)
    classifier = pipeline("text-classification", model=str(checkpoints[architecture]), top_k=None)
    classifier.tokenizer.model_max_length = MAX_LENGTH
    inputs = [{"text": a, "text_pair": b} for a, b in PAIRS]
    expected = [classifier(item, truncation=True) for item in inputs]
    ((status, answer, _),) = run_batch(handler, [({"body": {"inputs": [*inputs, "tea"]}}, {})])
    assert status == 200, answer
    worst = max(abs(a[0]["score"] - e[0]["score"]) for a, e in zip(answer, expected, strict=False))
    print(f"{architecture} {save_mode}: pairs vs pipeline {worst:.2e}")
    assert worst <= ATOL
    assert [a[0]["label"] for a in answer[:-1]] == [e[0]["label"] for e in expected]
    (tea,) = classifier(["tea"], truncation=True)  # a plain text beside the pairs
    assert answer[-1][0]["score"] == pytest.approx(tea[0]["score"], abs=ATOL)


def test_segment_ids_are_in_the_signature_when_the_model_reads_them(archive, checkpoints):
    for architecture, inputs in (
        ("bert", ["input_ids", "attention_mask", "token_type_ids"]),
        ("roberta", ["input_ids", "attention_mask"]),
    ):
        mar_path, handler = archive(architecture, "onnx")
        assert handler.token_types == (architecture == "bert")
        session_inputs = [value.name for value in handler.model.session.get_inputs()]
        assert session_inputs == inputs
        assert handler.export_metadata.get("inputs", inputs) == inputs
        with zipfile.ZipFile(mar_path) as mar:
            report = json.loads(mar.read(REPORT_FILE))
        assert report["verification"]["dynamic_shapes"]["passed"] is True
    # The segment ids change the BERT model's answer: a graph fed zeros would be wrong.
    _, handler = archive("bert", "torchscript")
    (item,) = handler.decode_texts(
        [TextPair(*PAIRS[0])],
        handler.with_defaults(handler.options_class()),
        single=True,
    ).inputs
    ids, mask, types = handler.collate([item])
    assert types.sum() > 0
    with torch.inference_mode():
        gap = handler.model(ids, mask, types) - handler.model(ids, mask, torch.zeros_like(ids))
    assert gap.abs().max() > 1e-3


def test_rerank_limits_and_bad_bodies(archive):
    _, handler = archive("bert", "torchscript")
    limit = handler.config.max_texts_per_request
    cases = [
        ({"query": QUERY, "texts": ["tea"] * (limit + 1)}, 413, "max_texts_per_request"),
        ({"query": "tea " * 3000, "texts": ["tea " * 3000] * 100}, 413, "max_tokens_per_request"),
        ({"query": QUERY, "texts": TEXTS, "top_k": 2}, 400, "top_k"),
        ({"query": QUERY, "texts": TEXTS, "top_n": 0}, 400, "top_n"),
        ({"query": QUERY, "texts": []}, 400, "texts"),
        ({"query": QUERY}, 400, "texts"),
        ({"query": 3, "texts": TEXTS}, 400, "query"),
        ({"query": " ", "texts": TEXTS}, 400, "query"),
        ({"query": QUERY, "texts": ["tea", 4]}, 400, "texts[1]"),
        ({"query": QUERY, "texts": ["tea", ""]}, 400, "texts[1]"),
        ({"query": QUERY, "texts": TEXTS, "raw_scores": "yes"}, 400, "raw_scores"),
        ({"query": QUERY, "texts": ["tea " * 40], "truncate": False}, 413, "texts[0]"),
        ({"query": QUERY, "texts": TEXTS, "truncation_direction": "up"}, 400, "truncation"),
        ({"inputs": [{"text": "a", "text_pair": "b", "label": 1}]}, 400, "label"),
        ({"inputs": [{"text": "a", "text_pair": 2}]}, 400, "inputs[0].text_pair"),
    ]
    results = run_batch(
        handler,
        [
            ({"body": body}, {"url_path": "rerank"} if "query" in body else {})
            for body, _, _ in cases
        ]
        + [({"body": {"query": QUERY, "texts": TEXTS}}, {"url_path": "rerank"})],
    )
    for (body, status, key), (got, answer, _) in zip(cases, results, strict=False):
        assert got == status, (body, answer)
        assert key in answer["message"], (key, answer)
    assert results[-1][0] == 200  # the good request batched with the bad ones still answers


def test_rerank_needs_one_output_and_old_graphs_refuse_pairs(archive, text_handlers):
    handler = text_handlers["torchscript"]  # three labels
    status, answer = rerank(handler, {"query": QUERY, "texts": TEXTS})
    assert status == 400 and "num_labels 1" in answer["message"]
    # Explanations attribute single texts; a pair asks for one of what the model ran.
    explaining = text_handlers["pretrained"]
    pair = {"inputs": {"text": "tea", "text_pair": "rain"}}
    ((status, answer, _),) = run_batch(explaining, [({"body": pair}, {"explain": "True"})])
    assert status == 400 and "single texts" in answer["message"]
    _, bert = archive("bert", "torchscript")
    bert.token_types = False  # as an archive built before pairs were served
    try:
        ((status, answer, _),) = run_batch(
            bert, [({"body": {"inputs": [{"text": "a", "text_pair": "b"}]}}, {})]
        )
    finally:
        bert.token_types = True
    assert status == 400 and "rebuild" in answer["message"]


def test_a_graph_traced_by_hand_with_token_type_ids_reranks_as_cross_encoder(
    checkpoints, cross_encoders, tmp_path
):
    """TorchServe's example traces (input_ids, attention_mask, token_type_ids) at max_length;
    served as it is (no ts_handlers.json), a pair's segment ids reach that third input."""
    from harness import (
        TORCHSERVE_EXAMPLE_SETUP,
        handmade_model_dir,
        make_context,
        trace_like_torchserve_example,
    )

    from ts_handlers.sequence_classification import SequenceClassificationHandler

    checkpoint = checkpoints["bert"]
    traced = trace_like_torchserve_example(
        checkpoint, tmp_path / "traced_model.pt", 3, max_length=MAX_LENGTH
    )
    setup = {**TORCHSERVE_EXAMPLE_SETUP, "num_labels": "1", "max_length": str(MAX_LENGTH)}
    setup["captum_explanation"] = False
    model_dir, manifest = handmade_model_dir(tmp_path / "model", checkpoint, traced, setup)
    handler = SequenceClassificationHandler()
    handler.initialize(make_context(model_dir, manifest))
    assert handler.token_types
    status, answer = rerank(handler, {"query": QUERY, "texts": TEXTS})
    assert status == 200, answer
    expected = cross_encoders["bert"].rank(QUERY, TEXTS)
    assert [item["index"] for item in answer] == [item["corpus_id"] for item in expected]
    for got, want in zip(answer, expected, strict=True):
        assert got["score"] == pytest.approx(want["score"], abs=ATOL)


def test_the_activation_a_cross_encoder_was_saved_with_scores_the_rerank(checkpoints, tmp_path):
    """CrossEncoder(activation_fn=nn.Identity()).save(...) records it in config.json, and
    CrossEncoder loads it back: rank then answers logits, and so does the archive's rerank."""
    from sentence_transformers import CrossEncoder

    saved = tmp_path / "identity"
    CrossEncoder(
        str(checkpoints["bert"]), max_length=MAX_LENGTH, activation_fn=torch.nn.Identity()
    ).save(str(saved))
    oracle = CrossEncoder(str(saved), max_length=MAX_LENGTH, device="cpu")
    assert isinstance(oracle.activation_fn, torch.nn.Identity)
    mar_path = build_text_archive(tmp_path, "identity", saved, max_length=MAX_LENGTH)
    handler = load_text_handler(mar_path, tmp_path / "model")
    assert handler.export_metadata["rerank_activation"] == "none"
    status, answer = rerank(handler, {"query": QUERY, "texts": TEXTS})
    assert status == 200, answer
    expected = oracle.rank(QUERY, TEXTS)
    assert min(item["score"] for item in expected) < 0 or max(e["score"] for e in expected) > 1
    for got, want in zip(answer, expected, strict=True):
        assert got["index"] == want["corpus_id"]
        assert got["score"] == pytest.approx(want["score"], abs=ATOL)
