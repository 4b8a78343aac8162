"""SequenceClassificationHandler on a tiny random BERT, exported both ways, no server.

The checkpoint (tokenizer included) is built from a config in ``conftest.py`` and taken through
the real build for ``torchscript`` and ``pretrained``; every answer is checked against the eager
model's own softmax on the same text.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import (
    TINY_TEXT_LABELS,
    TINY_TEXT_MAX_LENGTH,
    body_headers,
    load_text_handler,
    make_context,
    run_batch,
    unpack_archive,
    write_text_config,
)
from torch import nn

from ts_handlers import sequence_classification
from ts_handlers.exporters import sequence_classification as sequence_classification_export
from ts_handlers.sequence_classification import SequenceClassificationHandler, load_classifier
from ts_handlers.text import MAX_TEXTS_PER_REQUEST
from ts_handlers.tools import build

LABELS = list(TINY_TEXT_LABELS.values())
TOLERANCE = 1e-5
FORM = "application/x-www-form-urlencoded"  # what curl -d sends
SENTENCES = [
    "the movie was great",
    "i hated every minute of this awful boring film, and the popcorn was stale too",
    "tea",
    "service was slow but the food was really tasty; we will come back next week",
    "What a WONDERFUL surprise!!!",
    "the battery died after two days",
    "rain",
    "a quiet afternoon with books",
]


# ---- helpers ----------------------------------------------------------------------------------


def plain(text: str | bytes, **headers: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A text/plain request as TorchServe hands it over (decoded to str when it is UTF-8)."""
    return {"body": text}, body_headers("text/plain", **headers)


