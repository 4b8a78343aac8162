"""Malformed bodies of any shape get a 4xx JSON answer, never a 500 or a dead worker.

Most tests here drive a handler with rows built by TorchServe's own Python worker code
(``ts.protocol.otf_message_handler._retrieve_input_data`` reading a frame, then
``ts.service.Service.retrieve_data_for_inference``), in both of the worker's modes: decoding
``application/json`` itself (TorchServe's default) and forwarding raw bytes
(``TS_DECODE_INPUT_REQUEST=false``, from the ``decode_input_request=false`` property that
``LocalTorchServe`` writes).
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import logging
import struct
import zlib
from typing import Any

import pytest
from PIL import Image
from ts.protocol.otf_message_handler import _retrieve_input_data
from ts.service import Service

from ts_handlers.errors import MAX_MESSAGE_CHARS, InvalidInput, PayloadTooLarge, error_body
from ts_handlers.payload import (
    MAX_DECOMPRESSED_BYTES,
    MAX_JSON_DEPTH,
    MAX_NUMBER_CHARS,
    Request,
    check_parsed_json,
    json_depth,
    parse_json,
    preview,
    reject_unknown_fields,
)

JSON = "application/json"
DEEP = b"[" * 100_000 + b"]" * 100_000


class Frames:
    """A socket stand-in holding the bytes the frontend would send."""

    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)

    def recv(self, length: int) -> bytes:
        return self.buffer.read(length)


def frame(*fields: bytes) -> bytes:
    return b"".join(struct.pack("!i", len(field)) + field for field in fields)


def worker_batch(
    requests: list[tuple[bytes | None, str, dict[str, str]]], decode: bool, monkeypatch
) -> tuple[list[Any], list[dict[str, Any]]]:
    """(body, content type, headers) -> TorchServe's (request processors, rows) for one batch.

    A body of None is a request without parameters, as TorchServe's management describe sends.
    """
    monkeypatch.setenv("TS_DECODE_INPUT_REQUEST", "true" if decode else "false")
    batch = []
    for index, (body, content_type, headers) in enumerate(requests):
        parameters = []
        if body is not None:
            data = frame(b"body", content_type.encode(), body)
            parameters.append(_retrieve_input_data(Frames(data)))
        batch.append(
            {
                "requestId": str(index).encode(),
                "headers": [
                    {"name": key.encode(), "value": value.encode()}
                    for key, value in headers.items()
                ],
                "parameters": parameters,
            }
        )
    processors, rows, _ = Service.retrieve_data_for_inference(batch)
    return processors, rows


def serve(handler, requests, monkeypatch, decode: bool = False) -> list[tuple[int, Any]]:
    processors, rows = worker_batch(requests, decode, monkeypatch)
    context = handler.context
    context.request_processor = processors
    answers = handler.handle(rows, context)
    assert len(answers) == len(requests)
    results = []
    for index, answer in enumerate(answers):
        status, _ = context.get_response_status(index)
        assert context.get_response_content_type(index) == JSON
        results.append((status, json.loads(answer)))
    return results


def assert_client_error(status: int, body: Any, code: int, fragment: str) -> None:
    assert status == code, body
    assert set(body) == {"code", "type", "message"}
    assert body["code"] == code
    assert fragment in body["message"]


def rounded(value: Any) -> Any:
    """An answer with its floats rounded: padding in a batch moves them in the last digits."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [rounded(item) for item in value]
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    return value


@pytest.fixture
def text_handler(text_handlers):
    return text_handlers["torchscript"]


# ---- TorchServe's own decoding: the facts docs/security.md states -------------------------


def test_torchserve_forwards_bytes_when_its_own_json_decoding_fails(monkeypatch):
    """The worker catches any exception from json.loads (RecursionError included) and forwards
    the raw bytes with a warning; it does not fail the batch."""
    _, rows = worker_batch([(DEEP, JSON, {}), (b'{"a": NaN}', JSON, {})], True, monkeypatch)
    assert rows[0]["body"] == bytearray(DEEP)
    assert isinstance(rows[1]["body"], dict)  # NaN is taken: json.loads is lenient
    _, rows = worker_batch([(b'{"a": 1}', JSON, {})], False, monkeypatch)
    assert rows[0]["body"] == bytearray(b'{"a": 1}')


