"""KServe v1 and v2 (Open Inference Protocol) bodies on every task, per request, in one batch.

Each task's handler is loaded from a tiny model taken through the real build and driven
through a real ``ts.context.Context``. KServe requests share a dynamic batch with plain ones,
contribute all their instances to the one forward, answer in their protocol, and a bad one
gets its own 4xx ``{"error": ...}`` while its neighbours answer.
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from typing import Any

import numpy as np
import pytest
from harness import (
    TINY_TEXT_MAX_LENGTH,
    body_headers,
    run_batch,
)
from PIL import Image

from ts_handlers import protocols
from ts_handlers.base import BATCH_SIZE_HEADER

JSON = body_headers("application/json")
TEXTS = ["the movie was great", "i hated every minute", "tea", "service was slow but tasty"]
TOLERANCE = 1e-5


# ---- requests ------------------------------------------------------------------------------


def raw_json(payload: Any, **headers: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A JSON body as the worker forwards it undecoded (decode_input_request=false)."""
    return {"body": json.dumps(payload).encode()}, {**JSON, **headers}


def parsed_json(payload: Any, **headers: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A JSON body as TorchServe's default worker hands it over: already parsed."""
    return {"body": payload}, {**JSON, **headers}


def v1(instances: list[Any], **headers: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return raw_json({"instances": instances}, **headers)


def v2(
    data: list[Any], shape: list[int] | None = None, **body: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    tensor = {"name": "input-0", "shape": shape or [len(data)], "datatype": "BYTES", "data": data}
    return raw_json({"inputs": [tensor], **body})


def outputs(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {tensor["name"]: tensor for tensor in body["outputs"]}


def as_array(tensor: dict[str, Any]) -> np.ndarray:
    return np.asarray(tensor["data"], dtype=np.float64).reshape(tensor["shape"])


def assert_kserve_error(result: tuple[int, Any, dict[str, str]], status: int, words: str) -> None:
    code, body, _ = result
    assert code == status, body
    assert set(body) == {"error"}, body
    assert words in body["error"], body["error"]


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 12), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


# ---- recognition ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "protocol"),
    [
        ({"instances": ["a"]}, protocols.V1Request),
        ({"instances": "not a list"}, protocols.V1Request),  # then refused in v1's error body
        ({"inputs": [{"name": "x"}]}, protocols.V2Request),
        ({"inputs": ["a", {"name": "x"}]}, protocols.V2Request),
        ({"inputs": ["a", "b"]}, None),  # the text tasks' own list form
        ({"inputs": "a"}, None),
        ({"data": "iVBOR"}, None),
        (["a", "b"], None),
        ("instances", None),
    ],
)
def test_only_kserve_shapes_are_recognised(payload, protocol):
    found = protocols.recognise(payload)
    assert (None if found is None else type(found)) is protocol


# ---- images --------------------------------------------------------------------------------


def test_images_in_v1_and_v2_answer_as_the_plain_api_in_one_batch(vision_handler, batch):
    images = [png(seed) for seed in range(4)]
    request_id = "request-7"
    results = batch(
        [
            ({"body": bytearray(images[0])}, body_headers("image/png")),
            v1([b64(images[0]), {"data": b64(images[1])}, {"b64": b64(images[2])}]),
            v2([b64(image) for image in images], id=request_id),
            ({"body": bytearray(images[3])}, body_headers("image/png")),
            parsed_json({"instances": [b64(images[3])]}),
        ]
    )
    assert [status for status, _, _ in results] == [200] * 5, results
    # Every instance of every request ran in the one batched forward.
    assert {headers[BATCH_SIZE_HEADER] for _, _, headers in results} == {"10"}
    plain = {0: results[0][1], 3: results[3][1]}
    predictions = results[1][1]["predictions"]
    assert len(predictions) == 3 and predictions[0] == plain[0]
    assert results[4][1] == {"predictions": [plain[3]]}

    answer = results[2][1]
    assert answer["model_name"] == vision_handler.manifest["model"]["modelName"]
    assert answer["id"] == request_id
    tensors = outputs(answer)
    assert [tensors["scores"]["datatype"], tensors["labels"]["datatype"]] == ["FP32", "BYTES"]
    assert tensors["scores"]["shape"] == tensors["labels"]["shape"] == [4, 2]  # top_k 2
    scores, labels = as_array(tensors["scores"]), tensors["labels"]["data"]
    for row, expected in ((0, plain[0]), (1, predictions[1]), (2, predictions[2]), (3, plain[3])):
        assert labels[2 * row : 2 * row + 2] == [entry["label"] for entry in expected]
        np.testing.assert_allclose(scores[row], [e["score"] for e in expected], atol=TOLERANCE)


def test_v2_without_an_id_gets_a_fresh_uuid(batch):
    first, second = batch([v2([b64(png(1))]), v2([b64(png(1))])])
    assert first[0] == second[0] == 200
    assert first[1]["id"] != second[1]["id"]
    assert uuid.UUID(first[1]["id"]).version == 4


def test_image_options_from_v2_parameters_and_v1_headers(batch):
    results = batch(
        [
            v2([b64(png(2))], parameters={"top_k": 1}),
            v1([b64(png(2))], **{"X-Top-K": "3"}),
            v2([b64(png(2))], outputs=[{"name": "labels"}]),
        ]
    )
    assert outputs(results[0][1])["scores"]["shape"] == [1, 1]
    assert len(results[1][1]["predictions"][0]) == 3
    assert [tensor["name"] for tensor in results[2][1]["outputs"]] == ["labels"]


def test_bad_image_requests_get_their_own_error_and_neighbours_answer(batch):
    good = b64(png(3))
    results = batch(
        [
            v1([good, "not base64 !"]),
            raw_json({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.5]}]}),
            v1([good] * 5),
            v2([good], parameters={"colour": "red"}),
            v2([good, good], shape=[3]),
            v1([b64(b"not an image at all")]),
            v2([good], parameters={"top_k": 0}),
            ({"body": bytearray(png(3))}, body_headers("image/png")),
            v1([good]),
        ]
    )
    assert_kserve_error(results[0], 400, "instances[1] is not valid base64")
    assert_kserve_error(results[1], 400, "inputs[0].datatype is FP32")
    assert_kserve_error(results[2], 413, "max_images_per_request")
    assert_kserve_error(results[3], 400, 'unknown parameter(s) "colour"; this model accepts top_k')
    assert_kserve_error(results[4], 400, "holds 3 elements but inputs[0].data has 2")
    assert_kserve_error(results[5], 415, "instances[0]: the body is not an image")
    assert_kserve_error(results[6], 400, "top_k must be at least 1")
    assert results[7][0] == 200 and len(results[7][1]) == 2
    assert results[8][0] == 200 and results[8][1]["predictions"][0] == results[7][1]