def parsed_json(payload: Any, **headers: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """An application/json request: TorchServe has already run json.loads on the body."""
    return {"body": payload}, body_headers("application/json", **headers)


def raw(data: bytes, content_type: str = "", **headers: str) -> tuple[dict, dict]:
    """A body TorchServe forwards as bytes (no text or JSON content type, or one it failed)."""
    return {"body": bytearray(data)}, body_headers(content_type, **headers)


def scores(answer: list[dict[str, Any]]) -> list[float]:
    """Scores of a full answer in class-index order."""
    by_label = {item["label"]: item["score"] for item in answer}
    return [by_label[label] for label in LABELS]


def assert_answer(answer: Any, expected: list[float], top_k: int = len(LABELS)) -> None:
    assert isinstance(answer, list) and len(answer) == top_k
    assert all(set(item) == {"label", "score"} for item in answer)
    got = [item["score"] for item in answer]
    assert got == sorted(got, reverse=True)
    ranked = sorted(range(len(LABELS)), key=lambda i: -expected[i])[:top_k]
    assert [item["label"] for item in answer] == [LABELS[i] for i in ranked]
    assert got == pytest.approx([expected[i] for i in ranked], abs=TOLERANCE)


@pytest.fixture(scope="module")
def eager(tiny_text_checkpoint: Path):
    """The oracle: the checkpoint's own softmax, one text at a time, no padding."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_text_checkpoint), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_text_checkpoint), local_files_only=True
    ).eval()

    def probabilities(text: str) -> list[float]:
        encoded = tokenizer(
            text, truncation=True, max_length=TINY_TEXT_MAX_LENGTH, return_tensors="pt"
        )
        with torch.inference_mode():
            return torch.softmax(model(**encoded).logits, dim=-1)[0].tolist()

    probabilities.tokenizer = tokenizer  # type: ignore[attr-defined]
    return probabilities


@pytest.fixture(params=["torchscript", "pretrained"])
def handler(request, text_handlers):
    return text_handlers[request.param]


def test_the_tiny_model_gives_distinct_answers(eager):
    """Guards the other tests: a shuffled or mixed-up answer must be detectable."""
    answers = [tuple(round(p, 3) for p in eager(text)) for text in SENTENCES]
    assert len(set(answers)) == len(SENTENCES)
    assert max(max(answer) for answer in answers) > 0.5


# ---- request forms ----------------------------------------------------------------------------


def test_every_request_form_gives_the_eager_answer(handler, eager):
    text = SENTENCES[0]
    single = [
        plain(text),
        plain(text, **{"Content-Type": "text/plain; charset=utf-8"}),
        raw(text.encode()),  # no content type: sniffed as text
        parsed_json({"inputs": text}),
        raw(json.dumps({"inputs": text}).encode()),  # JSON without a content type
        parsed_json(text),  # a bare JSON string, already decoded by TorchServe
        ({"data": bytearray(text.encode())}, {"data": {"content-type": "text/plain"}}),
    ]
    as_list = [
        parsed_json({"inputs": [text]}),
        parsed_json([text]),  # a bare JSON list
        raw(json.dumps([text]).encode(), "application/json"),
    ]
    results = run_batch(handler, single + as_list)
    assert [status for status, _, _ in results] == [200] * len(results), results
    expected = eager(text)
    for _, body, _ in results[: len(single)]:
        assert_answer(body, expected)
    for _, body, _ in results[len(single) :]:
        assert isinstance(body, list) and len(body) == 1
        assert_answer(body[0], expected)
    assert results[0][2]["X-Batch-Size"] == str(len(results))


def test_text_plain_that_starts_like_json_is_still_text(handler, eager):
    texts = ["[spoiler] the movie was great", "{sarcasm} what a wonderful surprise"]
    results = run_batch(handler, [plain(text) for text in texts])
    for (status, body, _), text in zip(results, texts, strict=True):
        assert status == 200, body
        assert_answer(body, eager(text))


def test_probabilities_match_the_eager_softmax(handler, eager):
    results = run_batch(
        handler, [parsed_json({"inputs": SENTENCES})] + [plain(text) for text in SENTENCES]
    )
    status, listed, _ = results[0]
    assert status == 200
    assert len(listed) == len(SENTENCES)
    for text, answer, (status, single, _) in zip(SENTENCES, listed, results[1:], strict=True):
        assert status == 200
        assert_answer(answer, eager(text))
        assert_answer(single, eager(text))
    assert sum(sum(scores(answer)) for answer in listed) == pytest.approx(len(SENTENCES))


def test_outputs_keep_input_order_when_lengths_differ(handler, eager, monkeypatch):
    widths: list[tuple[int, int]] = []
    run_model = handler.run_model

    def recording(input_ids, attention_mask):
        widths.append((input_ids.shape[1], int(attention_mask.sum(dim=1).max())))
        return run_model(input_ids, attention_mask)

    monkeypatch.setattr(handler, "run_model", recording)
    by_length = sorted(SENTENCES, key=len)
    shuffled = [by_length[i] for i in (7, 0, 5, 2, 6, 1, 4, 3)]  # long, short, long, ...
    requests = [
        parsed_json({"inputs": shuffled[:5]}),
        plain(shuffled[5]),
        parsed_json({"inputs": shuffled[6:][::-1]}),
    ]
    results = run_batch(handler, requests)
    assert [status for status, _, _ in results] == [200, 200, 200]
    for text, answer in zip(shuffled[:5], results[0][1], strict=True):
        assert_answer(answer, eager(text))
    assert_answer(results[1][1], eager(shuffled[5]))
    for text, answer in zip(shuffled[6:][::-1], results[2][1], strict=True):
        assert_answer(answer, eager(text))
    # Sorted by length, cut into inference_batch_size groups, each padded to its own longest row.
    groups = math.ceil(len(SENTENCES) / handler.config.inference_batch_size)
    assert len(widths) == groups
    assert all(width == longest for width, longest in widths)
    assert [width for width, _ in widths] == sorted(width for width, _ in widths)


def test_top_k_from_json_form_field_or_header(handler, eager):
    text = SENTENCES[1]
    results = run_batch(
        handler,
        [
            parsed_json({"inputs": text, "top_k": 1}),
            plain(text, **{"X-Top-K": "2"}),
            ({"data": text, "top_k": bytearray(b"1")}, {"data": {"content-type": "text/plain"}}),
            parsed_json({"inputs": [text, SENTENCES[2]], "top_k": 2}),
            parsed_json({"inputs": text, "top_k": 99}),
            plain(text),
        ],
    )
    assert [status for status, _, _ in results] == [200] * 6
    assert_answer(results[0][1], eager(text), top_k=1)
    assert_answer(results[1][1], eager(text), top_k=2)
    assert_answer(results[2][1], eager(text), top_k=1)
    assert_answer(results[3][1][0], eager(text), top_k=2)
    assert_answer(results[3][1][1], eager(SENTENCES[2]), top_k=2)
    assert_answer(results[4][1], eager(text), top_k=3)
    assert_answer(results[5][1], eager(text), top_k=3)


# ---- long and odd input -----------------------------------------------------------------------


def test_long_input_is_truncated_at_max_length(handler, eager):
    long_text = " ".join(["the movie was great but the popcorn was stale"] * 60)  # 540 words
    item = handler.tokenize(long_text, 0)
    assert len(item.input_ids) == TINY_TEXT_MAX_LENGTH
    assert item.input_ids[-1] == eager.tokenizer.sep_token_id
    [(status, body, _)] = run_batch(handler, [plain(long_text)])
    assert status == 200, body
    assert_answer(body, eager(long_text))
    huge = "tea " * 50_000  # 200 kB, one request
    [(status, body, _)] = run_batch(handler, [plain(huge)])
    assert status == 200, body
    assert_answer(body, eager(huge))


def test_truncate_false_refuses_a_long_input_with_413(handler, eager):
    long_text = "great " * 100
    results = run_batch(
        handler,
        [
            parsed_json({"inputs": long_text, "truncate": False}),
            parsed_json({"inputs": "great", "truncate": False}),
            parsed_json({"inputs": long_text, "truncate": True}),
        ],
    )
    status, body, _ = results[0]
    assert status == 413
    assert body["type"] == "PayloadTooLarge"
    assert f"at most {TINY_TEXT_MAX_LENGTH}" in body["message"]
    assert results[1][0] == 200
    assert_answer(results[1][1], eager("great"))
    assert results[2][0] == 200
    assert_answer(results[2][1], eager(long_text))


UNICODE = {
    "emoji": "the movie was great 😊🎉👍🏽",
    "emoji zwj sequence": "family time 👨‍👩‍👧‍👦 was wonderful",
    "cjk": "这部电影很好看 映画は素晴らしかった 영화가 좋았어요",
    "rtl arabic": "كان الفيلم رائعا جدا",
    "rtl hebrew with bidi marks": "\u202bהסרט היה נהדר\u202c the movie",
    "zero width": "the\u200bmovie\u200c was\u200d great\ufeff",
    "combining": "cafe\u0301 na\u0308ive Z\u0351\u0342a\u0309\u0307l\u036ag\u0310o\u0344",
    "only zero width": "\u200b\u200b",
    "control and nul": "tea\x00 and\x07 books\x1b[31m",
    "mixed scripts": "Ω≈ç√ the ñ movie Ελληνικά русский",
    "astral plane": "𝕿𝖍𝖊 𝖒𝖔𝖛𝖎𝖊 \U0001f9ec \U000e0041",
}


@pytest.mark.parametrize("case", list(UNICODE))
def test_odd_unicode_is_classified(handler, eager, case):
    text = UNICODE[case]
    results = run_batch(
        handler, [plain(text), raw(text.encode("utf-8")), parsed_json({"inputs": [text, "tea"]})]
    )
    assert [status for status, _, _ in results] == [200, 200, 200], results
    assert_answer(results[0][1], eager(text))
    assert_answer(results[1][1], eager(text))
    assert_answer(results[2][1][0], eager(text))
    assert_answer(results[2][1][1], eager("tea"))


# ---- bad input --------------------------------------------------------------------------------

BAD_INPUTS = {
    "empty body": (raw(b""), 400, "empty"),
    "empty text/plain": (plain(""), 400, "empty"),
    "whitespace only": (plain("  \n\t \u3000 "), 400, "whitespace"),
    "whitespace only in JSON": (parsed_json({"inputs": " "}), 400, "inputs[0] is empty"),
    "whitespace in a list": (parsed_json({"inputs": ["ok", "\t"]}), 400, "inputs[1] is empty"),
    "inputs is a number": (parsed_json({"inputs": 5}), 400, "must be a string or a list"),
    "inputs is an object": (parsed_json({"inputs": {"t": "x"}}), 400, "got dict"),
    "inputs is null": (parsed_json({"inputs": None}), 400, "got NoneType"),
    "bare number": (parsed_json(42), 400, "got int"),
    "list with a number": (parsed_json({"inputs": ["fine", 3]}), 400, "inputs[1] must be a string"),
    "nested list": (parsed_json([["a"]]), 400, "inputs[0] must be a string"),
    "empty list": (parsed_json({"inputs": []}), 400, "empty list"),
    "bare empty list": (parsed_json([]), 400, "empty list"),
    "no inputs field": (parsed_json({}), 400, '"inputs"'),
    "unknown field": (parsed_json({"inputs": "x", "topk": 2}), 400, "unknown field(s) topk"),
    "misspelt inputs": (parsed_json({"input": "x"}), 400, "unknown field(s) input"),
    "curl -d form body": (({}, {"Content-Type": FORM}), 400, "sent as form fields"),
    "form fields, no data": (({"top_k": bytearray(b"1")}, {}), 400, "sent as form fields"),
    "non-UTF-8 text": (raw(b"caf\xe9 \xff\xfe", "text/plain"), 400, "not valid UTF-8"),
    "non-UTF-8 bytes": (raw(b"\xff\xfe\x00bad"), 400, "not valid UTF-8"),
    "non-UTF-8 JSON": (raw(b'{"inputs": "caf\xe9"}', "application/json"), 400, "UTF-8"),
    "broken JSON": (raw(b'{"inputs": "unterminated', "application/json"), 400, "not valid JSON"),
    "lone surrogate": (
        parsed_json({"inputs": ["ok", "bad \ud800"]}),
        400,
        "inputs[1] has an unpaired",
    ),
    "top_k zero": (parsed_json({"inputs": "x", "top_k": 0}), 400, "top_k must be at least 1"),
    "top_k negative": (parsed_json({"inputs": "x", "top_k": -2}), 400, "top_k"),
    "top_k text": (parsed_json({"inputs": "x", "top_k": "many"}), 400, "top_k must be an int"),
    "top_k float": (parsed_json({"inputs": "x", "top_k": 1.5}), 400, "top_k must be an int"),
    "top_k bool": (parsed_json({"inputs": "x", "top_k": True}), 400, "top_k must be an int"),
    "top_k header": (plain("x", **{"X-Top-K": "lots"}), 400, "top_k"),
    "truncate not bool": (parsed_json({"inputs": "x", "truncate": "maybe"}), 400, "truncate"),
    "too many texts": (
        parsed_json({"inputs": ["x"] * (MAX_TEXTS_PER_REQUEST + 1)}),
        413,
        f"limit is {MAX_TEXTS_PER_REQUEST}",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_json_body(handler, case):
    request, status, fragment = BAD_INPUTS[case]
    [(code, body, _)] = run_batch(handler, [request])
    assert code == status, body
    assert set(body) == {"code", "type", "message"}
    assert body["code"] == status
    assert body["type"] in {"InvalidInput", "PayloadTooLarge"}
    assert fragment in body["message"]


def test_bad_requests_do_not_fail_their_neighbours(handler, eager):
    results = run_batch(
        handler,
        [
            plain(SENTENCES[0]),
            raw(b"\xff\xfe"),
            parsed_json({"inputs": [SENTENCES[1], SENTENCES[2]]}),
            parsed_json({"inputs": ["fine", 7]}),
            plain("   "),
            parsed_json({"inputs": SENTENCES[3], "top_k": 0}),
            plain(SENTENCES[4]),
        ],
    )
    assert [status for status, _, _ in results] == [200, 400, 200, 400, 400, 400, 200]
    assert_answer(results[0][1], eager(SENTENCES[0]))
    assert_answer(results[2][1][0], eager(SENTENCES[1]))
    assert_answer(results[2][1][1], eager(SENTENCES[2]))
    assert_answer(results[6][1], eager(SENTENCES[4]))
    assert {headers["X-Batch-Size"] for _, _, headers in results} == {"4"}


def test_a_forward_failure_is_isolated_to_its_request(handler, eager, monkeypatch):
    forward = handler.forward

    def fails_on_nul(inputs):
        if any("\x00" in item.text for item in inputs):
            raise RuntimeError("simulated kernel failure")
        return forward(inputs)

    monkeypatch.setattr(handler, "forward", fails_on_nul)
    results = run_batch(handler, [plain(SENTENCES[0]), plain("nul\x00here"), plain(SENTENCES[1])])
    assert [status for status, _, _ in results] == [200, 500, 200]
    assert results[1][1]["type"] == "InternalServerError"
    assert_answer(results[2][1], eager(SENTENCES[1]))


# ---- explanations -----------------------------------------------------------------------------


def test_pretrained_archive_explains_with_token_attributions(text_handlers, eager):
    handler = text_handlers["pretrained"]
    text = SENTENCES[1]
    results = run_batch(
        handler,
        [
            plain(text, explain="True"),
            parsed_json({"inputs": [SENTENCES[0], "tea 😊"]}, explain="True"),
            plain(text),  # a prediction in the same batch
            plain(" ", explain="True"),
        ],
    )
    assert [status for status, _, _ in results] == [200, 200, 200, 400]
    explanation = results[0][1]
    assert set(explanation) == {"label", "score", "tokens", "attributions", "delta"}
    tokens = explanation["tokens"]
    ids = eager.tokenizer(text, truncation=True, max_length=TINY_TEXT_MAX_LENGTH)["input_ids"]
    assert tokens == eager.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert len(explanation["attributions"]) == len(tokens)
    assert all(math.isfinite(value) for value in explanation["attributions"])
    assert math.fsum(v * v for v in explanation["attributions"]) == pytest.approx(1.0)
    assert math.isfinite(explanation["delta"])
    best = results[2][1][0]
    assert (explanation["label"], explanation["score"]) == (
        best["label"],
        pytest.approx(best["score"], abs=TOLERANCE),
    )
    listed = results[1][1]
    assert isinstance(listed, list) and len(listed) == 2
    for item in listed:
        assert len(item["tokens"]) == len(item["attributions"]) >= 3
    assert results[0][2]["X-Batch-Size"] == "1"  # explanations run apart from the forward batch


def test_explanations_keep_token_length_when_the_archive_pads(text_handlers, eager, monkeypatch):
    handler = text_handlers["pretrained"]
    monkeypatch.setattr(handler, "config", handler.config.replace(pad_to_max_length=True))
    [(status, body, _)] = run_batch(handler, [plain("the movie", explain="True")])
    assert status == 200, body
    tokens = eager.tokenizer.convert_ids_to_tokens(eager.tokenizer("the movie")["input_ids"])
    assert body["tokens"] == tokens
    assert len(body["attributions"]) == len(tokens) < handler.config.max_length


def test_torchscript_archive_refuses_explanations_with_400(text_handlers):
    results = run_batch(
        text_handlers["torchscript"],
        [plain(SENTENCES[0], explain="True"), plain(SENTENCES[0])],
    )
    (status, body, _), (neighbour, _, _) = results
    assert status == 400
    assert body["type"] == "InvalidInput"
    assert "save_mode 'pretrained'" in body["message"]
    assert "save_mode 'torchscript'" in body["message"]
    assert neighbour == 200


def test_explanations_need_captum_explanation_true(text_handlers, monkeypatch):
    handler = text_handlers["pretrained"]
    config = handler.config.replace(captum_explanation=False)
    monkeypatch.setattr(handler, "config", config)
    [(status, body, _)] = run_batch(handler, [plain("tea", explain="True")])
    assert status == 400
    assert "captum_explanation false" in body["message"]


# ---- explanation limits and scheduling (docs/sequence_classification.md, "Explanation cost") -----


class Clock:
    """A monotonic clock the test moves; every explanation takes EXPLANATION_SECONDS on it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


EXPLANATION_SECONDS = 10.0


@pytest.fixture
def explainer(text_handlers, monkeypatch):
    """The pretrained handler at 4 steps, with a budget of one max_length text per batch."""
    handler = text_handlers["pretrained"]
    config = handler.config.replace(
        explanation_steps=4,
        max_explanation_token_steps=4 * handler.config.max_length,
        max_explanation_texts=3,
    )
    monkeypatch.setattr(handler, "config", config)
    clock = Clock()
    monkeypatch.setattr(handler.explanations, "clock", clock)
    monkeypatch.setattr(handler.explanations, "predictions_first_until", 0.0)  # no earlier schedule
    explain_inputs = handler.explain_inputs

    def slow_explain(inputs, decoded):
        clock.now += EXPLANATION_SECONDS
        return explain_inputs(inputs, decoded)

    monkeypatch.setattr(handler, "explain_inputs", slow_explain)
    handler.clock = clock
    yield handler
    del handler.clock


def test_explanation_requests_over_a_limit_get_413_before_any_work(explainer, monkeypatch):
    def no_work(*args):
        raise AssertionError("an explanation over a limit must not run")

    monkeypatch.setattr(sequence_classification, "integrated_gradients", no_work)
    long_text = " ".join(SENTENCES)  # truncated to max_length tokens
    results = run_batch(
        explainer,
        [
            parsed_json({"inputs": ["tea"] * 4}, explain="True"),
            parsed_json({"inputs": [long_text, "tea"]}, explain="True"),
            plain(SENTENCES[0]),
        ],
    )
    assert [status for status, _, _ in results] == [413, 413, 200]
    for _, body, _ in results[:2]:
        assert set(body) == {"code", "type", "message"} and body["type"] == "PayloadTooLarge"
    assert "max_explanation_texts" in results[0][1]["message"]
    assert "4 texts" in results[0][1]["message"]
    assert "max_explanation_token_steps" in results[1][1]["message"]


def test_explanations_past_the_batch_budget_get_429_with_retry_after(explainer):
    text = SENTENCES[1]  # a text counts at least MIN_EXPLANATION_TOKENS: two do not fit
    assert explainer.config.max_length == sequence_classification.MIN_EXPLANATION_TOKENS
    results = run_batch(explainer, [plain(text, explain="True"), plain(text, explain="True")])
    assert [status for status, _, _ in results] == [200, 429]
    _, body, headers = results[1]
    assert body["code"] == 429 and body["type"] == "TooManyRequests"
    assert "max_explanation_token_steps" in body["message"]
    assert int(headers["Retry-After"]) >= 1
    assert "Retry-After" not in results[0][2]


def test_predictions_get_as_much_time_as_the_explanation_work_before_them(explainer, eager):
    explain_one = plain("the movie was great", explain="True")
    first = run_batch(explainer, [explain_one, plain(SENTENCES[2])])
    assert [status for status, _, _ in first] == [200, 200]  # took 10 s on the clock
    explainer.clock.now += 4
    second = run_batch(explainer, [explain_one, plain(SENTENCES[2]), explain_one])
    assert [status for status, _, _ in second] == [429, 200, 429]
    assert "predictions go first" in second[0][1]["message"]
    assert second[0][2]["Retry-After"] == "6"  # the rest of the 10 s
    assert_answer(second[1][1], eager(SENTENCES[2]))
    alone = run_batch(explainer, [explain_one])  # no prediction waits: nothing to yield to
    assert [status for status, _, _ in alone] == [200]
    explainer.clock.now += EXPLANATION_SECONDS  # the predictions' turn is over
    third = run_batch(explainer, [explain_one, plain(SENTENCES[2])])
    assert [status for status, _, _ in third] == [200, 200]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_explanation_texts": 0}, "max_explanation_texts must be at least 1"),
        ({"max_explanation_token_steps": 0}, "max_explanation_token_steps must be at least 1"),
        ({"explanation_steps": 201}, "is 6432 token-steps, over max_explanation_token_steps"),
    ],
)
def test_explanation_limits_are_checked_at_load(text_handlers, changes, message):
    config = text_handlers["pretrained"].config
    assert config.max_length == 32
    with pytest.raises(sequence_classification.ConfigError, match=message):
        config.replace(**changes)


