"""Reranking and text pairs on a real TorchServe, against sentence-transformers' CrossEncoder.

Two tiny cross-encoders built here (BERT-style, which reads segment ids, and RoBERTa-style,
which has none), each taken through the real build as TorchScript, AOTInductor and ONNX
archives, all served by one TorchServe 0.12 with token authorization on. Requests go to
``/predictions/<model>/<version>/rerank`` (TorchServe hands ``rerank`` to the handler as
``url_path``) and, as a body, to ``/predictions/<model>``, concurrently with text-pair
requests, so the pairs of different requests share dynamic batches. The demo reranker
(``make archives``: ``model_store/reranker.mar`` from ``build/checkpoints/reranker``) is served
beside them and checked the same way on its held-out queries.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from harness import build_text_archive, save_tiny_cross_encoder
from serving import MODEL_STORE, ROOT, require

from ts_handlers.tools.server import LocalTorchServe

MAX_LENGTH = 24
ATOL = 1e-4
ARCHITECTURES = ("bert", "roberta")
SAVE_MODES = {"torchscript": "ts", "aot_inductor": "aoti", "onnx": "onnx"}
QUERY = "was the food tasty"
TEXTS = [
    "service was slow but the food was really tasty",
    "tea",
    "the battery died after two days; never again. " * 4,
    "What a WONDERFUL surprise!!!",
    "a quiet afternoon with tea, books and rain",
    "i hated every minute of this awful boring film",
]
# The demo reranker's checkpoint (scripts/train_reranker.py); another folder for a trial run.
DEMO_CHECKPOINT = Path(
    os.environ.get("TS_HANDLERS_RERANKER_CHECKPOINT", ROOT / "build/checkpoints/reranker")
)
DEMO_MIN_ACCURACY = 0.9
MODELS = [
    f"rerank_{architecture}_{short}"
    for architecture in ARCHITECTURES
    for short in SAVE_MODES.values()
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("rerank_served")
    checkpoints = {name: save_tiny_cross_encoder(root / name, name) for name in ARCHITECTURES}
    for architecture, checkpoint in checkpoints.items():
        for save_mode, short in SAVE_MODES.items():
            build_text_archive(
                root,
                f"rerank_{architecture}_{short}",
                checkpoint,
                save_mode=save_mode,
                max_length=MAX_LENGTH,
                inference_batch_size=8,
            )
    shutil.copy(require(MODEL_STORE / "reranker.mar"), root / "store" / "reranker.mar")
    return {"store": root / "store", "checkpoints": checkpoints}


@pytest.fixture(scope="module")
def server(built: dict[str, Any]) -> Iterator[LocalTorchServe]:
    archives = [f"{model}.mar" for model in MODELS] + ["reranker.mar"]
    with LocalTorchServe(built["store"], archives) as local:
        yield local


@pytest.fixture(scope="module")
def oracles(built: dict[str, Any]) -> dict[str, Any]:
    from sentence_transformers import CrossEncoder

    return {
        name: CrossEncoder(str(folder), max_length=MAX_LENGTH, device="cpu")
        for name, folder in built["checkpoints"].items()
    }


@pytest.mark.parametrize("model", MODELS)
def test_rerank_on_torchserve_equals_cross_encoder(server, oracles, model):
    architecture = model.split("_")[1]
    oracle = oracles[architecture]
    version = server.client().describe(model)["modelVersion"]
    session = requests.Session()
    session.headers.update(server.auth_headers("inference"))
    routed = f"{server.inference_url}/predictions/{model}/{version}/rerank"
    plain = f"{server.inference_url}/predictions/{model}"
    body = {"query": QUERY, "texts": TEXTS}
    pairs = {"inputs": [{"text": QUERY, "text_pair": text} for text in TEXTS]}
    calls = [
        (routed, body),
        (plain, body),
        (routed, {**body, "raw_scores": True}),
        (routed, {**body, "return_text": True, "top_n": 3}),
        (plain, pairs),
    ] * 3

    def send(call: tuple[str, dict[str, Any]]) -> requests.Response:
        return session.post(call[0], json=call[1], timeout=120)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(send, calls))
    assert [response.status_code for response in responses] == [200] * len(calls), [
        response.text for response in responses if response.status_code != 200
    ]
    ranked = oracle.rank(QUERY, TEXTS, return_documents=True)
    raw = oracle.predict([(QUERY, text) for text in TEXTS], activation_fn=torch.nn.Identity())
    scores = oracle.predict([(QUERY, text) for text in TEXTS])
    worst = {"rank": 0.0, "raw": 0.0, "pairs": 0.0}
    for index, response in enumerate(responses):
        answer = response.json()
        kind = index % 5
        if kind in (0, 1):
            assert [item["index"] for item in answer] == [item["corpus_id"] for item in ranked]
            for got, want in zip(answer, ranked, strict=True):
                worst["rank"] = max(worst["rank"], abs(got["score"] - want["score"]))
        elif kind == 2:
            for item in answer:
                worst["raw"] = max(worst["raw"], abs(item["score"] - float(raw[item["index"]])))
        elif kind == 3:
            assert [item["index"] for item in answer] == [e["corpus_id"] for e in ranked[:3]]
            assert [item["text"] for item in answer] == [e["text"] for e in ranked[:3]]
        else:
            for labels, want in zip(answer, scores, strict=True):
                worst["pairs"] = max(worst["pairs"], abs(labels[0]["score"] - float(want)))
    batch_sizes = sorted({int(response.headers["X-Batch-Size"]) for response in responses})
    print(f"{model}: largest differences {worst}; batch sizes {batch_sizes}")
    assert max(worst.values()) <= ATOL
    # Requests of several forms ran together: some batch held more than one request's pairs.
    assert max(batch_sizes) > len(TEXTS)


def test_rerank_errors_over_http(server):
    session = requests.Session()
    session.headers.update(server.auth_headers("inference"))
    url = f"{server.inference_url}/predictions/rerank_bert_ts"
    version = server.client().describe("rerank_bert_ts")["modelVersion"]
    cases = [
        ({"query": QUERY, "texts": ["tea"] * 257}, 413, "max_texts_per_request"),
        ({"query": QUERY, "texts": TEXTS, "top_k": 1}, 400, "top_k"),
        ({"query": QUERY, "texts": []}, 400, "texts"),
    ]
    for body, status, key in cases:
        response = session.post(f"{url}/{version}/rerank", json=body, timeout=60)
        assert response.status_code == status, response.text
        assert key in response.json()["message"]
    wrong_route = session.post(f"{url}/{version}/v1/rerank", json=cases[0][0], timeout=60)
    assert wrong_route.status_code == 404


def test_the_demo_reranker_ranks_held_out_queries_as_cross_encoder(server):
    """Each held-out query ranks its sentence among 7 other held-out sentences on TorchServe,
    as CrossEncoder.rank ranks them on the checkpoint."""
    import random

    from sentence_transformers import CrossEncoder

    with require(DEMO_CHECKPOINT / "heldout.tsv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    oracle = CrossEncoder(str(DEMO_CHECKPOINT), max_length=128, device="cpu")
    rng = random.Random(0)
    session = requests.Session()
    session.headers.update(server.auth_headers("inference"))
    url = f"{server.inference_url}/predictions/reranker/1.0/rerank"
    texts = [row["text"] for row in rows]
    worst, first = 0.0, 0
    for row in rows:
        others = [text for text in texts if text != row["text"]]
        candidates = [row["text"], *rng.sample(others, 7)]
        response = session.post(url, json={"query": row["query"], "texts": candidates}, timeout=60)
        assert response.status_code == 200, response.text
        answer = response.json()
        expected = oracle.rank(row["query"], candidates)
        assert [item["index"] for item in answer] == [item["corpus_id"] for item in expected]
        for got, want in zip(answer, expected, strict=True):
            worst = max(worst, abs(got["score"] - want["score"]))
        first += answer[0]["index"] == 0
    accuracy = first / len(rows)
    print(
        f"demo reranker: {len(rows)} held-out queries, accuracy@1 {accuracy:.3f}, "
        f"largest difference from CrossEncoder.rank {worst:.2e}"
    )
    assert worst <= ATOL
    assert accuracy >= DEMO_MIN_ACCURACY