def test_a_duplicate_key_is_lost_when_torchserve_decodes(text_handler, monkeypatch):
    body = b'{"inputs": "first", "inputs": "the movie was great"}'
    [(status, _)] = serve(text_handler, [(body, JSON, {})], monkeypatch, decode=True)
    assert status == 200  # last one wins inside TorchServe; only undecoded bodies can be checked


# ---- malformed JSON of any shape ------------------------------------------------------------

MALFORMED = {
    "nested 100,000 deep": (DEEP, "nests more than 64 levels deep"),
    "deep inside an object": (
        b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "nests more than 64",
    ),
    "100,000-digit integer": (b'{"inputs": ' + b"9" * 100_000 + b"}", "longer than 64 characters"),
    # Under Python's 4300-digit conversion limit: TorchServe converts it, the handler refuses it.
    "4,000-digit integer": (b'{"inputs": [' + b"9" * 4000 + b"]}", "longer than 64 characters"),
    "NaN": (b'{"inputs": NaN}', "NaN and Infinity are not JSON"),
    "Infinity": (b'{"inputs": ["a", -Infinity]}', "NaN and Infinity are not JSON"),
    # raw: "too large for a double"; TorchServe turns it into inf first: "NaN and Infinity"
    "overflowing float": (b'{"inputs": 1e999}', "not valid JSON"),
    "6 MB unterminated string": (b'{"inputs": "' + b"a" * 6_000_000, "Unterminated string"),
    "6 MB of escaped quotes": (b'["' + b'\\"' * 3_000_000, "not valid JSON"),
    "broken": (b'{"inputs": [', "not valid JSON"),
}


@pytest.mark.parametrize("decode", [False, True], ids=["raw bytes", "torchserve decodes"])
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_json_is_a_400_and_its_neighbour_is_served(
    text_handler, monkeypatch, caplog, case, decode
):
    body, fragment = MALFORMED[case]
    good = (b'{"inputs": "the movie was great"}', JSON, {})
    with caplog.at_level(logging.INFO, logger="ts_handlers"):
        results = serve(text_handler, [(body, JSON, {}), good], monkeypatch, decode)
    assert_client_error(*results[0], 400, fragment)
    assert results[0][1]["type"] == "InvalidInput"
    assert results[1][0] == 200
    ours = [record for record in caplog.records if record.name.startswith("ts_handlers")]
    assert [record.getMessage() for record in ours] == ["request 0 rejected: 400 InvalidInput"]
    assert ours[0].exc_info is None


def test_a_duplicate_key_is_a_400_naming_the_key(text_handler, monkeypatch):
    body = b'{"inputs": "a", "truncate": true, "inputs": "b"}'
    [(status, answer)] = serve(text_handler, [(body, JSON, {})], monkeypatch)
    assert_client_error(status, answer, 400, 'repeats the key "inputs"')


def test_number_literals_are_refused_by_length_before_conversion():
    assert parse_json("[" + "9" * MAX_NUMBER_CHARS + ", -1.5e3]")[1] == -1500.0
    for literal in ("9" * (MAX_NUMBER_CHARS + 1), "0." + "1" * MAX_NUMBER_CHARS):
        with pytest.raises(InvalidInput, match=f"longer than {MAX_NUMBER_CHARS} characters"):
            parse_json(f'{{"shape": [{literal}]}}')
    # Already parsed by TorchServe: the integer is refused by its width.
    check_parsed_json([10 ** (MAX_NUMBER_CHARS - 1)])
    with pytest.raises(InvalidInput, match="longer than"):
        check_parsed_json({"a": [10**4000]})


