"""No request costs more than its bytes: every count inside a body is checked before the work.

Each class of body the fixes cover (issue 17), sent beside a good request in one batch through
a real ``ts.context.Context``: the bad one gets its 4xx with a JSON body, the good one its
answer. Where a check must come before some work, the test also shows that the work did not
run (base64 never called, Pillow never opening the file, no frame past the first decoded).
The same bodies at full size go to a real TorchServe in integration_tests/test_hostile_bodies.py.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import random
import re
import struct
import zlib
from typing import Any

import pytest
from harness import body_headers, run_batch
from PIL import Image

from ts_handlers import image_bytes, protocols
from ts_handlers.errors import InvalidInput, PayloadTooLarge, RequestError
from ts_handlers.image_classification import IMAGE_FORMATS, PILLOW_ERRORS, open_image
from ts_handlers.payload import MAX_FORM_FIELDS, MAX_GZIP_MEMBERS, inflate

JSON = body_headers("application/json")
GOOD_TEXT = ({"body": b"the movie was great"}, body_headers("text/plain"))


def png_bytes(size: tuple[int, int] = (8, 8), mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 200).save(buffer, "PNG")
    return buffer.getvalue()


GOOD_IMAGE = ({"body": png_bytes()}, body_headers("image/png"))


def raw(payload: bytes | str, **headers: str) -> tuple[dict[str, Any], dict[str, Any]]:
    body = payload.encode() if isinstance(payload, str) else payload
    return {"body": body}, {**JSON, **headers}


def assert_refused(result: tuple[int, Any, dict[str, str]], status: int, words: str) -> None:
    code, body, _ = result
    assert code == status, body
    message = body.get("error", body.get("message", ""))
    assert words in message, message
    assert len(json.dumps(body)) < 1200  # a few problems, never one per bad element


@pytest.fixture
def classifier(text_handlers):
    return text_handlers["torchscript"]


# ---- Content-Encoding ---------------------------------------------------------------------


def test_many_gzip_members_are_refused_after_the_limit():
    body = gzip.compress(b"", mtime=0) * 300_000  # 6 MB: was 30-39 s, quadratic
    with pytest.raises(PayloadTooLarge, match=f"more than {MAX_GZIP_MEMBERS} members"):
        inflate(body, "gzip")
    members = [gzip.compress(f"part {index};".encode()) for index in range(MAX_GZIP_MEMBERS)]
    assert inflate(b"".join(members), "gzip") == b"".join(
        f"part {index};".encode() for index in range(MAX_GZIP_MEMBERS)
    )


def test_members_and_streams_across_slices_inflate_exactly():
    big = random.Random(0).randbytes(300_000)  # incompressible: spans several input slices
    noisy = zlib.compress(big, 1)
    assert len(noisy) > 2 * 64 * 1024
    two = gzip.compress(big) + gzip.compress(b"tail")
    assert inflate(two, "gzip") == big + b"tail"
    assert inflate(noisy, "deflate") == big
    raw_deflate = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = raw_deflate.compress(big) + raw_deflate.flush()
    assert inflate(stream, "deflate") == big
    with pytest.raises(InvalidInput, match="trailing data"):
        inflate(noisy + b"x", "deflate")
    with pytest.raises(InvalidInput, match="truncated"):
        inflate(two[: len(two) // 2], "gzip")
    with pytest.raises(PayloadTooLarge, match="more than 1000 bytes"):
        inflate(two, "gzip", limit=1000)


def test_a_gzip_body_of_many_members_is_a_413_beside_a_good_request(classifier):
    body = gzip.compress(b"", mtime=0) * 100_000
    results = run_batch(classifier, [raw(body, **{"Content-Encoding": "gzip"}), GOOD_TEXT])
    assert_refused(results[0], 413, "members")
    assert results[1][0] == 200


# ---- form bodies --------------------------------------------------------------------------


def test_a_form_of_many_fields_is_refused_before_any_field_is_read(classifier):
    class Row(dict):
        def items(self):  # reading the fields one by one is the work that must not start
            raise AssertionError("the fields were read")

    fields = Row({f"x{index}": b"" for index in range(200_000)})
    headers = body_headers("application/x-www-form-urlencoded")
    results = run_batch(classifier, [(fields, headers), GOOD_TEXT])
    assert_refused(results[0], 413, f"the limit is {MAX_FORM_FIELDS}")
    assert results[1][0] == 200
    few = {"data": b"the film", **{f"o{index}": b"" for index in range(MAX_FORM_FIELDS - 1)}}
    assert run_batch(classifier, [(few, headers)])[0][0] == 200


# ---- KServe v2: every count before validation ---------------------------------------------


def v2_body(shape: str, data: str = '["x"]', extra: str = "") -> bytes:
    tensor = f'{{"name":"x","shape":{shape},"datatype":"BYTES","data":{data}{extra}}}'
    return f'{{"inputs":[{tensor}]}}'.encode()


V2_CASES = {
    "2,000,000 input objects": (
        b'{"inputs":[' + b",".join([b"{}"] * 2_000_000) + b"]}",
        400,
        "inputs has 2000000 tensors; at most 16",
    ),
    "a shape of 1,500,000 strings": (
        v2_body("[" + ",".join(['"a"'] * 1_500_000) + "]"),
        400,
        "shape has 1500000 dimensions; at most 8",
    ),
    "two 3,000-digit dimensions": (
        v2_body("[" + ",".join(["9" * 3000] * 2) + "]"),
        400,
        "longer than 64 characters",
    ),
    "1,500 4,299-digit dimensions": (
        v2_body("[" + ",".join(["9" * 4299] * 1500) + "]"),
        400,
        "longer than 64 characters",
    ),
    "a dimension past 2**31-1": (v2_body("[2147483648]"), 400, "shape[0] is 2147483648"),
    "a negative dimension": (v2_body("[-1]"), 400, "shape[0] is -1"),
    "more elements declared than the limit": (
        v2_body("[16, 17]"),
        413,
        "272 texts in one request; the limit is 256",
    ),
    "data longer than its shape": (
        v2_body("[2]", "[" + ",".join(['"a"'] * 1_000_000) + "]"),
        400,
        "holds 2 elements but inputs[0].data has more",
    ),
    "data nesting more lists than its shape": (
        v2_body("[2]", "[" + ",".join(["[]"] * 100_000) + "]"),
        400,
        "nests more lists",
    ),
    "100,000 unknown fields": (
        v2_body("[1]", extra="".join(f',"f{index}":0' for index in range(100_000))),
        400,
        "unknown fields inputs[0].f0, inputs[0].f1, inputs[0].f2, inputs[0].f3, inputs[0].f4 "
        "and 99995 more",
    ),
    "100,000 unknown top-level fields": (
        b'{"inputs":[{}]' + b"".join(b',"g%d":0' % index for index in range(100_000)) + b"}",
        400,
        "and 99995 more",
    ),
    "1,000,000 requested outputs": (
        b'{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":["x"]}],"outputs":['
        + b",".join([b"{}"] * 1_000_000)
        + b"]}",
        400,
        "outputs has 1000000 entries",
    ),
    "100,000 parameters": (
        b'{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":["x"]}],"parameters":{'
        + b",".join(b'"p%d":0' % index for index in range(100_000))
        + b"}}",
        400,
        "parameters has 100000 entries",
    ),
    "16 invalid tensors": (
        b'{"inputs":[' + b",".join([b'{"a":1}'] * 16) + b"]}",
        400,
        "unknown field inputs[0].a",
    ),
}


@pytest.mark.parametrize("decode", [False, True], ids=["raw bytes", "torchserve decodes"])
@pytest.mark.parametrize("case", V2_CASES)
def test_a_v2_body_is_bounded_before_validation(classifier, case, decode):
    body, status, words = V2_CASES[case]
    row: dict[str, Any] = {"body": body}
    if decode:  # TorchServe's default worker json.loads it first (every case is valid JSON)
        row = {"body": json.loads(body)}
    results = run_batch(classifier, [(row, JSON), GOOD_TEXT])
    assert_refused(results[0], status, words)
    assert set(results[0][1]) == {"error"}  # KServe's error body, even when refused while parsing
    assert results[1][0] == 200


REFUSED_WHILE_PARSING = {
    "v1, a 70-digit number": (b'{"instances": [' + b"9" * 70 + b"]}", "longer than 64"),
    "v1, a long float": (b'{"instances": ["a"], "x": 0.' + b"1" * 80 + b"}", "longer than 64"),
    "v1, NaN": (b'{"instances": [NaN]}', "NaN and Infinity"),
    "v2, a repeated key": (v2_body("[1]", extra=',"name":"y"'), "repeats the key"),
    "v2, a 3,000-digit dimension": (v2_body("[" + "9" * 3000 + "]"), "longer than 64"),
}


@pytest.mark.parametrize("case", REFUSED_WHILE_PARSING)
def test_a_kserve_body_refused_while_parsing_gets_the_kserve_error_body(classifier, case):
    body, words = REFUSED_WHILE_PARSING[case]
    plain = b'{"inputs": ["a"], "top_k": ' + b"9" * 70 + b"}"  # the task's own form: plain body
    results = run_batch(classifier, [raw(body), raw(plain), GOOD_TEXT])
    assert_refused(results[0], 400, words)
    assert set(results[0][1]) == {"error"}, results[0][1]
    assert_refused(results[1], 400, "longer than 64")
    assert set(results[1][1]) == {"code", "type", "message"}
    assert results[2][0] == 200


def test_validation_errors_are_the_first_few_and_a_count(classifier):
    tensors = ",".join(['{"name":1,"shape":["a"],"datatype":"TEXT","data":7}'] * 16)
    results = run_batch(classifier, [raw(f'{{"inputs":[{tensors}]}}')])
    message = results[0][1]["error"]
    assert_refused(results[0], 400, "; and ")
    listed = int(re.search(r"; and (\d+) more\.", message).group(1))
    assert listed == 16 * 4 - protocols.MAX_LISTED_ERRORS


# ---- KServe v1: counted before base64 -----------------------------------------------------


def test_v1_instances_are_counted_before_any_is_decoded(vision_handler, monkeypatch):
    calls = []
    original = protocols.decode_base64
    monkeypatch.setattr(
        protocols, "decode_base64", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    body = b'{"instances":[' + b",".join([b'{"b64":"AA=="}'] * 430_000) + b"]}"
    results = run_batch(vision_handler, [raw(body), GOOD_IMAGE])
    assert_refused(results[0], 413, "430000 images in one request; the limit is 4")
    assert results[1][0] == 200
    assert calls == []


# ---- images -------------------------------------------------------------------------------


def ico_around(side: int) -> bytes:
    inner = png_bytes((side, side))
    directory = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(inner), 22)
    return struct.pack("<HHH", 0, 1, 1) + directory + inner


def encoded(image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (40, 80, 120)).save(buffer, image_format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "body",
    [ico_around(6000), encoded("ICO"), encoded("PPM"), encoded("TGA"), encoded("PCX")],
    ids=["ICO around a 6000x6000 PNG", "ICO", "PPM", "TGA", "PCX"],
)
def test_formats_the_docs_do_not_promise_are_415_before_decoding(batch, body, monkeypatch):
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    v1 = raw(json.dumps({"instances": [{"b64": base64.b64encode(body).decode()}] * 4}))
    results = batch([({"body": body}, body_headers("image/x-icon")), v1])
    assert_refused(results[0], 415, "PNG, JPEG, BMP, GIF, TIFF or WebP")
    assert_refused(results[1], 415, "instances[0]")


@pytest.mark.parametrize("image_format", IMAGE_FORMATS)
def test_every_promised_format_is_read(batch, image_format):
    body = encoded(image_format)
    assert batch([({"body": body}, body_headers("application/octet-stream"))])[0][0] == 200


def repeated_scans(count: int, size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (90, 120, 200)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    scan = data[data.rfind(b"\xff\xda") : -2]
    return data[:-2] + scan * count + b"\xff\xd9"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def many_png_chunks(count: int) -> bytes:
    data = png_bytes()
    return data[:33] + chunk(b"aaAa", b"") * count + data[33:]


def many_gif_blocks(count: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (8, 8)).save(buffer, "GIF")
    data = buffer.getvalue()
    head = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    return data[:head] + b"\x21\xfe\x01a\x00" * count + data[head:]


def many_jpeg_segments(count: int) -> bytes:
    data = encoded("JPEG")
    return data[:2] + b"\xff\xe5\x00\x02" * count + data[2:]


def many_tiff_strips(count: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (4, count)).save(buffer, "TIFF")
    data = buffer.getvalue()
    directory = int.from_bytes(data[4:8], "little")
    entries = int.from_bytes(data[directory : directory + 2], "little")
    patched = bytearray(data)
    for index in range(entries):  # StripOffsets, StripByteCounts: claim `count` strips
        entry = directory + 2 + index * 12
        if int.from_bytes(data[entry : entry + 2], "little") in (273, 279):
            patched[entry + 4 : entry + 8] = count.to_bytes(4, "little")
    return bytes(patched)


def many_tiff_entries(count: int) -> bytes:
    entries = b"".join(
        struct.pack("<HHII", 40000 + index % 20000, 4, 1, 0) for index in range(count)
    )
    return b"II*\x00" + struct.pack("<IH", 8, count) + entries + struct.pack("<I", 0)


STRUCTURES = {
    "a TIFF claiming 1,000,000 strips": (many_tiff_strips(1_000_000), "strips or tiles"),
    "a TIFF directory of 65,000 entries": (many_tiff_entries(65_000), "entries in its first"),
    "a progressive JPEG of 100,000 scans": (repeated_scans(100_000), "scans"),
    "500,000 PNG chunks": (many_png_chunks(500_000), "chunks"),
    "1,200,000 GIF blocks": (many_gif_blocks(1_200_000), "blocks before its first image"),
    "1,500,000 JPEG segments": (many_jpeg_segments(1_500_000), "segments"),
}


@pytest.mark.parametrize("case", STRUCTURES)
def test_image_structure_is_counted_before_pillow_reads_it(batch, case, monkeypatch):
    body, words = STRUCTURES[case]
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("opened"))
    results = batch([({"body": body}, body_headers("application/octet-stream"))])
    assert_refused(results[0], 413, words)


def test_ordinary_structures_pass_the_counts():
    assert image_bytes.jpeg_counts(repeated_scans(0))[1] == 10  # libjpeg's progressive script
    at_limit = repeated_scans(image_bytes.MAX_JPEG_SCANS - 10)
    assert image_bytes.check_structure(at_limit) == image_bytes.MAX_JPEG_SCANS
    with pytest.raises(PayloadTooLarge):
        image_bytes.check_structure(repeated_scans(image_bytes.MAX_JPEG_SCANS - 9))
    assert image_bytes.check_structure(many_png_chunks(image_bytes.MAX_SEGMENTS - 5)) == 0
    assert image_bytes.check_structure(many_gif_blocks(image_bytes.MAX_SEGMENTS // 3 - 2)) == 0
    buffer = io.BytesIO()
    Image.new("L", (64, image_bytes.MAX_TIFF_STRIPS)).save(buffer, "TIFF")
    assert image_bytes.tiff_counts(buffer.getvalue())[1] < image_bytes.MAX_TIFF_STRIPS
    assert image_bytes.check_structure(many_tiff_strips(image_bytes.MAX_TIFF_STRIPS)) == 0
    for broken in (
        b"\xff\xd8\xff",
        b"\x89PNG\r\n\x1a\n",
        b"GIF89a",
        b"\xff\xd8\xff\xda\x00",
        b"II*\x00",
    ):
        image_bytes.check_structure(broken)  # malformed: counting ends, Pillow decides


def test_progressive_work_is_bounded_by_scans_times_pixels():
    # 1000 x 1000 at max_pixels 1,000,000: 16 scan-passes of the whole image at most.
    ordinary = repeated_scans(0, 1000)
    assert open_image(ordinary, 1_000_000).size == (1000, 1000)  # 10 scans
    with pytest.raises(PayloadTooLarge, match="17 scans"):
        open_image(repeated_scans(7, 1000), 1_000_000)
    assert open_image(repeated_scans(50, 100), 1_000_000).size == (100, 100)


def test_frames_past_the_first_are_never_decoded(batch, monkeypatch):
    frames = [Image.new("RGB", (16, 16), (60 * index, 0, 0)) for index in range(3)]
    bodies = []
    for image_format in ("GIF", "TIFF", "WEBP", "PNG"):  # PNG: APNG
        buffer = io.BytesIO()
        frames[0].save(buffer, image_format, save_all=True, append_images=frames[1:])
        bodies.append(buffer.getvalue())
        assert Image.open(io.BytesIO(bodies[-1])).n_frames == 3
    original = Image.Image.seek

    def first_only(self: Image.Image, frame: int) -> None:
        assert frame == 0, f"frame {frame} of a {self.format} was sought"
        return original(self, frame)

    for plugin_class in {type(Image.open(io.BytesIO(body))) for body in bodies}:
        monkeypatch.setattr(plugin_class, "seek", first_only)
    for body in bodies:
        assert batch([({"body": body}, body_headers("application/octet-stream"))])[0][0] == 200


@pytest.mark.parametrize("error", PILLOW_ERRORS, ids=lambda error: error.__name__)
@pytest.mark.parametrize("stage", ["open", "load", "convert"])
def test_every_pillow_error_is_a_4xx(batch, monkeypatch, error, stage):
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error("hostile input")

    target = {"open": (Image, "open"), "load": (Image.Image, "load")}.get(
        stage, (Image.Image, "convert")
    )
    monkeypatch.setattr(*target, fail)
    results = batch([GOOD_IMAGE])
    code, body, _ = results[0]
    assert 400 <= code < 500, body
    assert set(body) == {"code", "type", "message"}


def test_a_decompression_bomb_is_a_413():
    with pytest.raises(RequestError) as raised:
        open_image(png_bytes((20_000, 20_000)), 10**9, 10**12)
    assert raised.value.status == 413


# ---- options ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["9" * 5000, "1" * 11, "4294967296"])
def test_a_long_count_in_a_header_or_field_is_refused_before_conversion(classifier, value):
    header = ({"body": b"the movie was great"}, body_headers("text/plain", **{"X-Top-K": value}))
    form = ({"data": b"the movie was great", "top_k": value.encode()}, body_headers())
    for result in run_batch(classifier, [header, form, GOOD_TEXT])[:2]:
        assert_refused(result, 400, "top_k")