# ---- what the build put in the archive --------------------------------------------------------


def archived(mar_path: Path, name: str) -> dict[str, Any]:
    with zipfile.ZipFile(mar_path) as archive:
        return json.loads(archive.read(name))


def test_torchscript_archive_holds_at_every_shape(tiny_text_archives, text_handlers):
    mar = tiny_text_archives["torchscript"]
    setup = archived(mar, "setup_config.json")
    assert setup["pad_to_max_length"] is False
    report = archived(mar, "export_report.json")["verification"]
    assert report["dynamic_shapes"]["passed"] is True
    assert report["dynamic_shapes"]["max_abs_diff"] <= 1e-4
    shapes = {tuple(case["shape"]) for case in report["dynamic_shapes"]["cases"]}
    assert {(1, 7), (3, 7), (8, TINY_TEXT_MAX_LENGTH)} <= shapes
    handler = text_handlers["torchscript"]
    assert handler.export_metadata["verification"] == report
    assert handler.export_metadata["labels"] == LABELS
    assert handler.labels == LABELS


def test_pretrained_archive_carries_the_checkpoint_and_tokenizer(tiny_text_archives):
    with zipfile.ZipFile(tiny_text_archives["pretrained"]) as archive:
        names = set(archive.namelist())
    assert {"config.json", "model.safetensors", "tokenizer.json", "setup_config.json"} <= names
    assert not any(name.endswith(".pt") for name in names)
    setup = archived(tiny_text_archives["pretrained"], "setup_config.json")
    assert setup["save_mode"] == "pretrained" and setup["captum_explanation"] is True