# ---- sequence classification ---------------------------------------------------------------


@pytest.fixture
def classifier(text_handlers):
    return text_handlers["torchscript"]


def test_texts_in_v1_and_v2_answer_as_the_plain_api_in_one_batch(classifier):
    results = run_batch(
        classifier,
        [
            raw_json({"inputs": TEXTS}),
            v1([TEXTS[0], {"data": TEXTS[1]}, {"b64": b64(TEXTS[2])}]),
            v2(TEXTS, shape=[2, 2]),  # any shape that holds the elements, row-major
            v2([TEXTS[3]], parameters={"top_k": 1}),
            v2([[TEXTS[3]]], shape=[1, 1], parameters={"function_to_apply": "none"}),
        ],
    )
    assert [status for status, _, _ in results] == [200] * 5, results
    assert {headers[BATCH_SIZE_HEADER] for _, _, headers in results} == {str(4 + 3 + 4 + 1 + 1)}
    plain = results[0][1]
    # Padded with other texts than the plain request's: equal up to float rounding.
    for answer, expected in zip(results[1][1]["predictions"], plain[:3], strict=True):
        assert_close_answers(answer, expected)

    tensors = outputs(results[2][1])
    assert tensors["scores"]["shape"] == tensors["labels"]["shape"] == [4, 3]
    for row, expected in enumerate(plain):
        assert tensors["labels"]["data"][3 * row : 3 * row + 3] == [e["label"] for e in expected]
        np.testing.assert_allclose(
            as_array(tensors["scores"])[row], [e["score"] for e in expected], atol=TOLERANCE
        )
    top_1 = outputs(results[3][1])
    assert top_1["scores"]["shape"] == [1, 1]
    assert top_1["labels"]["data"] == [plain[3][0]["label"]]
    assert outputs(results[4][1])["labels"]["data"] == [e["label"] for e in plain[3]]


