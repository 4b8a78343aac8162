"""SentenceEmbeddingHandler on tiny sentence-transformers folders, against ``encode`` itself.

Each folder is a randomly initialised two-layer BERT wrapped by sentence-transformers' own
modules (Transformer, Pooling, optionally Normalize) and saved by the library, so the export
reads exactly what a real checkpoint ships. The folder goes through the real build (export,
verification, archive) and the handler is driven through a real ``ts.context.Context``. Every
pooling mode sentence-transformers has is covered, and two combinations of modes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from harness import body_headers, make_context, make_tiny_tokenizer, run_batch, unpack_archive
from sentence_transformers import SentenceTransformer
from transformers import BertConfig, BertModel
from ts.context import RequestProcessor

from ts_handlers.config import ConfigError, parse_config
from ts_handlers.export import ExportError
from ts_handlers.exporters.sentence_embedding import read_sentence_transformer
from ts_handlers.sentence_embedding import (
    POOLING_MODES,
    SentenceEmbeddingConfig,
    SentenceEmbeddingHandler,
    check_pooling_mode,
)
from ts_handlers.text import MAX_TEXTS_PER_REQUEST
from ts_handlers.tools.build import build_archive

try:  # sentence-transformers >= 5.4 moved the modules; older releases only have the old path
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
except ImportError:  # pragma: no cover - depends on the installed sentence-transformers
    from sentence_transformers.models import Normalize, Pooling, Transformer

MAX_LENGTH = 24  # the folders' max_seq_length; well below the 64 position embeddings
MIN_COSINE = 0.9999
JSON = body_headers("application/json")
HIDDEN = 32  # the tiny BERT's hidden size: one pooling mode's dimension
# Pooling mode -> whether the folder ends in a Normalize module. Every mode sentence-transformers
# has, and two combinations (written as the archive records them; the folder holds a list).
VARIANTS = {
    "mean": True,
    "cls": False,
    "max": True,
    "mean_sqrt_len_tokens": False,
    "weightedmean": True,
    "lasttoken": False,
    "mean,max": True,
    "cls,mean_sqrt_len_tokens": False,
}
SENTENCES = [
    "the movie was great",
    "I HATED every minute of this awful, boring film!!!",
    "tea",
    "a quiet afternoon with tea, books and rain; service was slow but tasty",
    "Café naïve résumé, 東京 and emoji 🙂 mixed In",
    " ".join(["what a wonderful surprise, thank you so much"] * 6),  # over MAX_LENGTH tokens
    "the battery died after two days. never again.",
]


@dataclass
class Served:
    pooling_mode: str
    has_normalize: bool
    folder: Path
    mar_path: Path
    handler: SentenceEmbeddingHandler
    reference: SentenceTransformer  # the folder as sentence-transformers loads it
    unnormalized: SentenceTransformer  # the same modules without Normalize

    @property
    def dimension(self) -> int:
        """A combination of modes concatenates one vector per mode, as the library does."""
        return HIDDEN * len(self.pooling_mode.split(","))


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """save_pretrained files of a tiny random BertModel and its WordPiece tokenizer."""
    checkpoint = tmp_path_factory.mktemp("tiny_encoder") / "checkpoint"
    tokenizer = make_tiny_tokenizer()
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        initializer_range=0.5,  # wide weights: embeddings of different texts differ clearly
        pad_token_id=0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    return checkpoint


def save_sentence_transformer(
    checkpoint: Path, folder: Path, pooling_mode: str, normalize: bool
) -> SentenceTransformer:
    transformer = Transformer(str(checkpoint), max_seq_length=MAX_LENGTH)
    modes = tuple(pooling_mode.split(","))  # "mean,max": the library's tuple of modes
    pooling = Pooling(transformer.get_embedding_dimension(), modes[0] if len(modes) == 1 else modes)
    modules = [transformer, pooling]
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, device="cpu")
    model.save(str(folder))
    return model


def write_config(config_dir: Path, folder: Path, **setup: Any) -> Path:
    config_dir.mkdir(parents=True, exist_ok=True)
    setup = {"mode": "sentence_embedding", "model_name": str(folder), **setup}
    (config_dir / "setup_config.json").write_text(json.dumps(setup))
    (config_dir / "model-config.yaml").write_text("batchSize: 8\nmaxBatchDelay: 5\n")
    return config_dir


def load_handler(mar_path: Path, model_dir: Path) -> SentenceEmbeddingHandler:
    handler = SentenceEmbeddingHandler()
    handler.initialize(make_context(model_dir, unpack_archive(mar_path, model_dir)))
    return handler


def build_served(checkpoint: Path, root: Path, pooling_mode: str) -> Served:
    has_normalize = VARIANTS[pooling_mode]
    folder = root / "model"
    saved = save_sentence_transformer(checkpoint, folder, pooling_mode, has_normalize)
    # Groups of 3 make one request's sentences span several sorted, separately padded groups.
    config_dir = write_config(root / "config", folder, inference_batch_size=3)
    name = "tiny_" + pooling_mode.replace(",", "_")  # archive names allow no comma
    mar_path = build_archive(config_dir, root / "store", name=name, force=True)
    assert mar_path is not None
    return Served(
        pooling_mode=pooling_mode,
        has_normalize=has_normalize,
        folder=folder,
        mar_path=mar_path,
        handler=load_handler(mar_path, root / "unpacked"),
        reference=SentenceTransformer(str(folder), device="cpu"),
        unnormalized=SentenceTransformer(modules=[saved[0], saved[1]], device="cpu"),
    )


@pytest.fixture(scope="module")
def served_models(tiny_encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Pooling mode -> the folder, its archive, the handler serving it and the references."""
    return {
        mode: build_served(tiny_encoder, tmp_path_factory.mktemp(f"tiny_st_{mode}"), mode)
        for mode in VARIANTS
    }


