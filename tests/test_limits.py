"""Every per-request limit of docs/limits.md, on tiny archives taken through the real build.

For each limit: a request at the limit answers 200, one over it answers 413 with the JSON error
body naming the limit's setup_config.json key, and a good request in the same batch still
answers 200. A limit is changed for one test by replacing the handler's parsed config, exactly
as a different setup_config.json value would (the keys themselves go through the build below).
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from harness import (
    TINY_TEXT_CORPUS,
    body_headers,
    load_text_handler,
    make_bpe_tokenizer,
    make_context,
    make_tiny_tokenizer,
    make_unigram_tokenizer,
    run_batch,
    save_tiny_sentence_transformer,
    unpack_archive,
    write_text_config,
)
from PIL import Image

from ts_handlers.config import ConfigError, parse_config
from ts_handlers.image_classification import ImageClassificationConfig, decoded_bytes
from ts_handlers.payload import Request
from ts_handlers.sequence_classification import SequenceClassificationConfig
from ts_handlers.text import (
    CHARS_PER_TOKEN,
    MAX_FLOAT_CHARS,
    MAX_TEXTS_PER_REQUEST,
    MAX_TOKENS_PER_REQUEST,
    answer_bytes,
)
from ts_handlers.tools.build import build_archive
from ts_handlers.tools.server import DEFAULT_MAX_RESPONSE_SIZE, PORT_NAMES, LocalTorchServe

REPO = Path(__file__).resolve().parents[1]
JSON = body_headers("application/json")
# The limits the classifier archive below is built with (setup_config.json keys).
ARCHIVE_LIMITS = {"max_texts_per_request": 6, "max_tokens_per_request": 64}


def ask(body: Any, **headers: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A JSON request as TorchServe hands it over with TS_DECODE_INPUT_REQUEST=false."""
    return {"body": json.dumps(body).encode()}, {**JSON, **headers}


GOOD = ask({"inputs": "the movie was great"})


@contextlib.contextmanager
def limits(handler: Any, **values: Any) -> Iterator[Any]:
    """The handler with some config values changed (checked as the config class checks them)."""
    config = handler.config
    handler.config = config.replace(**values)
    try:
        yield handler
    finally:
        handler.config = config


def assert_refused(result: tuple[int, Any, Any], key: str, *fragments: str) -> None:
    status, body, _ = result
    assert status == 413, body
    assert set(body) == {"code", "type", "message"}
    assert (body["code"], body["type"]) == (413, "PayloadTooLarge")
    for fragment in (key, *fragments):
        assert fragment in body["message"], body["message"]


def tokens(handler: Any, text: str) -> int:
    return len(
        handler.tokenizer(text, truncation=True, max_length=handler.config.max_length)["input_ids"]
    )