def assert_close_answers(actual: list[dict], expected: list[dict]) -> None:
    assert [entry["label"] for entry in actual] == [entry["label"] for entry in expected]
    np.testing.assert_allclose(
        [entry["score"] for entry in actual], [entry["score"] for entry in expected], atol=TOLERANCE
    )


def test_v2_content_type_base64_carries_utf8_text(classifier):
    text = "Café naïve 🙂"
    tensor = {
        "name": "text",
        "shape": [1],
        "datatype": "BYTES",
        "parameters": {"content_type": "base64"},
        "data": [b64(text)],
    }
    plain, encoded, not_utf8 = run_batch(
        classifier,
        [
            raw_json({"inputs": [text]}),
            raw_json({"inputs": [tensor]}),
            raw_json({"inputs": [{**tensor, "data": [b64(b"\xff\xfe")]}]}),
        ],
    )
    assert outputs(encoded[1])["labels"]["data"] == [e["label"] for e in plain[1][0]]
    assert_kserve_error(not_utf8, 400, "inputs[0].data[0] is base64 of bytes that are not UTF-8")


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ({"inputs": [{"shape": [1], "datatype": "BYTES", "data": ["a"]}]}, "inputs[0].name is"),
        (
            {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"], "f": 1}]},
            "unknown field inputs[0].f",
        ),
        (
            {"inputs": [{"name": "x", "shape": ["1"], "datatype": "BYTES", "data": ["a"]}]},
            "inputs[0].shape[0]: input should be a valid integer",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1], "datatype": "TEXT", "data": ["a"]}]},
            'inputs[0].datatype="TEXT" is not supported',
        ),
        (
            {"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": ["a", 3]}]},
            "inputs[0].data[1] must be a string (BYTES), got 3",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["  "]}]},
            "inputs[0].data[0] is empty or whitespace only",
        ),
        (
            {
                "inputs": [
                    {"name": "a", "shape": [1], "datatype": "BYTES", "data": ["a"]},
                    {"name": "b", "shape": [1], "datatype": "BYTES", "data": ["b"]},
                ]
            },
            "this model takes one input tensor, got 2",
        ),
        (
            {
                "inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                "outputs": [{"name": "logits"}],
            },
            'outputs names "logits", which this model does not produce; its outputs are scores',
        ),
        (
            {
                "inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                "id": "x" * 300,
            },
            "id: string should have at most 256 characters",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}], "a": 1},
            "unknown field a",
        ),
        ({"instances": []}, "instances is empty"),
        ({"instances": ["a"], "parameters": {}}, "unknown field parameters"),
        ({"instances": ["a", 7]}, 'instances[1] must be a string, {"data": "..."}'),
        ({"instances": [{"b64": "@@"}]}, "instances[0] is not valid base64"),
    ],
)
def test_a_bad_kserve_body_gets_400_error_and_its_neighbour_answers(classifier, payload, words):
    bad, good = run_batch(classifier, [raw_json(payload), v1([TEXTS[0]])])
    assert_kserve_error(bad, 400, words)
    assert good[0] == 200 and len(good[1]["predictions"]) == 1


def test_limits_hold_for_kserve_requests(classifier):
    too_many = classifier.config.max_texts_per_request + 1
    long_text = " ".join(["great"] * (TINY_TEXT_MAX_LENGTH * 2))
    results = run_batch(
        classifier,
        [
            v1(["tea"] * too_many),
            v2([long_text], parameters={"truncate": False}),
            v2([long_text]),
        ],
    )
    assert_kserve_error(results[0], 413, "max_texts_per_request")
    assert_kserve_error(results[1], 413, "inputs[0].data[0] is")
    assert results[2][0] == 200