@pytest.fixture(params=list(VARIANTS))
def served(request, served_models: dict[str, Served]) -> Served:
    return served_models[request.param]


@pytest.fixture
def mean_served(served_models: dict[str, Served]) -> Served:
    """For the checks that do not depend on the pooling mode."""
    return served_models["mean"]


def cosines(actual: Any, expected: Any) -> np.ndarray:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    dots = (actual * expected).sum(axis=1)
    return dots / (np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1))


def embed(served: Served, payload: Any, headers: dict[str, Any] = JSON) -> Any:
    [(status, body, _)] = run_batch(served.handler, [({"body": payload}, headers)])
    assert status == 200, body
    return body


def test_export_records_the_resolved_fields(served: Served, tmp_path: Path):
    expected = {
        "embedding_dimension": served.dimension,
        "pooling_mode": served.pooling_mode,
        "normalize_result": served.has_normalize,
        "max_length": MAX_LENGTH,
    }
    unpacked = tmp_path / "unpacked"
    unpack_archive(served.mar_path, unpacked)
    archived = json.loads((unpacked / "setup_config.json").read_text())
    report = json.loads((unpacked / "export_report.json").read_text())
    assert {key: archived[key] for key in expected} == expected
    assert archived["pad_to_max_length"] is False  # the trace holds at every verified length
    assert {key: report["resolved"][key] for key in expected} == expected
    assert report["verification"]["dynamic_shapes"]["passed"] is True
    assert {key: served.handler.export_metadata[key] for key in expected} == expected
    assert served.reference.get_embedding_dimension() == expected["embedding_dimension"]
    assert served.reference.max_seq_length == expected["max_length"]


