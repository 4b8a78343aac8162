"""Property-based fuzzing of request decoding: any body ends as an answer or a 4xx, in time.

hypothesis drives every task's handler (image classification, sequence classification,
sentence embedding, token classification: the tiny models of conftest.py, through a real
``ts.context.Context``) with arbitrary bytes under every content type and Content-Encoding,
arbitrary JSON, KServe v1 and v2 bodies of arbitrary structure (raw, and already parsed as
TorchServe's default worker hands them over), form fields and option headers, and image files
of every promised format (and some others) with bytes flipped, cut and repeated. Every request
must get 200 or a 4xx with the JSON body of its protocol (a 500 is how the handler answers an
exception other than a ``RequestError``), each within ``DEADLINE`` (hypothesis fails an example
that takes longer, after re-running it).

The run is bounded: ``derandomize`` makes it the same examples every run, and the example
counts keep the whole file to a few tens of seconds on a 2-core machine. Cases it found are
kept as ``@example`` regressions.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import zlib
from datetime import timedelta
from typing import Any

import pytest
from harness import run_batch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

DEADLINE = timedelta(seconds=3)
FUZZ = settings(
    max_examples=200,
    deadline=DEADLINE,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
TASKS = ["vision", "classifier", "embedder", "recogniser"]
CONTENT_TYPES = [
    "",
    "application/json",
    "text/plain",
    "text/plain; charset=utf-8",
    "image/png",
    "application/octet-stream",
    "application/x-www-form-urlencoded",
    "multipart/form-data",
]
OPTION_HEADERS = ["X-Top-K", "X-Truncate", "X-Normalize", "X-Aggregation-Strategy", "X-Other"]


@pytest.fixture
def handlers(vision_handler, text_handlers, embedder, recogniser) -> dict[str, Any]:
    return {
        "vision": vision_handler,
        "classifier": text_handlers["torchscript"],
        "embedder": embedder,
        "recogniser": recogniser,
    }


def answered_in_protocol(handler: Any, row: Any, headers: dict[str, Any]) -> None:
    """The property: one request, one answer, 200 or a 4xx with its protocol's JSON body."""
    [(status, body, _)] = run_batch(handler, [(row, headers)])
    assert status == 200 or 400 <= status < 500, (status, body)
    if status != 200:
        assert set(body) in ({"code", "type", "message"}, {"error"}), body


# ---- strategies ---------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**30, max_value=10**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=25,
)


def encode_image(image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (24, 20), (30, 160, 90))
    if image_format == "GIF":
        frames = [image, Image.new("RGB", (24, 20), (200, 10, 10))]
        image.save(buffer, "GIF", save_all=True, append_images=frames[1:])
    else:
        image.save(buffer, image_format, **options)
    return buffer.getvalue()


SEED_IMAGES = [
    encode_image("PNG"),
    encode_image("JPEG"),
    encode_image("JPEG", progressive=True),
    encode_image("GIF"),
    encode_image("BMP"),
    encode_image("TIFF"),
    encode_image("TIFF", compression="tiff_lzw"),
    encode_image("WEBP"),
    encode_image("ICO"),
    encode_image("PPM"),
]


def mutate(
    seed: bytes, flips: list[tuple[int, int]], cut: int, repeat: tuple[int, int, int]
) -> bytes:
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    start, length, times = repeat
    start %= len(data)
    piece = bytes(data[start : start + length])
    data[start:start] = piece * times
    return bytes(data[: max(1, len(data) - cut)]) if cut else bytes(data)