def test_a_forward_failure_answers_500_in_the_kserve_body(classifier, monkeypatch):
    def failing(input_ids, attention_mask):
        raise RuntimeError("the device is gone")

    monkeypatch.setattr(classifier, "run_model", failing)
    plain, kserve = run_batch(classifier, [raw_json({"inputs": ["tea"]}), v1(["tea"])])
    assert plain[0] == 500 and plain[1]["type"] == "InternalServerError"
    assert_kserve_error(kserve, 500, "the model failed on this request")


def test_explanations_in_v1_and_v2(text_handlers):
    explainer = text_handlers["pretrained"]
    explain = {"explain": "True"}
    plain, first, second = run_batch(
        explainer,
        [
            raw_json({"inputs": [TEXTS[0]]}, **explain),
            v1([TEXTS[0]], **explain),
            raw_json(
                {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [TEXTS[0]]}]},
                **explain,
            ),
        ],
    )
    assert plain[0] == first[0] == second[0] == 200
    expected = plain[1][0]
    [v1_answer] = first[1]["explanations"]
    [v2_answer] = [json.loads(item) for item in outputs(second[1])["explanations"]["data"]]
    for answer in (v1_answer, v2_answer):
        assert answer["label"] == expected["label"] and answer["tokens"] == expected["tokens"]
        np.testing.assert_allclose(answer["attributions"], expected["attributions"], atol=1e-4)


# ---- sentence embeddings -------------------------------------------------------------------


def test_embeddings_answer_fp32_with_their_shape(embedder):
    results = run_batch(
        embedder,
        [
            raw_json({"inputs": TEXTS}),
            v2(TEXTS),
            v1(TEXTS[:2]),
            raw_json({"inputs": TEXTS[:2], "normalize": False}),
            v2(TEXTS[:2], parameters={"normalize": False}, outputs=[{"name": "embeddings"}]),
        ],
    )
    assert [status for status, _, _ in results] == [200] * 5, results
    plain = np.asarray(results[0][1])
    tensor = outputs(results[1][1])["embeddings"]
    assert tensor["datatype"] == "FP32" and tensor["shape"] == [4, 32]
    np.testing.assert_allclose(as_array(tensor), plain, atol=TOLERANCE)
    np.testing.assert_allclose(results[2][1]["predictions"], plain[:2], atol=TOLERANCE)
    unnormalized = as_array(outputs(results[4][1])["embeddings"])
    np.testing.assert_allclose(unnormalized, results[3][1], atol=TOLERANCE)
    assert not np.allclose(np.linalg.norm(unnormalized, axis=1), 1.0)


# ---- token classification ------------------------------------------------------------------


def test_entities_answer_json_per_text(recogniser):
    results = run_batch(
        recogniser,
        [
            raw_json({"inputs": TEXTS}),
            v2(TEXTS, parameters={"aggregation_strategy": "first"}),
            raw_json({"inputs": TEXTS, "aggregation_strategy": "first"}),
            v1(TEXTS),
            v2(TEXTS, parameters={"aggregation_strategy": "best"}),
        ],
    )
    assert [status for status, _, _ in results[:4]] == [200] * 4, results
    tensor = outputs(results[1][1])["entities"]
    assert tensor["datatype"] == "BYTES" and tensor["shape"] == [len(TEXTS)]
    assert any(results[0][1]), "the tiny model finds some entities"
    for answer, expected in zip(tensor["data"], results[2][1], strict=True):
        assert_same_entities(json.loads(answer), expected)
    for answer, expected in zip(results[3][1]["predictions"], results[0][1], strict=True):
        assert_same_entities(answer, expected)
    assert_kserve_error(results[4], 400, "aggregation_strategy='best' is not supported")


def assert_same_entities(actual: list[dict], expected: list[dict]) -> None:
    def without_score(entities: list[dict]) -> list[dict]:
        return [{key: value for key, value in e.items() if key != "score"} for e in entities]

    assert without_score(actual) == without_score(expected)
    np.testing.assert_allclose(
        [e["score"] for e in actual], [e["score"] for e in expected], atol=TOLERANCE
    )