def test_embeddings_match_sentence_transformers(served: Served):
    normalized = embed(served, {"inputs": SENTENCES, "normalize": True})
    raw = embed(served, {"inputs": SENTENCES, "normalize": False})
    default = embed(served, {"inputs": SENTENCES})

    expected = served.reference.encode(SENTENCES, normalize_embeddings=True)
    expected_raw = served.unnormalized.encode(SENTENCES, normalize_embeddings=False)
    assert cosines(normalized, expected).min() >= MIN_COSINE
    assert cosines(raw, expected_raw).min() >= MIN_COSINE
    np.testing.assert_allclose(normalized, expected, atol=1e-5)
    np.testing.assert_allclose(raw, expected_raw, rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(normalized, axis=1) == pytest.approx([1.0] * len(SENTENCES), abs=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    # Without "normalize" the folder decides, as encode() does with and without Normalize.
    np.testing.assert_allclose(default, normalized if served.has_normalize else raw, atol=1e-6)
    np.testing.assert_allclose(default, served.reference.encode(SENTENCES), atol=1e-5)


def test_numbers_are_written_at_float32_precision(mean_served: Served):
    """Each number is float32's shortest round-trip text, not float64's 17 digits."""
    context = mean_served.handler.context
    context.request_processor = [RequestProcessor(JSON)]
    [answer] = mean_served.handler.handle([{"body": {"inputs": SENTENCES[:4]}}], context)
    numbers = re.findall(r"-?\d[\d.eE+-]*", answer.decode())
    assert len(numbers) == 4 * mean_served.dimension
    for text in numbers:
        value = np.float32(text)
        assert float(np.format_float_positional(value, unique=True)) == float(text)
        assert len(text.lstrip("-").replace(".", "").lstrip("0").split("e")[0]) <= 9


def test_order_is_restored_across_sorted_groups(served: Served):
    # Lengths deliberately out of order; with groups of 3 each group pads to its own longest.
    order = [5, 2, 0, 4, 1, 6, 3, 2]
    texts = [SENTENCES[i] for i in order]
    vectors = embed(served, {"inputs": texts, "normalize": False})
    alone = [embed(served, {"inputs": [text], "normalize": False})[0] for text in texts]
    assert cosines(vectors, alone).min() >= MIN_COSINE
    np.testing.assert_allclose(vectors, alone, atol=1e-5)
    np.testing.assert_allclose(vectors[1], vectors[7], atol=1e-6)  # the same text twice
    assert cosines(vectors[:1], vectors[2:3])[0] < 0.999  # different texts really differ


def test_request_forms_and_shapes(mean_served: Served):
    text = SENTENCES[1]
    results = run_batch(
        mean_served.handler,
        [
            ({"body": {"inputs": text}}, JSON),
            ({"body": text}, body_headers("text/plain")),
            ({"body": text.encode()}, body_headers("")),
            ({"body": json.dumps({"inputs": [text]}).encode()}, body_headers("")),
            ({"body": [text, SENTENCES[2]]}, JSON),
            ({"body": {"inputs": text, "normalize": "false"}}, JSON),
        ],
    )
    assert [status for status, _, _ in results] == [200] * 6
    bodies = [body for _, body, _ in results]
    # One string still answers with a list holding one vector, as text-embeddings-inference does.
    assert all(len(body) == 1 and len(body[0]) == 32 for body in bodies[:4] + bodies[5:])
    assert len(bodies[4]) == 2
    for body in bodies[1:5]:
        np.testing.assert_allclose(body[0], bodies[0][0], atol=1e-6)
    expected_raw = mean_served.unnormalized.encode([text])
    np.testing.assert_allclose(bodies[5], expected_raw, rtol=1e-4, atol=1e-5)
    assert {headers["X-Batch-Size"] for _, _, headers in results} == {"7"}  # texts in the batch


def test_over_long_input_is_truncated_or_refused(served: Served):
    long_text = SENTENCES[5]
    tokens = len(served.handler.tokenizer(long_text)["input_ids"])
    assert tokens > MAX_LENGTH
    results = run_batch(
        served.handler,
        [
            ({"body": {"inputs": [SENTENCES[0], long_text], "truncate": False}}, JSON),
            ({"body": {"inputs": long_text, "truncate": True}}, JSON),
            ({"body": {"inputs": SENTENCES[0], "truncate": False}}, JSON),
        ],
    )
    (refused_status, refused, _), (ok_status, truncated, _), (short_status, short, _) = results
    assert refused_status == 413
    assert refused["code"] == 413
    assert f"inputs[1] is {tokens} tokens" in refused["message"]
    assert f"at most {MAX_LENGTH}" in refused["message"]
    assert ok_status == 200 and short_status == 200  # neighbours in the batch still answer
    expected = served.reference.encode([long_text, SENTENCES[0]], normalize_embeddings=True)
    normalized = [np.asarray(v) / np.linalg.norm(v) for v in (truncated[0], short[0])]
    assert cosines(normalized, expected).min() >= MIN_COSINE


BAD_REQUESTS = {
    "empty body": (b"", body_headers(""), 400, "empty"),
    "empty list": ({"inputs": []}, JSON, 400, "empty list"),
    "not a string": ({"inputs": ["fine", 7]}, JSON, 400, "inputs[1] must be a string"),
    "whitespace only": ({"inputs": ["ok", "   "]}, JSON, 400, "inputs[1] is empty"),
    "unknown field": ({"inputs": "a", "typo": 1}, JSON, 400, "unknown field(s) typo"),
    "no inputs": ({"normalize": True}, JSON, 400, '"inputs"'),
    "inputs is a number": ({"inputs": 3}, JSON, 400, "a string or a list of strings"),
    "bad normalize": ({"inputs": "x", "normalize": "maybe"}, JSON, 400, "normalize must be"),
    "bad truncate": ({"inputs": "x", "truncate": 2}, JSON, 400, "truncate must be"),
    "broken json": (b'{"inputs": ["unterminated', body_headers(""), 400, "not valid JSON"),
    "not utf-8": (b"\xff\xfe\xfa", body_headers("text/plain"), 400, "UTF-8"),
    "too many texts": (
        {"inputs": ["a"] * (MAX_TEXTS_PER_REQUEST + 1)},
        JSON,
        413,
        f"the limit is {MAX_TEXTS_PER_REQUEST}",
    ),
}


def test_bad_requests_get_4xx_json_and_neighbours_still_answer(mean_served: Served):
    good = ({"body": {"inputs": SENTENCES[0]}}, JSON)
    requests = [good]
    for body, headers, _, _ in BAD_REQUESTS.values():
        requests.append(({"body": body}, headers))
    requests.append(good)
    results = run_batch(mean_served.handler, requests)
    for (name, (_, _, status, fragment)), (got, body, _) in zip(
        BAD_REQUESTS.items(), results[1:-1], strict=True
    ):
        assert got == status, name
        assert body["code"] == status, name
        assert fragment in body["message"], (name, body["message"])
    assert results[0][0] == results[-1][0] == 200
    np.testing.assert_allclose(results[0][1], results[-1][1], atol=1e-6)


# ---- export and config: what the folder says, and what is refused ------------------------------


def test_legacy_folder_layout_is_read_like_the_library(mean_served: Served, tmp_path: Path):
    """sentence-transformers < 5 wrote boolean pooling flags and max_seq_length; MiniLM has them."""
    legacy = tmp_path / "legacy"
    shutil.copytree(mean_served.folder, legacy)
    (legacy / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": True,
                "pooling_mode_mean_tokens": False,
                "pooling_mode_max_tokens": False,
            }
        )
    )
    (legacy / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 20, "do_lower_case": False})
    )
    folder = read_sentence_transformer(legacy)
    assert (folder.pooling_mode, folder.max_length, folder.embedding_dimension) == ("cls", 20, 32)
    assert folder.normalize_result is mean_served.has_normalize
    library = SentenceTransformer(str(legacy), device="cpu")
    assert library.max_seq_length == 20
    assert library[1].pooling_mode == "cls"