# ---- archives --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(tiny_text_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny classifier built with limits in its setup_config.json (max_length 32)."""
    root = tmp_path_factory.mktemp("limits_classifier")
    config_dir = write_text_config(
        root / "tiny_limits", tiny_text_checkpoint, inference_batch_size=4, **ARCHIVE_LIMITS
    )
    mar_path = build_archive(config_dir, root / "store", force=True)
    assert mar_path is not None
    return load_text_handler(mar_path, root / "unpacked")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny sentence-transformers folder (32 dimensions, mean pooling) through the build."""
    from ts_handlers.sentence_embedding import SentenceEmbeddingHandler

    root = tmp_path_factory.mktemp("limits_encoder")
    save_tiny_sentence_transformer(root, max_seq_length=24, layers=1)
    config_dir = root / "config"
    config_dir.mkdir()
    (config_dir / "setup_config.json").write_text(
        json.dumps({"mode": "sentence_embedding", "model_name": str(root / "model")})
    )
    (config_dir / "model-config.yaml").write_text("batchSize: 4\nmaxBatchDelay: 5\n")
    mar_path = build_archive(config_dir, root / "store", name="tiny_limits_encoder", force=True)
    assert mar_path is not None
    model_dir = root / "unpacked"
    handler = SentenceEmbeddingHandler()
    handler.initialize(make_context(model_dir, unpack_archive(mar_path, model_dir)))
    return handler


# ---- config keys -----------------------------------------------------------------------


def test_limits_are_setup_config_keys_with_defaults(classifier):
    defaults = parse_config(SequenceClassificationConfig, {"mode": "sequence_classification"}, "t")
    assert defaults.max_texts_per_request == MAX_TEXTS_PER_REQUEST
    assert defaults.max_tokens_per_request == MAX_TOKENS_PER_REQUEST
    assert defaults.max_response_size == DEFAULT_MAX_RESPONSE_SIZE
    assert ImageClassificationConfig().max_image_bytes == 4096 * 4096 * 3
    # The archive carries the keys it was built with, and the handler serves by them.
    for key, value in ARCHIVE_LIMITS.items():
        assert getattr(classifier.config, key) == value
        assert classifier.describe()["config"][key] == value


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        ({"max_texts_per_request": 0}, "max_texts_per_request must be at least 1"),
        ({"max_tokens_per_request": 0}, "max_tokens_per_request must be at least 1"),
        ({"max_response_size": -1}, "max_response_size must be at least 1"),
        ({"max_tokens_per_request": 100, "max_length": 128}, "below max_length"),
        ({"max_texts_per_request": "many"}, "max_texts_per_request must be an integer"),
    ],
)
def test_bad_limit_values_fail_at_load(setup: dict[str, Any], fragment: str):
    with pytest.raises(ConfigError, match=fragment):
        parse_config(
            SequenceClassificationConfig, {"mode": "sequence_classification", **setup}, "t"
        )
    with pytest.raises(ConfigError, match="max_image_bytes must be at least 1"):
        parse_config(ImageClassificationConfig, {"max_image_bytes": 0}, "t")


def test_server_configs_match_the_handler_limits(tmp_path: Path):
    """The frontend's max_response_size is what the handlers bound their answers by."""
    server = LocalTorchServe(tmp_path)
    properties = server.properties(dict.fromkeys(PORT_NAMES, 1))
    assert properties["max_response_size"] == DEFAULT_MAX_RESPONSE_SIZE
    for folder in sorted((REPO / "archiver_configs").iterdir()):
        setup = json.loads((folder / "setup_config.json").read_text())
        assert (
            setup.get("max_response_size", DEFAULT_MAX_RESPONSE_SIZE)
            <= (properties["max_response_size"])
        ), folder.name
        model_config = yaml.safe_load((folder / "model-config.yaml").read_text())
        assert model_config.get("responseTimeout"), f"{folder.name} sets no responseTimeout"


# ---- texts per request -----------------------------------------------------------------


def test_texts_per_request(classifier):
    limit = classifier.config.max_texts_per_request
    results = run_batch(
        classifier,
        [ask({"inputs": ["tea"] * limit}), ask({"inputs": ["tea"] * (limit + 1)}), GOOD],
    )
    assert results[0][0] == 200 and len(results[0][1]) == limit
    assert_refused(results[1], "max_texts_per_request", f"{limit + 1} texts", f"is {limit}")
    assert results[2][0] == 200


# ---- tokens per request ----------------------------------------------------------------


def test_tokens_per_request_count_tokens_after_truncation(classifier):
    max_length = classifier.config.max_length
    full = "tea " * (max_length - 2)  # exactly max_length tokens with [CLS] and [SEP]
    long = "tea " * 500  # truncated to max_length
    assert tokens(classifier, full) == tokens(classifier, long) == max_length
    budget = 2 * max_length
    with limits(classifier, max_tokens_per_request=budget):
        at_limit = run_batch(classifier, [ask({"inputs": [full, long]}), GOOD])
    with limits(classifier, max_tokens_per_request=budget - 1):
        over = run_batch(classifier, [GOOD, ask({"inputs": [full, long]}), GOOD])
    assert [status for status, _, _ in at_limit] == [200, 200]
    assert_refused(over[1], "max_tokens_per_request", f"{budget} tokens", f"is {budget - 1}")
    assert over[0][0] == over[2][0] == 200
    for answer in (over[0][1], over[2][1]):  # padded with other neighbours: equal up to float
        assert [entry["label"] for entry in answer] == [e["label"] for e in at_limit[1][1]]
        assert [e["score"] for e in answer] == pytest.approx(
            [e["score"] for e in at_limit[1][1]], abs=1e-5
        )


def test_an_archive_padded_to_max_length_counts_max_length_per_text(classifier):
    max_length = classifier.config.max_length
    with limits(classifier, pad_to_max_length=True, max_tokens_per_request=2 * max_length):
        results = run_batch(
            classifier, [ask({"inputs": ["tea", "tea"]}), ask({"inputs": ["tea"] * 3}), GOOD]
        )
    assert results[0][0] == 200
    assert_refused(results[1], "max_tokens_per_request", f"{3 * max_length} tokens")
    assert results[2][0] == 200


