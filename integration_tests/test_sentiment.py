"""sentiment.mar, sentiment_eager.mar, sentiment_aoti.mar and sentiment_onnx.mar on real
TorchServe, against transformers.pipeline.

The oracle is ``transformers.pipeline("text-classification", top_k=None)`` on the checkpoint
both archives were built from, run one text at a time with the archive's own truncation
(``max_length``). Every held-out sentence plus extra texts of 1 to ~300 words and odd Unicode
are sent concurrently, so TorchServe's dynamic batches mix lengths.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from serving import ROOT, require

MODELS = ("sentiment", "sentiment_eager", "sentiment_aoti", "sentiment_onnx")
CHECKPOINT = ROOT / "build/checkpoints/sentiment"
TOLERANCE = 1e-4
MIN_ACCURACY = 0.85
WORKERS = 8

EXTRA_TEXTS = [
    # one word
    "Excellent",
    "Terrible",
    "meh",
    "OK",
    "👍",
    # short, odd Unicode
    "Absolutely loved it 😍😍",
    "😡😡😡 never again",
    "最高の映画でした",
    "这家餐厅太难吃了",
    "Der Film war großartig!",
    "C'était nul, vraiment nul.",
    "كانت الخدمة رائعة",
    "\u202bזה היה נורא\u202c but the coffee was fine",
    "naïve café déjà vu — superb",
    "zero\u200bwidth\u200d joy\ufeff",
    "Z\u0351\u0342a\u0309\u0307l\u036ag\u0310o\u0344 text, cursed but harmless",
    "𝕿𝖍𝖊 𝖇𝖊𝖘𝖙 𝖉𝖆𝖞 🎉",
    "tabs\tand\nnew lines\r\n and   spaces",
    # medium
    "The hotel room was clean, the staff were friendly and breakfast was delicious.",
    "I waited forty minutes for a cold pizza and the driver was rude about it.",
    "It was fine I guess, nothing special, but not bad either.",
    "The update broke everything; my phone restarts every ten minutes now.",
    "My grandmother's recipe turned out perfectly and the whole family asked for seconds.",
]


def read_heldout() -> list[tuple[str, str]]:
    with open(require(CHECKPOINT / "heldout.tsv"), encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows[0] == ["label", "text"]
    return [(label, text) for label, text in rows[1:]]


def long_texts(heldout: list[tuple[str, str]]) -> list[str]:
    """Reviews of ~50 to ~300 words stitched from held-out sentences (past max_length too)."""
    sentences = [text for _, text in heldout]
    texts = []
    for start, count in ((0, 6), (10, 15), (30, 22), (55, 25), (5, 35)):
        texts.append(" ".join(sentences[start : start + count]))
    return texts


@pytest.fixture(scope="module")
def max_length() -> int:
    setup = json.loads((ROOT / "archiver_configs/sentiment/setup_config.json").read_text())
    return setup["max_length"]


@pytest.fixture(scope="module")
def heldout() -> list[tuple[str, str]]:
    rows = read_heldout()
    assert len(rows) == 80
    return rows


@pytest.fixture(scope="module")
def texts(heldout) -> list[str]:
    texts = [text for _, text in heldout] + EXTRA_TEXTS + long_texts(heldout)
    assert len(set(texts)) == len(texts) >= 100
    return texts


@pytest.fixture(scope="module")
def pipeline(max_length):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the oracle loads the local checkpoint only
    from transformers import pipeline

    classifier = pipeline("text-classification", model=str(require(CHECKPOINT)), top_k=None)

    def classify(text: str) -> list[dict[str, Any]]:
        [scores] = classifier([text], truncation=True, max_length=max_length)
        return scores

    classify.tokenizer = classifier.tokenizer  # type: ignore[attr-defined]
    return classify


@pytest.fixture(scope="module")
def oracle(pipeline, texts) -> dict[str, list[dict[str, Any]]]:
    return {text: pipeline(text) for text in texts}


def post_all(inference, requests_: list[tuple[str, dict[str, Any]]], workers: int = WORKERS):
    """Sends (url, requests kwargs) pairs concurrently (bounded pool); responses in order."""

    def send(item):
        target, kwargs = item
        return inference.post(target, timeout=120, **kwargs)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(send, requests_))


def post_retrying(inference, target: str, kwargs: dict[str, Any], attempts: int = 10):
    """Posts; a 429 is sent again after its Retry-After (explanations share a budget)."""
    for _ in range(attempts):
        response = inference.post(target, timeout=120, **kwargs)
        if response.status_code != 429:
            break
        time.sleep(int(response.headers["Retry-After"]))
    return response


def as_text(text: str) -> dict[str, Any]:
    return {"data": text.encode("utf-8"), "headers": {"Content-Type": "text/plain; charset=utf-8"}}


def url(torchserve, model: str, api: str = "predictions") -> str:
    return f"{torchserve.inference_url}/{api}/{model}"


def compare(answer: Any, expected: list[dict[str, Any]]) -> float:
    """Labels in the same order and scores within TOLERANCE; returns the largest difference."""
    assert [item["label"] for item in answer] == [item["label"] for item in expected]
    diff = max(abs(a["score"] - e["score"]) for a, e in zip(answer, expected, strict=True))
    assert diff <= TOLERANCE, (answer, expected)
    return diff


@pytest.fixture(scope="module")
def served(torchserve, inference, texts) -> dict[str, list[Any]]:
    """Every text as its own text/plain request to both archives, all in flight together."""
    for model in MODELS:
        require(ROOT / "model_store" / f"{model}.mar")
    jobs = [(url(torchserve, model), as_text(text)) for text in texts for model in MODELS]
    responses = post_all(inference, jobs)
    failed = [r.text for r in responses if r.status_code != 200]
    assert not failed, failed[:3]
    return {model: responses[offset :: len(MODELS)] for offset, model in enumerate(MODELS)}


@pytest.mark.parametrize("model", MODELS)
def test_served_probabilities_match_the_pipeline(
    served, texts, oracle, pipeline, max_length, model
):
    lengths = [len(pipeline.tokenizer(text)["input_ids"]) for text in texts]
    assert min(lengths) <= 3 and max(lengths) > max_length  # 1 word to past truncation
    diffs = [
        compare(response.json(), oracle[text])
        for text, response in zip(texts, served[model], strict=True)
    ]
    print(f"{model}: max |served - pipeline| = {max(diffs):.2e} over {len(texts)} texts")
    assert len(diffs) >= 50


@pytest.mark.parametrize("model", MODELS)
def test_heldout_accuracy(served, heldout, model):
    predicted = [response.json()[0]["label"] for response in served[model][: len(heldout)]]
    correct = sum(p == label for p, (label, _) in zip(predicted, heldout, strict=True))
    accuracy = correct / len(heldout)
    print(f"{model}: held-out accuracy {accuracy:.4f} ({correct}/{len(heldout)})")
    assert accuracy >= MIN_ACCURACY


@pytest.mark.parametrize("model", MODELS)
def test_concurrent_requests_share_dynamic_batches(torchserve, served, model):
    described = torchserve.client().describe(model)
    sizes = [int(response.headers["X-Batch-Size"]) for response in served[model]]
    print(f"{model}: batch sizes seen by the handler {sorted(set(sizes))}")
    assert max(sizes) > 1
    assert max(sizes) <= described["batchSize"]


@pytest.mark.parametrize("model", MODELS)
def test_list_inputs_match_the_pipeline(torchserve, inference, texts, oracle, model):
    chunks, start = [], 0
    for size in (1, 2, 5, 17, 32, 7, 40):  # lists of 1 to 40 texts, in order
        chunks.append(texts[start : start + size])
        start = (start + size) % len(texts)
    mixed = [texts[-1], "Excellent", texts[-3], "meh", texts[3]]  # longest beside shortest
    chunks.append(mixed)
    jobs = [(url(torchserve, model), {"json": {"inputs": chunk}}) for chunk in chunks]
    jobs.append((url(torchserve, model), {"json": mixed}))  # a bare JSON list
    jobs.append((url(torchserve, model), {"json": {"inputs": mixed, "top_k": 1}}))
    responses = post_all(inference, jobs)
    assert all(response.status_code == 200 for response in responses), responses[0].text
    for chunk, response in zip([*chunks, mixed], responses[:-1], strict=True):
        answers = response.json()
        assert len(answers) == len(chunk)
        for text, answer in zip(chunk, answers, strict=True):
            compare(answer, oracle[text])
    top_1 = responses[-1].json()
    assert [answer[0]["label"] for answer in top_1] == [oracle[t][0]["label"] for t in mixed]
    assert all(len(answer) == 1 for answer in top_1)


def test_every_request_form_gives_the_same_answer(torchserve, inference, oracle):
    text = "The hotel room was clean, the staff were friendly and breakfast was delicious."
    target = url(torchserve, "sentiment")
    forms = [
        as_text(text),
        {"json": {"inputs": text}},
        {"json": text},  # a bare JSON string
        {"files": {"data": (None, text)}},  # multipart form field
        {"data": text.encode(), "headers": {"Content-Type": "text/plain", "X-Top-K": "1"}},
        {"json": {"inputs": text, "top_k": 1}},
        {"files": {"data": (None, text), "top_k": (None, "1")}},
    ]
    responses = [inference.post(target, timeout=60, **form) for form in forms]
    assert [r.status_code for r in responses] == [200] * len(forms), [r.text for r in responses]
    for response in responses[:4]:
        compare(response.json(), oracle[text])
    for response in responses[4:]:
        assert response.json() == [response.json()[0]]
        compare(response.json(), oracle[text][:1])
    first = "[sarcasm] It was fine I guess, nothing special, but not bad either."
    response = inference.post(target, timeout=60, **as_text(first))
    assert response.status_code == 200, response.text  # text/plain is text, even with a "["


def test_eager_archive_explains_with_token_attributions(
    torchserve, inference, pipeline, texts, max_length
):
    samples = [texts[0], "Absolutely loved it 😍😍", "最高の映画でした", texts[-1]]
    target = url(torchserve, "sentiment_eager", "explanations")
    # Sent together, they may share a batch whose explanation budget holds only some of them;
    # the rest get 429 and are retried, as any client of explanations should.
    with ThreadPoolExecutor(max_workers=len(samples)) as pool:
        responses = list(
            pool.map(lambda text: post_retrying(inference, target, as_text(text)), samples)
        )
    tokenizer = pipeline.tokenizer
    for text, response in zip(samples, responses, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        assert body["tokens"] == tokenizer.convert_ids_to_tokens(ids)
        assert len(body["attributions"]) == len(body["tokens"])
        assert all(math.isfinite(value) for value in body["attributions"])
        assert math.fsum(value * value for value in body["attributions"]) == pytest.approx(1.0)
        expected = pipeline(text)[0]
        assert body["label"] == expected["label"]
        assert body["score"] == pytest.approx(expected["score"], abs=TOLERANCE)
    listed = inference.post(target, json={"inputs": samples[:2]}, timeout=120)
    assert listed.status_code == 200
    assert [item["tokens"] for item in listed.json()] == [
        response.json()["tokens"] for response in responses[:2]
    ]


def test_torchscript_archive_refuses_explanations_with_4xx(torchserve, inference):
    response = inference.post(
        url(torchserve, "sentiment", "explanations"), timeout=60, **as_text("Excellent")
    )
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == 400 and body["type"] == "InvalidInput"
    assert "save_mode 'pretrained'" in body["message"]


JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}  # what curl -d sends
BAD_INPUTS = {
    "empty body": (b"", TEXT, 400, "empty"),
    "whitespace only": (b"  \n\t  ", TEXT, 400, "whitespace"),
    "non-UTF-8 text": (b"caf\xe9 \xff\xfe", TEXT, 400, "UTF-8"),
    "non-UTF-8 JSON": (b'{"inputs": "caf\xe9"}', JSON, 400, "UTF-8"),
    "broken JSON": (b'{"inputs": "unterminated', JSON, 400, "not valid JSON"),
    "inputs is a number": (b'{"inputs": 12}', JSON, 400, "string or a list"),
    "list with a number": (b'{"inputs": ["fine", 3]}', JSON, 400, "inputs[1]"),
    "empty list": (b'{"inputs": []}', JSON, 400, "empty list"),
    "unknown field": (b'{"text": "fine"}', JSON, 400, "unknown field"),
    "lone surrogate": (b'{"inputs": "bad \\ud800 text"}', JSON, 400, "surrogate"),
    "bad top_k": (b'{"inputs": "fine", "top_k": 0}', JSON, 400, "top_k"),
    "top_k not a number": (b'{"inputs": "fine", "top_k": "all"}', JSON, 400, "top_k"),
    "curl -d form body": (b"I loved it", FORM, 400, "sent as form fields"),
    "too long with truncate false": (
        json.dumps({"inputs": "great " * 400, "truncate": False}).encode(),
        JSON,
        413,
        "at most 128",
    ),
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_4xx_and_the_worker_keeps_serving(
    torchserve, inference, oracle, model, case
):
    body, headers, status, fragment = BAD_INPUTS[case]
    target = url(torchserve, model)
    pid_before = torchserve.client().describe(model)["workers"][0]["pid"]
    response = inference.post(target, data=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"code", "type", "message"}
    assert error["code"] == status and fragment in error["message"]
    follow_up = inference.post(target, timeout=60, **as_text("Excellent"))
    assert follow_up.status_code == 200
    compare(follow_up.json(), oracle["Excellent"])
    assert torchserve.client().describe(model)["workers"][0]["pid"] == pid_before


@pytest.mark.parametrize("model", MODELS)
def test_bad_requests_in_a_batch_do_not_fail_their_neighbours(
    torchserve, inference, texts, oracle, model
):
    target = url(torchserve, model)
    jobs = []
    for index, text in enumerate(texts[:36]):
        if index % 3 == 1:
            jobs.append((target, {"data": b"\xff\xfe", "headers": TEXT}))
        elif index % 3 == 2:
            jobs.append((target, {"json": {"inputs": [text, 5]}}))
        else:
            jobs.append((target, as_text(text)))
    responses = post_all(inference, jobs)
    for index, (text, response) in enumerate(zip(texts, responses, strict=False)):
        if index % 3:
            assert response.status_code == 400, response.text
        else:
            assert response.status_code == 200, response.text
            compare(response.json(), oracle[text])
    assert max(int(response.headers["X-Batch-Size"]) for response in responses) > 1