def test_setup_config_overrides_the_folder(mean_served: Served, tmp_path: Path):
    config_dir = write_config(
        tmp_path / "config",
        mean_served.folder,
        pooling_mode="MEAN",  # opensearch-py-ml's spelling
        normalize_result=not mean_served.has_normalize,
        max_length=16,
    )
    mar_path = build_archive(config_dir, tmp_path / "store", force=True)
    assert mar_path is not None
    handler = load_handler(mar_path, tmp_path / "unpacked")
    assert handler.config.pooling_mode == "mean"
    assert handler.config.normalize_result is (not mean_served.has_normalize)
    assert handler.config.max_length == 16
    [(status, body, _)] = run_batch(
        handler, [({"body": {"inputs": SENTENCES[3], "truncate": False}}, JSON)]
    )
    assert status == 413 and "at most 16" in body["message"]


def test_padding_every_input_to_max_length_keeps_parity(served: Served, tmp_path: Path):
    """The benchmark's baseline: every input padded to max_length, as TorchServe's example does."""
    config_dir = write_config(
        tmp_path / "config", served.folder, pad_to_max_length=True, max_length=MAX_LENGTH
    )
    mar_path = build_archive(config_dir, tmp_path / "store", force=True)
    assert mar_path is not None
    handler = load_handler(mar_path, tmp_path / "unpacked")
    assert handler.config.pad_to_max_length is True
    input_ids, _ = handler.collate([handler.tokenize(SENTENCES[2], 0)])
    assert input_ids.shape == (1, MAX_LENGTH)
    [(status, body, _)] = run_batch(handler, [({"body": {"inputs": SENTENCES}}, JSON)])
    assert status == 200
    expected = served.reference.encode(SENTENCES, normalize_embeddings=True)
    normalized = [np.asarray(v) / np.linalg.norm(v) for v in body]
    assert cosines(normalized, expected).min() >= MIN_COSINE