def test_depth_limit_is_exact():
    value = parse_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    for _ in range(MAX_JSON_DEPTH - 1):
        [value] = value
    assert value == []
    with pytest.raises(InvalidInput, match="nests more than"):
        parse_json("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))


def test_depth_scan_ignores_brackets_inside_strings():
    text = json.dumps({"a": "[[[[{{{{" * 100, "b": ['\\"]]]', [[1]]]})
    assert json_depth(text) == 4
    assert parse_json(text)["b"][1] == [[1]]
    assert json_depth('["\\\\", [[]]]') == 3


def test_an_already_parsed_body_is_checked_without_recursion():
    deep: list[Any] = []
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(InvalidInput, match="nests more than"):
        check_parsed_json(deep)
    with pytest.raises(InvalidInput, match="NaN"):
        check_parsed_json({"inputs": ["x"], "top_k": float("nan")})
    check_parsed_json({"inputs": ["x"], "top_k": 1.5})


# ---- Content-Encoding -----------------------------------------------------------------------


def test_a_gzip_body_is_decoded_for_every_form(text_handler, monkeypatch):
    plain = b'{"inputs": ["the movie was great", "awful boring film"]}'
    gz = {"Content-Encoding": "gzip"}
    results = serve(
        text_handler,
        [
            (plain, JSON, {}),
            (gzip.compress(plain), JSON, gz),
            (zlib.compress(plain), JSON, {"Content-Encoding": "deflate"}),
            (gzip.compress(b"the movie was great"), "text/plain", gz),
        ],
        monkeypatch,
        decode=True,  # TorchServe fails to decode the compressed bytes and forwards them
    )
    assert [status for status, _ in results] == [200, 200, 200, 200]
    plain_answer = rounded(results[0][1])
    assert rounded(results[1][1]) == plain_answer == rounded(results[2][1])
    assert rounded(results[3][1]) == plain_answer[0]


def test_a_gzip_image_is_decoded(batch):
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 200).save(buffer, "PNG")
    png = buffer.getvalue()
    headers = {"body": {"content-type": "image/png"}, "Content-Encoding": "gzip"}
    [(plain_status, plain, _), (status, answer, _)] = batch(
        [
            ({"body": png}, {"body": {"content-type": "image/png"}}),
            ({"body": gzip.compress(png)}, headers),
        ]
    )
    assert (plain_status, status) == (200, 200)
    assert answer == plain


def test_a_gzip_bomb_is_a_413_naming_the_limit(text_handler, monkeypatch):
    bomb = gzip.compress(b" " * (64 * 1024 * 1024), 9)  # 64 MiB of spaces in about 64 KiB
    assert len(bomb) < 100_000
    [(status, answer)] = serve(
        text_handler, [(bomb, "text/plain", {"Content-Encoding": "gzip"})], monkeypatch
    )
    assert_client_error(status, answer, 413, f"more than {MAX_DECOMPRESSED_BYTES} bytes")
    assert answer["type"] == "PayloadTooLarge"


@pytest.mark.parametrize(
    ("body", "encoding", "code", "fragment"),
    [
        (b"plain, not gzip", "gzip", 400, "not valid gzip data"),
        (gzip.compress(b'{"inputs": "x"}')[:-6], "gzip", 400, "truncated"),
        (zlib.compress(b'{"inputs": "x"}') + b"junk", "deflate", 400, "trailing data"),
        (b'{"inputs": "x"}', "br", 415, 'Content-Encoding "br" is not supported'),
        (gzip.compress(gzip.compress(b"x")), "gzip, gzip", 415, "compressed once"),
    ],
)
def test_bad_content_encoding(text_handler, monkeypatch, body, encoding, code, fragment):
    headers = {"Content-Encoding": encoding}
    [(status, answer)] = serve(text_handler, [(body, JSON, headers)], monkeypatch)
    assert_client_error(status, answer, code, fragment)


def test_inflate_cap_is_a_parameter():
    row = {"body": gzip.compress(b"a" * 100)}
    headers = {"Content-Encoding": "gzip"}
    assert Request.from_row(row, "", headers, max_decompressed=100).body == b"a" * 100
    with pytest.raises(PayloadTooLarge, match="more than 99 bytes"):
        Request.from_row(row, "", headers, max_decompressed=99)
    identity = Request.from_row({"body": b"x"}, "", {"Content-Encoding": "identity"})
    assert identity.body == b"x"