class LengthScaled(nn.Module):
    """Scales the logits by the sequence length read through ``torch.tensor``.

    A trace records that tensor as a constant, so the exported graph is right only at the
    length it was traced at: the export must fall back to padding every input to max_length.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, attention_mask=None, return_dict=False):
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)
        length = torch.tensor(float(input_ids.shape[1]))
        return (logits[0] * length / 8.0,)


class RowLoop(nn.Module):
    """Classifies rows one by one in a Python loop; a trace unrolls it for the example batch."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, attention_mask=None, return_dict=False):
        rows = [
            self.inner(input_ids=ids[None], attention_mask=mask[None], return_dict=False)[0]
            for ids, mask in zip(input_ids, attention_mask, strict=True)
        ]
        return (torch.cat(rows),)


def plant(monkeypatch, wrapper: type[nn.Module]) -> None:
    """The export loads the real tiny checkpoint, wrapped in a model that traces badly."""
    monkeypatch.setattr(
        sequence_classification_export,
        "load_classifier",
        lambda folder, *rest: wrapper(load_classifier(folder, *rest)),
    )


def test_a_trace_that_bakes_in_the_length_is_served_padded_to_max_length(
    tiny_text_checkpoint, tmp_path, monkeypatch, eager
):
    max_length = 16
    plant(monkeypatch, LengthScaled)
    config_dir = write_text_config(tmp_path / "baked", tiny_text_checkpoint, max_length=max_length)
    mar = build.build_archive(config_dir, tmp_path / "store", force=True)
    assert mar is not None
    setup = archived(mar, "setup_config.json")
    assert setup["pad_to_max_length"] is True
    verification = archived(mar, "export_report.json")["verification"]
    assert verification["dynamic_shapes"]["passed"] is False
    assert verification["fixed_shape"]["passed"] is True
    assert verification["fixed_shape"]["max_abs_diff"] <= 1e-4

    handler = load_text_handler(mar, tmp_path / "model")
    assert handler.config.pad_to_max_length is True
    widths = []
    run_model = handler.run_model

    def recording(input_ids, attention_mask):
        widths.append(input_ids.shape[1])
        return run_model(input_ids, attention_mask)

    monkeypatch.setattr(handler, "run_model", recording)
    texts = ["tea", SENTENCES[0], "great " * 40]
    [(status, body, _)] = run_batch(handler, [parsed_json({"inputs": texts})])
    assert status == 200, body
    assert widths == [max_length]
    # What the served graph computes is the eager model on inputs padded to max_length.
    model = LengthScaled(load_classifier(tiny_text_checkpoint))
    for text, answer in zip(texts, body, strict=True):
        encoded = eager.tokenizer(
            text, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt"
        )
        with torch.inference_mode():
            logits = model(encoded["input_ids"], encoded["attention_mask"])[0]
        assert_answer(answer, torch.softmax(logits, dim=-1)[0].tolist())


