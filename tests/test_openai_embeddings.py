"""OpenAI's embeddings API, Matryoshka ``dimensions``, token counts and tokenize requests.

One tiny sentence-transformers folder (random two-layer BERT, mean pooling, Normalize) goes
through the real build; its handler is driven through a real ``ts.context.Context``. The
oracles are sentence-transformers' ``encode`` (``truncate_dim`` included) and the model's own
tokenizer as sentence-transformers calls it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness import (
    body_headers,
    make_context,
    run_batch,
    save_tiny_sentence_transformer,
    unpack_archive,
)
from sentence_transformers import SentenceTransformer

from ts_handlers.config import ConfigError, parse_config
from ts_handlers.openai_api import EMBEDDINGS_PATH
from ts_handlers.sentence_embedding import SentenceEmbeddingConfig, SentenceEmbeddingHandler
from ts_handlers.text import TOKENIZE_PATH, TOKENS_HEADER
from ts_handlers.tools.build import build_archive

MAX_LENGTH = 24
DIMENSION = 32
MIN_COSINE = 0.9999
JSON = body_headers("application/json")
SENTENCES = [
    "the movie was great",
    "I HATED every minute of this awful, boring film!!!",
    "tea",
    "Café naïve résumé, 東京 and emoji 🙂 mixed In",
    " ".join(["what a wonderful surprise, thank you so much"] * 6),  # over MAX_LENGTH tokens
]


def route(path: str) -> dict[str, Any]:
    """What TorchServe sends for /predictions/<model>/<version>/<path>."""
    return {**JSON, "url_path": path}


OPENAI = route(EMBEDDINGS_PATH)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[SentenceEmbeddingHandler, Path]:
    root = tmp_path_factory.mktemp("openai")
    folder = save_tiny_sentence_transformer(root, max_seq_length=MAX_LENGTH, normalize=True)
    config_dir = root / "config"
    config_dir.mkdir()
    setup = {"mode": "sentence_embedding", "model_name": str(folder), "inference_batch_size": 3}
    (config_dir / "setup_config.json").write_text(json.dumps(setup))
    mar_path = build_archive(config_dir, root / "store", name="tiny_openai", force=True)
    assert mar_path is not None
    model_dir = root / "unpacked"
    handler = SentenceEmbeddingHandler()
    handler.initialize(make_context(model_dir, unpack_archive(mar_path, model_dir)))
    return handler, folder


@pytest.fixture(scope="module")
def handler(served) -> SentenceEmbeddingHandler:
    return served[0]


@pytest.fixture(scope="module")
def reference(served) -> SentenceTransformer:
    return SentenceTransformer(str(served[1]), device="cpu")


@pytest.fixture(scope="module")
def unnormalized(reference) -> SentenceTransformer:
    """The folder's Transformer and Pooling alone: encode() without its Normalize module."""
    return SentenceTransformer(modules=[reference[0], reference[1]], device="cpu")


def one(handler, body: Any, headers: dict[str, Any] = OPENAI) -> tuple[int, Any, dict]:
    [result] = run_batch(handler, [({"body": body}, headers)])
    return result


def cosines(actual: Any, expected: Any) -> np.ndarray:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    dots = (actual * expected).sum(axis=1)
    return dots / (np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1))


def token_counts(reference: SentenceTransformer, texts: list[str]) -> list[int]:
    """Tokens the model runs per text, as sentence-transformers tokenizes (and truncates)."""
    features = reference.tokenize(texts)
    return features["attention_mask"].sum(dim=1).tolist()


# ---- OpenAI's embeddings API ---------------------------------------------------------------