# ---- unknown fields, the same in every task ---------------------------------------------------


def test_vision_rejects_unknown_fields_like_the_text_tasks(batch, text_handler, monkeypatch):
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    results = batch(
        [
            ({"body": {"data": data, "topk": 3}}, {"body": {"content-type": JSON}}),
            ({"body": {"data": data, "image": data}}, {"body": {"content-type": JSON}}),
            ({"body": {"image": data, "top_k": 1}}, {"body": {"content-type": JSON}}),
        ]
    )
    assert_client_error(results[0][0], results[0][1], 400, "unknown field(s) topk; accepted: ")
    assert results[0][1]["message"].endswith("accepted: data, image, top_k")
    assert_client_error(results[1][0], results[1][1], 400, "not both")
    assert results[2][0] == 200 and len(results[2][1]) == 1
    [(status, answer)] = serve(text_handler, [(b'{"text": "x"}', JSON, {})], monkeypatch)
    assert_client_error(status, answer, 400, "unknown field(s) text; accepted: inputs")


def test_echoed_client_values_are_short():
    huge_key = "é" * 1_000_000
    with pytest.raises(InvalidInput) as error:
        reject_unknown_fields({huge_key: 1, "b": 2}, ["inputs"])
    assert len(error.value.message) < 200
    assert len(preview("x" * 10_000)) < 50
    assert preview([1, 2]) == "[1, 2]"
    body = error_body(400, "InvalidInput", "m" * 1_000_000)
    assert len(json.loads(body)["message"]) == MAX_MESSAGE_CHARS


# ---- describe answers the management API only -----------------------------------------------


def test_management_describe_answers_without_paths(
    vision_handler, text_handler, tiny_vision_archive, tiny_text_checkpoint, monkeypatch
):
    """GET /models/<name>?customized=true: one request, no parameters, header describe=True."""
    describe = [(None, "", {"describe": "True", "Authorization": "Bearer k"})]
    [(status, answer)] = serve(vision_handler, describe, monkeypatch)
    assert status == 200
    assert answer["handler"] == "ImageClassificationHandler"
    assert answer["labels"] == ["zero", "one", "two", "three"]
    assert answer["export"]["verification"]["dynamic_shapes"]["passed"] is True
    assert answer["config"]["image_size"] == [16, 16]
    for handler, root in (
        (vision_handler, tiny_vision_archive.parent.parent),
        (text_handler, tiny_text_checkpoint.parent),
    ):
        [(status, answer)] = serve(handler, describe, monkeypatch)
        assert status == 200
        assert not {"model_name", "serialized_file", "model_file"} & set(answer["config"])
        assert str(root) not in json.dumps(answer)


def test_a_describe_header_never_turns_a_prediction_into_a_describe(vision_handler, monkeypatch):
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 200).save(buffer, "PNG")
    forged = {"describe": "True"}
    data = json.dumps({"data": base64.b64encode(buffer.getvalue()).decode()}).encode()
    results = serve(
        vision_handler,
        [(buffer.getvalue(), "image/png", forged), (data, JSON, forged)],
        monkeypatch,
    )
    for status, answer in results:
        assert status == 200 and isinstance(answer, list) and "label" in answer[0]
    [(status, answer)] = serve(
        vision_handler, [(buffer.getvalue(), "image/png", forged)], monkeypatch
    )
    assert status == 200 and isinstance(answer, list)
    # A REST prediction always carries a body parameter, even an empty one.
    [(status, answer)] = serve(vision_handler, [(b"", "", forged)], monkeypatch)
    assert_client_error(status, answer, 400, "empty")
    # A management describe is always alone in its batch.
    results = serve(vision_handler, [(None, "", forged), (None, "", forged)], monkeypatch)
    assert [status for status, _ in results] == [400, 400]