def test_characters_read_are_bounded_by_the_token_budget(classifier):
    """Before tokenizing: each text counts up to max_length x CHARS_PER_TOKEN characters, and
    the request up to max_tokens_per_request x CHARS_PER_TOKEN. Text that needs more than that
    per token (here: whitespace padding, 3 tokens in 1024 characters) is refused unread."""
    cut = classifier.config.max_length * CHARS_PER_TOKEN
    budget = classifier.config.max_tokens_per_request * CHARS_PER_TOKEN
    padded = "tea" + " " * (cut - 3)
    assert tokens(classifier, padded) == 3
    at_limit = [padded] * (budget // cut)
    at_limit[-1] += " " * 10_000  # counted up to the cut, never read past it
    assert sum(min(len(text), cut) for text in at_limit) == budget
    results = run_batch(
        classifier,
        [ask({"inputs": at_limit}), ask({"inputs": [*at_limit, "x"]}), GOOD],
    )
    assert results[0][0] == 200
    assert_refused(results[1], "max_tokens_per_request", f"{budget + 1} characters")
    assert results[2][0] == 200


# ---- cutting text before tokenizing ----------------------------------------------------


def ordinary_texts() -> list[str]:
    """Long ordinary text: the tiny corpus and this repository's English documentation."""
    docs = [path.read_text(encoding="utf-8") for path in sorted((REPO / "docs").glob("*.md"))]
    docs.append((REPO / "README.md").read_text(encoding="utf-8"))
    corpus = " ".join(TINY_TEXT_CORPUS)
    return [
        corpus * 40,
        "\n".join(TINY_TEXT_CORPUS) * 40,
        "Café naïve résumé, 東京 and emoji 🙂 mixed in. " * 200,
        *docs,
        *[doc[offset:] for doc in docs for offset in (1, 7, 333)],  # cut mid-word and mid-line
    ]


@pytest.mark.parametrize(
    "make_tokenizer", [make_tiny_tokenizer, make_bpe_tokenizer, make_unigram_tokenizer]
)
@pytest.mark.parametrize("max_length", [8, 32, 64])
def test_cutting_ordinary_text_keeps_the_tokens_truncation_keeps(make_tokenizer, max_length):
    tokenizer = make_tokenizer()
    cut = max_length * CHARS_PER_TOKEN
    checked = 0
    for text in ordinary_texts():
        assert len(text) > cut
        whole = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        assert tokenizer(text[:cut], truncation=True, max_length=max_length)["input_ids"] == whole
        checked += 1
    assert checked > 10


class RecordingTokenizer:
    """The handler's tokenizer, recording the length of every text it is given."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def test_the_handler_tokenizes_at_most_the_cut(classifier, monkeypatch):
    cut = classifier.config.max_length * CHARS_PER_TOKEN
    text = " ".join(TINY_TEXT_CORPUS) * 500  # about 24,000 characters
    recorder = RecordingTokenizer(classifier.tokenizer)
    monkeypatch.setattr(classifier, "tokenizer", recorder)
    item = classifier.tokenize(text, 0)
    assert recorder.lengths == [cut]
    expected = recorder.tokenizer(text, truncation=True, max_length=classifier.config.max_length)
    assert item.input_ids == expected["input_ids"]


def test_truncate_false_refuses_a_text_longer_than_the_cut_unread(classifier, monkeypatch):
    cut = classifier.config.max_length * CHARS_PER_TOKEN
    recorder = RecordingTokenizer(classifier.tokenizer)
    monkeypatch.setattr(classifier, "tokenizer", recorder)
    results = run_batch(classifier, [ask({"inputs": ["x " * cut], "truncate": False}), GOOD])
    assert_refused(results[0], "truncate: true", f"{2 * cut} characters", f"at most {cut}")
    assert results[1][0] == 200
    assert 2 * cut not in recorder.lengths


# ---- answer size -----------------------------------------------------------------------


def test_classification_answer_size(classifier):
    options = classifier.read_options(Request(body=None))
    per_text = classifier.answer_bytes_per_text(options)
    limit = answer_bytes(4, per_text)
    with limits(classifier, max_response_size=limit):
        results = run_batch(
            classifier,
            [
                ask({"inputs": ["tea"] * 4}),
                ask({"inputs": ["tea"] * 5}),
                ask({"inputs": ["tea"] * 5, "top_k": 1}),  # smaller answers: they fit
                GOOD,
            ],
        )
    assert results[0][0] == 200
    assert len(json.dumps(results[0][1])) <= limit
    assert_refused(results[1], "max_response_size", "at most 4 texts")
    assert results[2][0] == results[3][0] == 200


def test_embedding_answer_size(encoder):
    dimension = encoder.config.embedding_dimension
    per_text = answer_bytes(dimension, MAX_FLOAT_CHARS)
    assert encoder.answer_bytes_per_text(encoder.read_options(Request(body=None))) == per_text
    limit = answer_bytes(3, per_text)
    good = ask({"inputs": "tea"})
    with limits(encoder, max_response_size=limit):
        results = run_batch(
            encoder,
            [ask({"inputs": ["tea"] * 3}), ask({"inputs": ["tea"] * 4}), good],
        )
    assert results[0][0] == 200 and len(results[0][1]) == 3
    assert len(json.dumps(results[0][1])) <= limit
    assert_refused(results[1], "max_response_size", "at most 3 texts", "4 texts")
    assert results[2][0] == 200 and len(results[2][1]) == 1


def test_answer_bounds_hold_for_the_longest_numbers_json_writes():
    """The bound covers every float32 a model can answer, as Python's json writes it."""
    extremes = torch.tensor(
        [-1.4e-45, -1.1754942e-38, -3.4028235e38, -0.1234567, -1.0e-7, float("nan")]
    ).tolist()
    extremes.append(-2.2250738585072014e-308)  # the longest double repr there is
    assert max(len(json.dumps(value)) for value in extremes) == MAX_FLOAT_CHARS
    dimension = 7
    vectors = [[extremes[(row + i) % len(extremes)] for i in range(dimension)] for row in range(5)]
    assert len(json.dumps(vectors)) <= answer_bytes(5, answer_bytes(dimension, MAX_FLOAT_CHARS))


def test_classification_entry_bound_covers_every_label(classifier):
    entries = [{"label": label, "score": -2.2250738585072014e-308} for label in classifier.labels]
    assert max(len(json.dumps(entry)) for entry in entries) <= classifier.entry_bytes


# ---- decoded image bytes ---------------------------------------------------------------


def png(width: int, height: int, bit_depth: int, color_type: int, channels: int) -> bytes:
    """A PNG of zeros written by hand (Pillow writes no 16-bit colour PNG)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))
        )

    row = b"\x00" * (1 + width * channels * bit_depth // 8)
    header = struct.pack("!IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", header),
            chunk(b"IDAT", zlib.compress(row * height)),
            chunk(b"IEND", b""),
        )
    )


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (png(40, 30, 8, 0, 1), 40 * 30),  # 8-bit grey
        (png(40, 30, 8, 2, 3), 40 * 30 * 3),  # 8-bit RGB
        (png(40, 30, 8, 6, 4), 40 * 30 * 4),  # 8-bit RGBA
        (png(40, 30, 16, 0, 1), 40 * 30 * 2),  # 16-bit grey
        (png(40, 30, 16, 6, 4), 40 * 30 * 8),  # 16-bit RGBA: what a 130 KB 4096^2 bomb uses
    ],
)
def test_decoded_bytes_come_from_the_header(image: bytes, expected: int):
    assert decoded_bytes(Image.open(io.BytesIO(image))) == expected


def test_image_bytes(vision_handler):
    limit = 64 * 64 * 3
    image = ({"body": png(64, 64, 8, 2, 3)}, body_headers("image/png"))
    wider = ({"body": png(65, 64, 8, 2, 3)}, body_headers("image/png"))
    deep = ({"body": png(64, 64, 16, 6, 4)}, body_headers("image/png"))  # same pixels, 8 B each
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 200).save(buffer, "PNG")
    good = ({"body": buffer.getvalue()}, body_headers("image/png"))
    with limits(vision_handler, max_image_bytes=limit):
        results = run_batch(vision_handler, [image, wider, deep, good])
    assert results[0][0] == 200
    assert_refused(results[1], "max_image_bytes", f"{65 * 64 * 3} bytes", f"at most {limit}")
    assert_refused(results[2], "max_image_bytes", f"{64 * 64 * 8} bytes")
    assert results[3][0] == 200


def test_a_batch_runs_at_most_max_tokens_per_batch_the_rest_get_429(classifier):
    texts = ["the movie was great and the acting was superb"] * 4
    cost = sum(len(classifier.tokenizer(text)["input_ids"]) for text in texts)
    request = ask({"inputs": texts})
    with limits(classifier, max_tokens_per_request=cost, max_tokens_per_batch=2 * cost):
        results = run_batch(classifier, [request, request, request, GOOD])
    assert [status for status, _, _ in results] == [200, 200, 429, 429]
    status, body, headers = results[2]
    assert body["type"] == "TooManyRequests" and "max_tokens_per_batch" in body["message"]
    assert headers["Retry-After"] == "1"
    # Alone, a request at the batch budget always runs; and a config whose batch budget is
    # below its request limit is refused.
    with limits(classifier, max_tokens_per_request=cost, max_tokens_per_batch=cost):
        assert [status for status, _, _ in run_batch(classifier, [request])] == [200]
    with pytest.raises(ConfigError, match="max_tokens_per_batch .* is below max_tokens_per_req"):
        classifier.config.replace(max_tokens_per_request=cost, max_tokens_per_batch=cost - 1)