@pytest.mark.parametrize("headers", [OPENAI, JSON], ids=["v1/embeddings", "predictions"])
def test_openai_answer_matches_encode_and_counts_tokens(handler, reference, headers):
    status, body, response_headers = one(
        handler, {"input": SENTENCES, "model": "tiny_openai"}, headers
    )
    assert status == 200, body
    assert body["object"] == "list" and body["model"] == "tiny_openai"
    assert [item["index"] for item in body["data"]] == list(range(len(SENTENCES)))
    assert {item["object"] for item in body["data"]} == {"embedding"}
    vectors = [item["embedding"] for item in body["data"]]
    similarity = cosines(vectors, reference.encode(SENTENCES))
    assert similarity.min() >= MIN_COSINE
    tokens = sum(token_counts(reference, SENTENCES))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert int(response_headers[TOKENS_HEADER]) == tokens
    assert token_counts(reference, SENTENCES[-1:]) == [MAX_LENGTH]  # truncated, specials in


def test_openai_single_string_and_base64(handler, reference):
    status, floats, _ = one(handler, {"input": SENTENCES[0], "model": "m"})
    assert status == 200, floats
    status, encoded, _ = one(
        handler, {"input": SENTENCES[0], "model": "m", "encoding_format": "base64"}
    )
    assert status == 200, encoded
    [item] = encoded["data"]
    decoded = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
    # The same float32 bytes the float form writes (orjson writes float32's shortest text).
    np.testing.assert_array_equal(decoded, np.asarray(floats["data"][0]["embedding"], "<f4"))
    assert cosines([decoded], reference.encode(SENTENCES[:1]))[0] >= MIN_COSINE


@pytest.mark.parametrize("dimensions", [8, 16, DIMENSION])
def test_dimensions_truncate_before_normalising_as_encode_truncate_dim(
    handler, reference, unnormalized, dimensions
):
    body = {"input": SENTENCES, "model": "m", "dimensions": dimensions}
    status, answer, _ = one(handler, body)
    assert status == 200, answer
    vectors = np.array([item["embedding"] for item in answer["data"]])
    expected = reference.encode(SENTENCES, truncate_dim=dimensions, normalize_embeddings=True)
    assert vectors.shape == expected.shape == (len(SENTENCES), dimensions)
    assert cosines(vectors, expected).min() >= MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # normalize: false (an option beside OpenAI's fields): the first dimensions, as they are.
    status, raw, _ = one(handler, {**body, "normalize": False})
    assert status == 200, raw
    expected_raw = unnormalized.encode(SENTENCES, truncate_dim=dimensions)
    np.testing.assert_allclose(
        [item["embedding"] for item in raw["data"]], expected_raw, rtol=1e-4, atol=1e-5
    )
    # The task's own form and KServe v2 take the same option.
    status, own, _ = one(handler, {"inputs": SENTENCES, "dimensions": dimensions}, JSON)
    assert status == 200, own
    assert cosines(own, expected).min() >= MIN_COSINE
    v2 = {
        "inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": SENTENCES[:1]}],
        "parameters": {"dimensions": dimensions},
    }
    status, answer, _ = one(handler, v2, JSON)
    assert status == 200, answer
    assert answer["outputs"][0]["shape"] == [1, dimensions]


def test_truncate_dim_in_the_config_is_the_default(handler, reference):
    original = handler.config
    handler.config = original.replace(truncate_dim=8)
    try:
        status, answer, _ = one(handler, {"input": SENTENCES, "model": "m"})
        status_own, own, _ = one(handler, {"inputs": SENTENCES}, JSON)
        status_wide, wide, _ = one(handler, {"input": SENTENCES, "model": "m", "dimensions": 12})
    finally:
        handler.config = original
    assert (status, status_own, status_wide) == (200, 200, 200)
    expected = reference.encode(SENTENCES, truncate_dim=8, normalize_embeddings=True)
    assert cosines([item["embedding"] for item in answer["data"]], expected).min() >= MIN_COSINE
    assert cosines(own, expected).min() >= MIN_COSINE
    assert len(wide["data"][0]["embedding"]) == 12  # a request may ask for more than the default