def test_an_export_that_fails_even_at_fixed_shape_writes_no_archive(
    tiny_text_checkpoint, tmp_path, monkeypatch, capsys
):
    plant(monkeypatch, RowLoop)
    config_dir = write_text_config(tmp_path / "row_loop", tiny_text_checkpoint, max_length=16)
    store = tmp_path / "store"
    code = build.main([str(config_dir), "--model-store", str(store), "--force"])
    captured = capsys.readouterr()
    assert code == 1
    assert not store.exists() or not list(store.iterdir())
    assert "build failed, no archive written" in captured.err
    assert "FAILED" in captured.out and "MISMATCH" in captured.err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_lenght": 64}, "unknown key.*max_lenght.*valid keys are.*max_length"),
        ({"top_k": 0}, "top_k must be at least 1"),
        ({"explanation_steps": 0}, "explanation_steps must be at least 1"),
        (
            {"save_mode": "tensorrt"},
            "save_mode='tensorrt'.*'torchscript', 'aot_inductor', 'onnx', 'pretrained'",
        ),
        ({"max_length": "128 tokens"}, "max_length must be an integer"),
    ],
)
def test_bad_setup_config_fails_at_load_naming_the_key(
    tiny_text_archives, tmp_path, change, message
):
    manifest = unpack_archive(tiny_text_archives["torchscript"], tmp_path)
    config_path = tmp_path / "setup_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(ValueError, match=message):
        SequenceClassificationHandler().initialize(make_context(tmp_path, manifest))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ({"max_length": 100}, "reads at most 64 tokens"),
        ({"num_labels": 2}, "num_labels is 2 but the checkpoint has 3 labels"),
    ],
)
def test_a_config_the_checkpoint_cannot_meet_fails_the_build(
    tiny_text_checkpoint, tmp_path, capsys, setup, message
):
    for save_mode in ("torchscript", "pretrained"):
        config_dir = write_text_config(
            tmp_path / save_mode, tiny_text_checkpoint, save_mode=save_mode, **setup
        )
        code = build.main([str(config_dir), "--model-store", str(tmp_path / "store")])
        assert code == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_tokenize_and_token_counts(handler, eager):
    """A tokenize request (text-embeddings-inference's /tokenize) answers the ids the model
    runs, and every prediction reports them in X-Compute-Tokens (after truncation)."""
    from ts_handlers.text import TOKENIZE_PATH, TOKENS_HEADER

    tokenizer = eager.tokenizer
    texts = [SENTENCES[0], " ".join(SENTENCES) * 3]  # the second is truncated
    expected = [
        tokenizer(text, truncation=True, max_length=TINY_TEXT_MAX_LENGTH)["input_ids"]
        for text in texts
    ]
    assert len(expected[1]) == TINY_TEXT_MAX_LENGTH
    [(status, tokens, _), (status_predict, _, headers)] = run_batch(
        handler,
        [
            (
                {"body": {"inputs": texts}},
                {**body_headers("application/json"), "url_path": TOKENIZE_PATH},
            ),
            ({"body": {"inputs": texts}}, body_headers("application/json")),
        ],
    )
    assert (status, status_predict) == (200, 200), tokens
    assert [[token["id"] for token in item] for item in tokens] == expected
    assert int(headers[TOKENS_HEADER]) == sum(map(len, expected))
    assert int(headers["X-Batch-Size"]) == 2  # the tokenize request ran no model


def test_truncation_side_left_reads_the_texts_end(handler, eager):
    """truncation_side "left" (per request, or the archive's default) keeps a long text's last
    max_length tokens, as the checkpoint's tokenizer with truncation_side "left" does."""
    long = " ".join(SENTENCES) * 3
    tokenizer = eager.tokenizer
    tokenizer.truncation_side = "left"
    try:
        expected = eager(long)
    finally:
        tokenizer.truncation_side = "right"
    assert max(abs(a - b) for a, b in zip(expected, eager(long), strict=True)) > 1e-3
    [(status, answer, _)] = run_batch(
        handler, [parsed_json({"inputs": long, "truncation_side": "left"})]
    )
    assert status == 200, answer
    assert_answer(answer, expected)
    original = handler.config
    handler.config = original.replace(truncation_side="left")
    try:
        [(status, answer, _)] = run_batch(handler, [plain(long)])
    finally:
        handler.config = original
    assert status == 200, answer
    assert_answer(answer, expected)