images = st.builds(
    mutate,
    st.sampled_from(SEED_IMAGES),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    st.integers(0, 400) | st.just(0),
    st.tuples(st.integers(0, 10_000), st.integers(0, 40), st.integers(0, 200)),
)
texts = st.text(max_size=60)
b64 = st.builds(lambda data: base64.b64encode(data).decode(), images | st.binary(max_size=40))
instances = st.one_of(
    texts,
    b64,
    st.fixed_dictionaries({"b64": b64 | texts}),
    st.fixed_dictionaries({"data": texts}),
    json_values,
)
dimensions = st.integers(-3, 8) | st.integers() | st.text(max_size=3) | st.booleans()
tensors = st.fixed_dictionaries(
    {
        "name": st.text(max_size=6) | st.integers(),
        "shape": st.lists(dimensions, max_size=4) | json_values,
        "datatype": st.sampled_from(["BYTES", "FP32", "TEXT"]),
        "data": st.lists(instances | st.lists(instances, max_size=3), max_size=6) | json_values,
    },
    optional={
        "parameters": st.dictionaries(
            st.sampled_from(["content_type", "x"]), st.sampled_from(["str", "base64", "x", 1])
        ),
        "extra": json_values,
    },
)
parameter_names = st.sampled_from(
    ["top_k", "truncate", "normalize", "aggregation_strategy", "function_to_apply", "x"]
)
v2_bodies = st.fixed_dictionaries(
    {"inputs": st.lists(tensors, max_size=3)},
    optional={
        "id": st.text(max_size=10) | st.integers(),
        "parameters": st.dictionaries(parameter_names, json_values, max_size=3) | json_values,
        "outputs": st.lists(st.fixed_dictionaries({"name": texts}), max_size=3) | json_values,
    },
)
v1_bodies = st.fixed_dictionaries(
    {"instances": st.lists(instances, max_size=6) | json_values},
    optional={"x": json_values},
)
own_bodies = st.one_of(
    st.fixed_dictionaries({"inputs": texts | st.lists(texts, max_size=6) | json_values}),
    st.fixed_dictionaries({"data": b64 | json_values}, optional={"top_k": json_values}),
    st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    json_values,
)
option_headers = st.dictionaries(st.sampled_from(OPTION_HEADERS), st.text(max_size=12), max_size=3)


def compressed(data: bytes, coding: str) -> bytes:
    if coding == "gzip":
        return gzip.compress(data)
    if coding == "deflate":
        return zlib.compress(data)
    return data


# ---- the targets --------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
@FUZZ
@given(
    body=st.binary(max_size=3000) | images,
    content_type=st.sampled_from(CONTENT_TYPES),
    coding=st.sampled_from(["", "gzip", "deflate", "br", "gzip, gzip"]),
    honest=st.booleans(),
    headers=option_headers,
)
@example(
    body=gzip.compress(b"", mtime=0) * 100,
    content_type="application/json",
    coding="gzip",
    honest=False,
    headers={},
)
def test_any_bytes(handlers, task, body, content_type, coding, honest, headers):
    """Any body, any content type, compressed as declared (honest) or not."""
    if coding and honest:
        body = compressed(body, coding)
    all_headers: dict[str, Any] = {"body": {"content-type": content_type}, **headers}
    if coding:
        all_headers["Content-Encoding"] = coding
    answered_in_protocol(handlers[task], {"body": body}, all_headers)


@pytest.mark.parametrize("task", TASKS)
@FUZZ
@given(
    payload=v1_bodies | v2_bodies | own_bodies,
    parsed=st.booleans(),
    coding=st.sampled_from(["", "gzip"]),
    headers=option_headers,
)
@example(
    payload={"inputs": [{"name": "x", "shape": [10**3000, 10**3000], "data": ["x"]}]},
    parsed=True,
    coding="",
    headers={},
)
def test_json_and_kserve_bodies(handlers, task, payload, parsed, coding, headers):
    """JSON of any structure, the KServe v1/v2 shapes among it, raw or parsed by TorchServe."""
    headers = {"body": {"content-type": "application/json"}, **headers}
    if parsed and not coding:
        row = {"body": payload}
    else:
        row = {"body": compressed(json.dumps(payload).encode(), coding)}
        if coding:
            headers["Content-Encoding"] = coding
    answered_in_protocol(handlers[task], row, headers)


@FUZZ
@given(image=images, form=st.sampled_from(["raw", "base64", "json", "v1", "v2"]))
def test_image_files(handlers, image, form):
    """Broken, cut and repeated image files of every format, in every request form."""
    encoded = base64.b64encode(image).decode()
    bodies = {
        "raw": image,
        "base64": encoded.encode(),
        "json": json.dumps({"data": encoded}).encode(),
        "v1": json.dumps({"instances": [{"b64": encoded}]}).encode(),
        "v2": json.dumps(
            {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [encoded]}]}
        ).encode(),
    }
    content_type = "application/octet-stream" if form in ("raw", "base64") else "application/json"
    answered_in_protocol(
        handlers["vision"], {"body": bodies[form]}, {"body": {"content-type": content_type}}
    )


@pytest.mark.parametrize("task", TASKS)
@FUZZ
@given(
    fields=st.dictionaries(
        st.text(max_size=10), st.binary(max_size=60) | st.text(max_size=60) | images, max_size=8
    ),
    content_type=st.sampled_from(["application/x-www-form-urlencoded", "multipart/form-data"]),
)
def test_form_fields(handlers, task, fields, content_type):
    """Form and multipart bodies, as TorchServe hands them over: one parameter per field."""
    answered_in_protocol(handlers[task], fields, {"body": {"content-type": content_type}})