def test_truncate_dim_above_the_dimension_fails_at_load():
    setup = {"mode": "sentence_embedding", "embedding_dimension": 32, "truncate_dim": 33}
    with pytest.raises(ConfigError, match="truncate_dim"):
        parse_config(SentenceEmbeddingConfig, setup, "setup_config.json")


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"input": "a", "model": "m", "dimensions": DIMENSION + 1}, 400, "dimensions=33"),
        ({"input": "a", "model": "m", "dimensions": 0}, 400, "dimensions"),
        ({"input": "a", "model": "m", "extra": 1}, 400, "unknown field(s) extra"),
        ({"input": "a", "model": "m", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "a"}, 400, "model is required"),
        ({"input": "a", "model": "m" * 300}, 400, "model is 300 characters"),
        ({"input": [1, 2, 3], "model": "m"}, 400, "token id"),
        ({"input": [], "model": "m"}, 400, "non-empty list"),
        ({"input": ["ok", ""], "model": "m"}, 400, "input[1] is empty"),
        ({"input": ["a"] * 257, "model": "m"}, 413, "max_texts_per_request"),
        ({"model": "m"}, 400, "input is required"),
        ([1, 2], 400, "JSON object"),
    ],
)
def test_openai_errors_come_in_openais_shape(handler, body, status, message):
    got, answer, _ = one(handler, body)
    assert got == status, answer
    assert set(answer) == {"error"}
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert message in error["message"]


def test_broken_json_on_the_route_is_an_openai_error(handler):
    status, answer, _ = one(handler, b'{"input": ', OPENAI)
    assert status == 400 and "not valid JSON" in answer["error"]["message"]


def test_unknown_routes_get_404(handler):
    status, answer, _ = one(handler, {"inputs": "a"}, route("v2/nothing"))
    assert status == 404 and answer["type"] == "NotFound" and "tokenize" in answer["message"]