# weightedmean, lasttoken and ["mean", "max"] were refused here before the export used the
# library's own Pooling; every mode it has now builds (see VARIANTS), so only what it refuses is.
@pytest.mark.parametrize("mode", ["sum", ["mean", "sum"], [], 7])
def test_unsupported_pooling_in_the_folder_fails_the_build(
    mean_served: Served, tmp_path: Path, mode: Any
):
    folder = tmp_path / "model"
    shutil.copytree(mean_served.folder, folder)
    pooling = folder / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": mode}))
    config_dir = write_config(tmp_path / "config", folder)
    with pytest.raises(ConfigError) as error:
        build_archive(config_dir, tmp_path / "store", force=True)
    assert str(pooling) in str(error.value)
    assert all(repr(choice) in str(error.value) for choice in POOLING_MODES)
    assert not (tmp_path / "store").exists()


def test_unsupported_module_fails_the_build(mean_served: Served, tmp_path: Path):
    folder = tmp_path / "model"
    shutil.copytree(mean_served.folder, folder)
    modules = json.loads((folder / "modules.json").read_text())
    # Dense is served (tests/test_sentence_embedding_modules.py); an LSTM is not.
    modules.append({"idx": 3, "path": "3_LSTM", "type": "sentence_transformers.models.LSTM"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match="module 3 is 'sentence_transformers.models.LSTM'"):
        build_archive(write_config(tmp_path / "config", folder), tmp_path / "store", force=True)


def test_a_plain_checkpoint_is_not_a_sentence_transformers_folder(tiny_encoder, tmp_path: Path):
    with pytest.raises(ConfigError, match="no modules.json"):
        build_archive(write_config(tmp_path / "c", tiny_encoder), tmp_path / "store", force=True)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ({"pooling_mode": "sum"}, "pooling_mode='sum' is not supported; choose one of 'mean'"),
        ({"pooling_mode": "mean,sum"}, "'mean_sqrt_len_tokens', 'weightedmean', 'lasttoken'"),
        ({"pooling_mode": "mean,,max"}, "or several joined by commas"),
        ({"pooling_mode": ["mean", "max"]}, 'pooling_mode must be a string, got ["mean", "max"]'),
        ({"save_mode": "pretrained"}, "choose one of 'torchscript'"),
        ({"embedding_dimension": 0}, "embedding_dimension must be at least 1"),
        ({"max_length": 1}, "max_length must be at least 2"),
        ({"normalize_result": "yes"}, "normalize_result must be true or false"),
        ({"pooling": "mean"}, "unknown key(s) pooling"),
    ],
)
def test_bad_setup_config_fails_at_load(setup: dict[str, Any], message: str):
    with pytest.raises(ConfigError) as error:
        parse_config(SentenceEmbeddingConfig, {"mode": "sentence_embedding", **setup}, "test")
    assert message in str(error.value)


def test_handler_refuses_an_archive_without_resolved_fields(mean_served: Served, tmp_path: Path):
    model_dir = tmp_path / "unpacked"
    manifest = unpack_archive(mean_served.mar_path, model_dir)
    setup = json.loads((model_dir / "setup_config.json").read_text())
    del setup["pooling_mode"], setup["embedding_dimension"]
    (model_dir / "setup_config.json").write_text(json.dumps(setup))
    with pytest.raises(ConfigError, match="no embedding_dimension"):
        SentenceEmbeddingHandler().initialize(make_context(model_dir, manifest))


# ---- pooling: sentence-transformers' own Pooling, traced with the transformer -------------------


def test_pooling_modes_are_the_librarys():
    """POOLING_MODES is spelled out (serving needs no sentence-transformers); it must not drift."""
    assert sorted(POOLING_MODES) == sorted(Pooling.POOLING_MODES)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("MEAN", "mean"),  # opensearch-py-ml's spelling
        ("Mean_Sqrt_Len_Tokens", "mean_sqrt_len_tokens"),
        ("mean,max", "mean,max"),
        (" MAX , cls ", "max,cls"),  # the order is kept: it is the concatenation order
        (["lasttoken"], "lasttoken"),  # a pooling config's list of one
        (("cls", "weightedmean"), "cls,weightedmean"),
    ],
)
def test_pooling_mode_accepts_any_case_and_combinations(mode: Any, expected: str):
    assert check_pooling_mode(mode) == expected


