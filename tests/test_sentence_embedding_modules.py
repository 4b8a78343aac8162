"""Instruction prompts and Dense modules, against sentence-transformers' ``encode``.

Three tiny folders, each a random two-layer BERT saved by sentence-transformers itself and taken
through the real build (export, verification, archive):

* ``labse``: Transformer -> Pooling (cls) -> Dense (32->16, Tanh) -> Dense (16->16, Identity)
  -> Normalize, LaBSE's layout
* ``prompts``: mean pooling, Normalize, ``prompts`` and ``default_prompt_name`` in
  config_sentence_transformers.json (e5/bge style)
* ``instructor``: the same with Pooling ``include_prompt: false``: the prompt's tokens are
  attended to but left out of the mean

The oracle is ``SentenceTransformer(folder).encode(...)`` with the same prompt arguments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from harness import body_headers, make_context, make_tiny_tokenizer, run_batch, unpack_archive
from sentence_transformers import SentenceTransformer
from transformers import BertConfig, BertModel

from ts_handlers.config import ConfigError, parse_config
from ts_handlers.openai_api import EMBEDDINGS_PATH
from ts_handlers.sentence_embedding import (
    MAX_PROMPT_CHARS,
    SentenceEmbeddingConfig,
    SentenceEmbeddingHandler,
)
from ts_handlers.text import TOKENS_HEADER
from ts_handlers.tools.build import build_archive

try:  # sentence-transformers >= 5.4 moved the modules
    from sentence_transformers.sentence_transformer.modules import (
        Dense,
        Normalize,
        Pooling,
        Transformer,
    )
except ImportError:  # pragma: no cover - depends on the installed sentence-transformers
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer

MAX_LENGTH = 24
MIN_COSINE = 0.9999
JSON = body_headers("application/json")
PROMPTS = {"query": "query: ", "passage": "passage: ", "empty": ""}
SENTENCES = [
    "the movie was great",
    "I HATED every minute of this awful, boring film!!!",
    "tea",
    "Café naïve résumé, 東京 and emoji 🙂 mixed In",
    " ".join(["what a wonderful surprise, thank you so much"] * 6),  # over MAX_LENGTH tokens
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("modules") / "checkpoint"
    tokenizer = make_tiny_tokenizer()
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        initializer_range=0.5,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_folder(checkpoint: Path, folder: Path, kind: str) -> None:
    transformer = Transformer(str(checkpoint), max_seq_length=MAX_LENGTH)
    dimension = transformer.get_embedding_dimension()
    torch.manual_seed(1)
    extra: dict[str, Any] = {}
    if kind == "labse":
        modules = [
            transformer,
            Pooling(dimension, "cls"),
            Dense(dimension, 16, activation_function=torch.nn.Tanh()),
            Dense(16, 16, activation_function=torch.nn.Identity()),
            Normalize(),
        ]
        for layer in modules[2:4]:  # wide weights: the projection changes the vectors clearly
            torch.nn.init.normal_(layer.linear.weight, std=0.5)
    else:
        include_prompt = kind != "instructor"
        modules = [transformer, Pooling(dimension, "mean", include_prompt=include_prompt)]
        modules.append(Normalize())
        extra = {"prompts": PROMPTS, "default_prompt_name": "query"}
    SentenceTransformer(modules=modules, device="cpu", **extra).save(str(folder))


def build(folder: Path, root: Path, name: str, **setup: Any) -> SentenceEmbeddingHandler:
    config_dir = root / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    setup = {"mode": "sentence_embedding", "model_name": str(folder), **setup}
    (config_dir / "setup_config.json").write_text(json.dumps(setup))
    mar_path = build_archive(config_dir, root / "store", name=name, force=True)
    assert mar_path is not None
    handler = SentenceEmbeddingHandler()
    model_dir = root / "unpacked"
    handler.initialize(make_context(model_dir, unpack_archive(mar_path, model_dir)))
    return handler


@pytest.fixture(scope="module")
def served(checkpoint: Path, tmp_path_factory) -> dict[str, tuple[Any, SentenceTransformer]]:
    """kind -> (handler serving the built archive, the folder as sentence-transformers loads it)"""
    result = {}
    for kind in ("labse", "prompts", "instructor"):
        root = tmp_path_factory.mktemp(kind)
        save_folder(checkpoint, root / "model", kind)
        handler = build(root / "model", root, f"tiny_{kind}", inference_batch_size=3)
        result[kind] = (handler, SentenceTransformer(str(root / "model"), device="cpu"))
    return result


def cosines(actual: Any, expected: Any) -> np.ndarray:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    dots = (actual * expected).sum(axis=1)
    return dots / (np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1))


def embed(handler, body: Any, headers: dict[str, Any] = JSON) -> Any:
    [(status, answer, _)] = run_batch(handler, [({"body": body}, headers)])
    assert status == 200, answer
    return answer


# ---- Dense and Normalize ---------------------------------------------------------------------


def test_dense_modules_after_pooling_match_encode(served):
    handler, reference = served["labse"]
    assert reference.get_embedding_dimension() == 16
    assert handler.config.embedding_dimension == 16 and handler.config.normalize_result is True
    assert handler.export_metadata["dense"] == ["32->16 Tanh", "16->16 Identity"]
    vectors = embed(handler, {"inputs": SENTENCES})
    expected = reference.encode(SENTENCES)
    similarity = cosines(vectors, expected)
    print(f"labse-like: min cosine {similarity.min():.9f}")
    assert similarity.min() >= MIN_COSINE
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    # normalize: false: Transformer, Pooling and both Dense modules, without Normalize.
    raw = embed(handler, {"inputs": SENTENCES, "normalize": False})
    unnormalized = SentenceTransformer(modules=list(reference)[:4], device="cpu")
    np.testing.assert_allclose(raw, unnormalized.encode(SENTENCES), rtol=1e-4, atol=1e-5)
    # Matryoshka on top of the Dense output, as encode(truncate_dim=...) truncates it.
    short = embed(handler, {"inputs": SENTENCES, "dimensions": 8})
    expected_short = reference.encode(SENTENCES, truncate_dim=8, normalize_embeddings=True)
    assert cosines(short, expected_short).min() >= MIN_COSINE


def test_modules_out_of_order_fail_the_build(served, tmp_path: Path):
    _, reference = served["labse"]
    folder = tmp_path / "model"
    reference.save(str(folder))
    modules = json.loads((folder / "modules.json").read_text())
    modules[2], modules[4] = modules[4], modules[2]  # Normalize before the Dense modules
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match="any number of Dense, and optionally Normalize last"):
        build(folder, tmp_path, "bad_order")


# ---- prompts -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["prompts", "instructor"])
def test_prompts_match_encode(served, kind):
    handler, reference = served[kind]
    # The folder's prompts as the library reads them (it saves its own "document": "" too).
    assert handler.config.prompts == reference.prompts
    assert PROMPTS.items() <= handler.config.prompts.items()
    assert handler.config.default_prompt_name == "query"
    assert handler.config.include_prompt is (kind == "prompts")
    cases = [
        ({}, {}),  # the default prompt, as encode applies it
        ({"prompt_name": "passage"}, {"prompt_name": "passage"}),
        ({"prompt": "Represent this sentence: "}, {"prompt": "Represent this sentence: "}),
        ({"prompt_name": "empty"}, {"prompt_name": "empty"}),  # an empty prompt: none
    ]
    # Every case in one TorchServe batch: rows with and without prompts share padded groups.
    results = run_batch(
        handler, [({"body": {"inputs": SENTENCES, **options}}, JSON) for options, _ in cases]
    )
    for (options, arguments), (status, answer, headers) in zip(cases, results, strict=True):
        assert status == 200, answer
        expected = reference.encode(SENTENCES, **arguments)
        similarity = cosines(answer, expected)
        print(f"{kind} {options}: min cosine {similarity.min():.9f}")
        assert similarity.min() >= MIN_COSINE, options
        prompt = options.get("prompt", PROMPTS[options.get("prompt_name", "query")])
        tokens = reference.tokenize([prompt + text for text in SENTENCES])["attention_mask"].sum()
        assert int(headers[TOKENS_HEADER]) == int(tokens)  # the prompt's tokens ran too
    default, passage = np.asarray(results[0][1]), np.asarray(results[1][1])
    assert cosines(default, passage).max() < 0.9999  # the prompt really changes the vectors


def test_include_prompt_false_leaves_the_prompt_out_of_the_mean(served):
    with_prompt, _ = served["prompts"]
    without_prompt, reference = served["instructor"]
    included = embed(with_prompt, {"inputs": SENTENCES[:3]})
    excluded = embed(without_prompt, {"inputs": SENTENCES[:3]})
    assert cosines(included, excluded).max() < 0.9999  # the same weights, pooled differently
    # The library's own include_prompt=True pooling on the instructor folder gives `included`.
    reference[1].include_prompt = True
    try:
        np.testing.assert_allclose(included, reference.encode(SENTENCES[:3]), atol=1e-5)
    finally:
        reference[1].include_prompt = False


def test_prompts_through_openai_and_kserve(served):
    handler, reference = served["instructor"]
    body = {"input": SENTENCES[:2], "model": "m", "prompt_name": "passage"}
    answer = embed(handler, body, {**JSON, "url_path": EMBEDDINGS_PATH})
    expected = reference.encode(SENTENCES[:2], prompt_name="passage")
    assert cosines([item["embedding"] for item in answer["data"]], expected).min() >= MIN_COSINE
    v2 = {
        "inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "data": SENTENCES[:2]}],
        "parameters": {"prompt": "passage: "},
    }
    answer = embed(handler, v2)
    vectors = np.asarray(answer["outputs"][0]["data"]).reshape(2, -1)
    assert cosines(vectors, expected).min() >= MIN_COSINE


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prompt_name": "nope"}, 'prompt_name="nope" is not one of this model\'s prompts'),
        ({"prompt_name": "query", "prompt": "x"}, "prompt_name or prompt, not both"),
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
        ({"prompt_name": 3}, "prompt_name"),
    ],
)
def test_bad_prompt_options_get_400(served, options, message):
    handler, _ = served["prompts"]
    [(status, answer, _)] = run_batch(handler, [({"body": {"inputs": "a", **options}}, JSON)])
    assert status == 400 and message in answer["message"], answer


def test_a_model_without_prompts_takes_literal_prompts(served):
    handler, reference = served["labse"]
    assert set(handler.config.prompts.values()) <= {""}  # the library's empty defaults only
    [(status, answer, _)] = run_batch(
        handler, [({"body": {"inputs": "a", "prompt_name": "passage"}}, JSON)]
    )
    assert status == 400 and "is not one of this model's prompts" in answer["message"]
    vectors = embed(handler, {"inputs": SENTENCES, "prompt": "q: "})
    assert cosines(vectors, reference.encode(SENTENCES, prompt="q: ")).min() >= MIN_COSINE


def test_prompt_config_is_checked():
    setup = {"mode": "sentence_embedding", "prompts": {"query": "q: "}, "default_prompt_name": "x"}
    with pytest.raises(ConfigError, match="default_prompt_name 'x' is not one of the prompts"):
        parse_config(SentenceEmbeddingConfig, setup, "setup_config.json")


def test_include_prompt_false_with_weightedmean_fails_the_build(checkpoint, tmp_path: Path):
    transformer = Transformer(str(checkpoint), max_seq_length=MAX_LENGTH)
    pooling = Pooling(transformer.get_embedding_dimension(), "weightedmean", include_prompt=False)
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(tmp_path / "m"))
    with pytest.raises(ConfigError, match="weightedmean"):
        build(tmp_path / "m", tmp_path, "bad_weightedmean")


def test_tokenize_reads_the_prompt_a_prediction_prepends(served):
    """The tokenize route answers the ids a prediction runs: the default prompt, or the one
    named, before the text (text-embeddings-inference's /tokenize takes prompt_name too)."""
    from ts_handlers.text import TOKENIZE_PATH

    handler, reference = served["prompts"]
    tokenize = {**JSON, "url_path": TOKENIZE_PATH}
    for options, prompt in [({}, "query: "), ({"prompt_name": "passage"}, "passage: ")]:
        [(status, answer, _)] = run_batch(
            handler, [({"body": {"inputs": SENTENCES, **options}}, tokenize)]
        )
        assert status == 200, answer
        features = reference.tokenize([prompt + text for text in SENTENCES])
        for tokens, ids, mask in zip(
            answer, features["input_ids"], features["attention_mask"], strict=True
        ):
            assert [token["id"] for token in tokens] == ids[mask.bool()].tolist()
        assert answer[0][1]["start"] == 0 and prompt.startswith(answer[0][1]["text"])
    [(status, answer, _)] = run_batch(
        handler, [({"body": {"inputs": "a", "prompt_name": "nope"}}, tokenize)]
    )
    assert status == 400 and "prompt_name" in answer["message"]