def test_every_form_shares_one_batch_and_errors_stay_their_own(handler, reference):
    v2 = {"inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "data": SENTENCES[:2]}]}
    results = run_batch(
        handler,
        [
            ({"body": {"input": SENTENCES[:3], "model": "m"}}, OPENAI),
            ({"body": {"inputs": SENTENCES[3:]}}, JSON),
            ({"body": {"input": "x", "model": "m", "dimensions": 99}}, OPENAI),
            ({"body": v2}, JSON),
            ({"body": {"inputs": "hello"}}, route(TOKENIZE_PATH)),
        ],
    )
    statuses = [status for status, _, _ in results]
    assert statuses == [200, 200, 400, 200, 200]
    # One forward over every prediction's texts: 3 + 2 + 2.
    assert {int(headers["X-Batch-Size"]) for _, _, headers in results} == {7}
    assert "error" in results[2][1]
    openai_vectors = [item["embedding"] for item in results[0][1]["data"]]
    expected = reference.encode(SENTENCES)
    assert cosines(openai_vectors, expected[:3]).min() >= MIN_COSINE
    assert cosines(results[1][1], expected[3:]).min() >= MIN_COSINE
    counts = token_counts(reference, SENTENCES)
    assert int(results[0][2][TOKENS_HEADER]) == sum(counts[:3])
    assert int(results[1][2][TOKENS_HEADER]) == sum(counts[3:])
    assert int(results[3][2][TOKENS_HEADER]) == sum(counts[:2])
    assert TOKENS_HEADER not in results[2][2] and TOKENS_HEADER not in results[4][2]


# ---- tokenize -------------------------------------------------------------------------------


def test_tokenize_answers_what_the_model_runs(handler, reference):
    status, answer, _ = one(handler, {"inputs": SENTENCES}, route(TOKENIZE_PATH))
    assert status == 200, answer
    tokenizer = reference.tokenizer
    features = reference.tokenize(SENTENCES)
    for text, tokens, ids, mask in zip(
        SENTENCES, answer, features["input_ids"], features["attention_mask"], strict=True
    ):
        expected_ids = ids[mask.bool()].tolist()
        assert [token["id"] for token in tokens] == expected_ids
        assert [token["token"] for token in tokens] == tokenizer.convert_ids_to_tokens(expected_ids)
        encoding = tokenizer(
            text,
            truncation=True,
            max_length=MAX_LENGTH,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        # "special": the tokens the tokenizer added ([CLS], [SEP]); an [UNK] is the text's own.
        for token, (start, stop), special in zip(
            tokens, encoding["offset_mapping"], encoding["special_tokens_mask"], strict=True
        ):
            special = bool(special)
            assert token["special"] is special
            if special:
                assert (token["start"], token["stop"]) == (None, None)
            else:
                assert (token["start"], token["stop"]) == (start, stop)
                assert token["text"] == text[start:stop]
    assert len(answer[-1]) == MAX_LENGTH  # truncated as the model reads it
    assert [t["special"] for t in answer[0]] == [True] + [False] * (len(answer[0]) - 2) + [True]


def test_tokenize_options_and_limits(handler, reference):
    tokenize = route(TOKENIZE_PATH)
    status, answer, _ = one(handler, {"inputs": "the movie", "add_special_tokens": False}, tokenize)
    assert status == 200, answer
    [tokens] = answer
    assert [t["id"] for t in tokens] == reference.tokenizer("the movie", add_special_tokens=False)[
        "input_ids"
    ]
    assert not any(token["special"] for token in tokens)
    status, answer, _ = one(handler, "the movie", {**body_headers("text/plain"), **tokenize})
    assert status == 200 and len(answer) == 1 and answer[0][0]["special"] is True
    status, answer, _ = one(handler, {"inputs": SENTENCES[-1], "truncate": False}, tokenize)
    assert status == 413 and "truncate" in answer["message"]
    status, answer, _ = one(handler, {"inputs": "a", "normalize": True}, tokenize)
    assert status == 400 and "unknown field(s) normalize" in answer["message"]
    status, answer, _ = one(handler, {"inputs": ["a"] * 257}, tokenize)
    assert status == 413 and "max_texts_per_request" in answer["message"]


# ---- truncation_side ------------------------------------------------------------------------


def test_truncation_side_left_matches_encode_with_a_left_truncating_tokenizer(handler, reference):
    long = SENTENCES[-1] + " and then the battery died after two days"
    texts = [SENTENCES[0], long]
    reference.tokenizer.truncation_side = "left"
    try:
        expected = reference.encode(texts)
        left_ids = reference.tokenize([long])["input_ids"][0].tolist()
    finally:
        reference.tokenizer.truncation_side = "right"
    right = reference.encode(texts)
    assert cosines(expected[1:], right[1:])[0] < 0.9999  # the two ends really differ
    status, answer, _ = one(handler, {"inputs": texts, "truncation_side": "left"}, JSON)
    assert status == 200, answer
    assert cosines(answer, expected).min() >= MIN_COSINE
    status, answer, _ = one(handler, {"input": texts, "model": "m", "truncation_side": "left"})
    assert status == 200, answer
    assert cosines([item["embedding"] for item in answer["data"]], expected).min() >= MIN_COSINE
    # The archive's default, and a request that asks for the other side.
    original = handler.config
    handler.config = original.replace(truncation_side="left")
    try:
        _, by_default, _ = one(handler, {"inputs": texts}, JSON)
        _, asked_right, _ = one(handler, {"inputs": texts, "truncation_side": "right"}, JSON)
        _, tokens, _ = one(handler, {"inputs": long}, route(TOKENIZE_PATH))
    finally:
        handler.config = original
    assert cosines(by_default, expected).min() >= MIN_COSINE
    assert cosines(asked_right, right).min() >= MIN_COSINE
    [tokens] = tokens
    assert [token["id"] for token in tokens] == left_ids
    for token in tokens:  # offsets index the text as sent, also when its start was cut
        if not token["special"]:
            assert long[token["start"] : token["stop"]] == token["text"]
    assert tokens[-2]["stop"] == len(long)


def test_a_bad_truncation_side_gets_400(handler):
    status, answer, _ = one(handler, {"inputs": "a", "truncation_side": "middle"}, JSON)
    assert status == 400 and "truncation_side" in answer["message"]
    assert "'right'" in answer["message"] and "'left'" in answer["message"]