def test_every_pooling_mode_matches_encode_in_one_batch(served: Served):
    """One TorchServe batch of requests with texts of varied lengths, padded on the right in
    sorted groups of 3, against encode() on the same texts (padded as one batch of its own)."""
    texts = [SENTENCES[i] for i in (2, 5, 0, 4, 1, 6, 3)]
    requests = [({"body": {"inputs": [text], "normalize": False}}, JSON) for text in texts[:4]]
    requests.append(({"body": {"inputs": texts[4:], "normalize": False}}, JSON))
    results = run_batch(served.handler, requests)
    assert [status for status, _, _ in results] == [200] * len(requests)
    vectors = [vector for _, body, _ in results for vector in body]
    expected = served.unnormalized.encode(texts, normalize_embeddings=False)
    assert len(vectors[0]) == served.reference.get_embedding_dimension() == served.dimension
    assert cosines(vectors, expected).min() >= MIN_COSINE
    np.testing.assert_allclose(vectors, expected, rtol=1e-4, atol=1e-5)


def test_lasttoken_reads_the_last_real_token_under_right_padding(
    served_models: dict[str, Served], tiny_encoder: Path
):
    handler = served_models["lasttoken"].handler
    items = [handler.tokenize(text, index) for index, text in enumerate(SENTENCES[:4])]
    input_ids, attention_mask = handler.collate(items)
    assert attention_mask[:, 0].all() and not attention_mask[:, -1].all()  # ragged, right-padded
    rows, last = torch.arange(len(items)), attention_mask.sum(dim=1) - 1
    assert (input_ids[rows, last] == handler.tokenizer.sep_token_id).all()
    with torch.inference_mode():
        pooled = handler.model(input_ids, attention_mask)
        hidden = BertModel.from_pretrained(tiny_encoder).eval()(input_ids, attention_mask)[0]
    torch.testing.assert_close(pooled, hidden[rows, last], rtol=1e-4, atol=1e-5)


def test_legacy_flags_for_several_modes_concatenate_in_the_librarys_order(
    mean_served: Served, tmp_path: Path
):
    folder = tmp_path / "model"
    shutil.copytree(mean_served.folder, folder)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": HIDDEN,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": True,
                "pooling_mode_weightedmean_tokens": True,
            }
        )
    )
    assert read_sentence_transformer(folder).pooling_mode == "max,mean,weightedmean"
    config_dir = write_config(tmp_path / "config", folder, inference_batch_size=3)
    mar_path = build_archive(config_dir, tmp_path / "store", force=True)
    assert mar_path is not None
    handler = load_handler(mar_path, tmp_path / "unpacked")
    assert handler.config.pooling_mode == "max,mean,weightedmean"
    assert handler.config.embedding_dimension == 3 * HIDDEN
    library = SentenceTransformer(str(folder), device="cpu")
    assert library[1].pooling_mode == ("max", "mean", "weightedmean")
    [(status, body, _)] = run_batch(handler, [({"body": {"inputs": SENTENCES}}, JSON)])
    assert status == 200
    expected = library.encode(SENTENCES)  # the folder ends in Normalize; so does the default
    assert cosines(body, expected).min() >= MIN_COSINE
    np.testing.assert_allclose(body, expected, atol=1e-5)


def test_setup_config_pooling_mode_may_combine_modes(mean_served: Served, tmp_path: Path):
    config_dir = write_config(
        tmp_path / "config", mean_served.folder, pooling_mode="MAX,Mean", inference_batch_size=3
    )
    mar_path = build_archive(config_dir, tmp_path / "store", force=True)
    assert mar_path is not None
    handler = load_handler(mar_path, tmp_path / "unpacked")
    assert handler.config.pooling_mode == "max,mean"
    assert handler.config.embedding_dimension == handler.export_metadata["embedding_dimension"]
    assert handler.config.embedding_dimension == 2 * HIDDEN
    library = SentenceTransformer(
        modules=[mean_served.reference[0], Pooling(HIDDEN, ("max", "mean"))], device="cpu"
    )
    payload = {"inputs": SENTENCES, "normalize": False}
    [(status, body, _)] = run_batch(handler, [({"body": payload}, JSON)])
    assert status == 200
    expected = library.encode(SENTENCES, normalize_embeddings=False)
    assert cosines(body, expected).min() >= MIN_COSINE
    np.testing.assert_allclose(body, expected, rtol=1e-4, atol=1e-5)


def test_setup_config_embedding_dimension_is_checked_against_the_pooling(
    served_models: dict[str, Served], tmp_path: Path
):
    served = served_models["mean,max"]
    config_dir = write_config(tmp_path / "config", served.folder, embedding_dimension=HIDDEN)
    with pytest.raises(ConfigError, match="embedding_dimension is 32 but the model outputs 64"):
        build_archive(config_dir, tmp_path / "store", force=True)


def test_export_without_sentence_transformers_says_how_to_install(
    mean_served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for name in [name for name in sys.modules if name.startswith("sentence_transformers")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    config_dir = write_config(tmp_path / "config", mean_served.folder)
    with pytest.raises(ExportError, match=r"pip install 'ts-handlers\[export\]'"):
        build_archive(config_dir, tmp_path / "store", force=True)
    assert not (tmp_path / "store").exists()


def test_export_refuses_a_sentence_transformers_without_pooling_mode_tuples(
    mean_served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import sentence_transformers

    monkeypatch.setattr(sentence_transformers, "__version__", "5.4.1")
    config_dir = write_config(tmp_path / "config", mean_served.folder)
    with pytest.raises(ExportError, match="needs sentence-transformers >= 6.*found 5.4.1"):
        build_archive(config_dir, tmp_path / "store", force=True)


# Loads an archive and answers one request in a fresh interpreter where sentence-transformers
# cannot be imported, as in a TorchServe worker that only has ts-handlers installed.
SERVE_WITHOUT_SENTENCE_TRANSFORMERS = """
import json, sys
sys.modules["sentence_transformers"] = None  # any import of it now fails
from pathlib import Path
from harness import body_headers, make_context, run_batch, unpack_archive
from ts_handlers.sentence_embedding import SentenceEmbeddingHandler

mar_path, model_dir, texts = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
handler = SentenceEmbeddingHandler()
handler.initialize(make_context(model_dir, unpack_archive(mar_path, model_dir)))
payload = {"inputs": texts, "normalize": False}
[(status, body, _)] = run_batch(handler, [({"body": payload}, body_headers("application/json"))])
print(json.dumps({"status": status, "body": body}))
"""


def test_serving_does_not_need_sentence_transformers(
    served_models: dict[str, Served], tmp_path: Path
):
    """The traced graph carries the pooling: a worker without the library serves the archive."""
    served = served_models["cls,mean_sqrt_len_tokens"]
    tests_dir = Path(__file__).resolve().parent
    path = [str(tests_dir), str(tests_dir.parent), os.environ.get("PYTHONPATH", "")]
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(SERVE_WITHOUT_SENTENCE_TRANSFORMERS),
            str(served.mar_path),
            str(tmp_path / "unpacked"),
            json.dumps(SENTENCES),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))},
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    answer = json.loads(completed.stdout.strip().splitlines()[-1])
    assert answer["status"] == 200, answer
    expected = served.unnormalized.encode(SENTENCES, normalize_embeddings=False)
    assert cosines(answer["body"], expected).min() >= MIN_COSINE


# ---- the user's own TorchScript file: pooling inside, no eager model ----------------------------


class EncodeGraph(torch.nn.Module):
    """What a user traces: the whole SentenceTransformer, (ids, mask) -> sentence embedding."""

    def __init__(self, model: SentenceTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features = {"input_ids": input_ids, "attention_mask": attention_mask}
        return self.model(features)["sentence_embedding"]


def test_a_users_torchscript_encoder_is_served_at_encode_parity(
    mean_served: Served, tmp_path: Path
):
    example = torch.ones((2, 16), dtype=torch.long)
    graph = EncodeGraph(mean_served.reference).eval()
    torch.jit.trace(graph, (example, example), strict=False).save(str(tmp_path / "encoder.pt"))
    config_dir = write_config(
        tmp_path / "config", mean_served.folder, serialized_file=str(tmp_path / "encoder.pt")
    )
    mar_path = build_archive(config_dir, tmp_path / "store", force=True)
    assert mar_path is not None
    handler = load_handler(mar_path, tmp_path / "unpacked")
    report = json.loads((tmp_path / "unpacked" / "export_report.json").read_text())
    assert report["verification"]["eager_reference"] is False
    assert handler.config.max_length == MAX_LENGTH  # read from the sentence-transformers folder
    [(status, body, _)] = run_batch(handler, [({"body": {"inputs": SENTENCES}}, JSON)])
    assert status == 200
    expected = mean_served.reference.encode(SENTENCES, convert_to_numpy=True)
    assert cosines(body, expected).min() >= 0.9999
