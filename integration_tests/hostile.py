"""Request bodies small on the wire whose parsing or decoding would cost far more than their size.

Each is under TorchServe's max_request_size (6,553,500 bytes). Shared by
``integration_tests/test_hostile_bodies.py`` (on the real server, every run) and
``benchmarks/hostile_bodies.py`` (the before/after table of docs/limits.md). Kept out of
conftest.py so both import it by a name no other folder uses.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

MAX_REQUEST_SIZE = 6_553_500


@dataclass(frozen=True)
class Hostile:
    """One request: where it goes, its body and headers, and the answers that are right."""

    name: str
    model: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    expected: tuple[int, ...] = (400, 413, 415)
    kserve: bool = False  # the answer is KServe's {"error": ...}


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def gzip_members(count: int = 300_000) -> bytes:
    """Concatenated empty gzip members (20 bytes each): inflating them one by one, each from a
    copy of the rest of the body, was quadratic."""
    return gzip.compress(b"", mtime=0) * count


def progressive_jpeg(scans: int = 100_000, size: int = 2048) -> bytes:
    """A flat progressive JPEG whose last scan repeats: libjpeg passes over the image per scan."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (90, 120, 200)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    scan = data[data.rfind(b"\xff\xda") : -2]
    scans = min(scans, (MAX_REQUEST_SIZE - len(data)) // len(scan))
    return data[:-2] + scan * scans + b"\xff\xd9"


def v2_many_inputs(count: int = 2_000_000) -> bytes:
    return b'{"inputs":[' + b",".join([b"{}"] * count) + b"]}"


def v2_long_shape(count: int = 1_500_000) -> bytes:
    shape = b",".join([b'"a"'] * count)
    return b'{"inputs":[{"name":"x","shape":[' + shape + b'],"datatype":"BYTES","data":["x"]}]}'


def v2_wide_dimensions(digits: int = 3000, count: int = 2) -> bytes:
    shape = b",".join([b"9" * digits] * count)
    return b'{"inputs":[{"name":"x","shape":[' + shape + b'],"datatype":"BYTES","data":["x"]}]}'


def ico_around_large_png(side: int = 11_000) -> bytes:
    """An ICO whose directory claims 16x16 around a side x side PNG."""
    inner = png(Image.new("L", (side, side)))
    directory = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(inner), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + directory + inner


def v1_images(images: list[bytes]) -> bytes:
    return _json({"instances": [{"b64": base64.b64encode(image).decode()} for image in images]})


def form_fields(count: int = 740_000) -> bytes:
    return b"&".join([b"x"] * count)


def form_distinct_fields(count: int = 600_000) -> bytes:
    return b"&".join(b"%d" % index for index in range(count))


MULTIPART_BOUNDARY = "b"


def multipart_parts(count: int = 100_000) -> bytes:
    """Empty parts of one multipart/form-data body: each becomes a parameter of its own."""
    part = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n\r\n'
    return part * count + b"--b--\r\n"


def v1_many_instances(count: int = 430_000) -> bytes:
    return b'{"instances":[' + b",".join([b'{"b64":"AA=="}'] * count) + b"]}"


def png_many_chunks(count: int = 500_000) -> bytes:
    data = png(Image.new("L", (8, 8)))
    return data[:33] + _chunk(b"aaAa", b"") * count + data[33:]


def gif_many_blocks(count: int = 1_200_000) -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (8, 8)).save(buffer, "GIF")
    data = buffer.getvalue()
    flags = data[10]
    head = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    return data[:head] + b"\x21\xfe\x01a\x00" * count + data[head:]


def jpeg_many_segments(count: int = 1_500_000) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    return data[:2] + b"\xff\xe5\x00\x02" * count + data[2:]


def tiff_many_strips(count: int = 1_000_000, width: int = 16) -> bytes:
    """A TIFF of ``count`` one-row strips, every strip at the same offset (SHORT arrays)."""

    def entry(tag: int, kind: int, number: int, value: int) -> bytes:
        return struct.pack("<HHII", tag, kind, number, value)

    arrays = 8 + 2 + 9 * 12 + 4
    offsets = struct.pack(f"<{count}H", *([8] * count))
    counts = struct.pack(f"<{count}H", *([width] * count))
    entries = [
        entry(256, 4, 1, width),
        entry(257, 4, 1, count),
        entry(258, 3, 1, 8),
        entry(259, 3, 1, 1),
        entry(262, 3, 1, 1),
        entry(273, 3, count, arrays),
        entry(277, 3, 1, 1),
        entry(278, 4, 1, 1),
        entry(279, 3, count, arrays + len(offsets)),
    ]
    directory = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + directory + offsets + counts


JSON = {"Content-Type": "application/json"}


def cases() -> list[Hostile]:
    """Every class of the issue, and the image structures found while fixing it."""
    v2 = (400, 413)
    return [
        Hostile(
            "gzip: 300,000 empty members",
            "sentiment",
            gzip_members(),
            {**JSON, "Content-Encoding": "gzip"},
            (400, 413),
        ),
        Hostile(
            "progressive JPEG: repeated scans",
            "mnist",
            progressive_jpeg(),
            {"Content-Type": "image/jpeg"},
            (413,),
        ),
        Hostile(
            "v2: 2,000,000 empty input objects",
            "sentiment",
            v2_many_inputs(),
            JSON,
            v2,
            kserve=True,
        ),
        Hostile(
            "v2: shape of 1,500,000 strings", "sentiment", v2_long_shape(), JSON, v2, kserve=True
        ),
        # Refused while the JSON is parsed, and still answered in KServe's error body.
        Hostile(
            "v2: shape of two 3,000-digit integers",
            "sentiment",
            v2_wide_dimensions(),
            JSON,
            v2,
            kserve=True,
        ),
        Hostile(
            "v2: shape of 1,500 4,299-digit integers",
            "sentiment",
            v2_wide_dimensions(4299, 1500),
            JSON,
            v2,
            kserve=True,
        ),
        Hostile(
            "ICO: 16x16 claimed around an 11000x11000 PNG",
            "mnist",
            ico_around_large_png(),
            {"Content-Type": "image/x-icon"},
            (413, 415),
        ),
        Hostile(
            "KServe v1: four such ICOs",
            "mnist",
            v1_images([ico_around_large_png()] * 4),
            JSON,
            (413, 415),
            kserve=True,
        ),
        Hostile(
            "form: 740,000 empty fields",
            "sentiment",
            form_fields(),
            {"Content-Type": "application/x-www-form-urlencoded"},
            (413,),
        ),
        Hostile(
            "form: 3,270,000 empty fields, at max_request_size",
            "sentiment",
            form_fields(MAX_REQUEST_SIZE // 2 - 6_750),
            {"Content-Type": "application/x-www-form-urlencoded"},
            (413,),
        ),
        Hostile(
            "form: 600,000 distinct fields",
            "sentiment",
            form_distinct_fields(),
            {"Content-Type": "application/x-www-form-urlencoded"},
            (413,),
        ),
        Hostile(
            "multipart: 100,000 empty parts",
            "sentiment",
            multipart_parts(),
            {"Content-Type": f"multipart/form-data; boundary={MULTIPART_BOUNDARY}"},
            (413,),
        ),
        Hostile(
            "KServe v1: 430,000 base64 instances",
            "mnist",
            v1_many_instances(),
            JSON,
            (413,),
            kserve=True,
        ),
        Hostile(
            "PNG: 500,000 empty chunks",
            "mnist",
            png_many_chunks(),
            {"Content-Type": "image/png"},
            (413,),
        ),
        Hostile(
            "GIF: 1,200,000 comment blocks",
            "mnist",
            gif_many_blocks(),
            {"Content-Type": "image/gif"},
            (413,),
        ),
        Hostile(
            "JPEG: 1,500,000 APP segments",
            "mnist",
            jpeg_many_segments(),
            {"Content-Type": "image/jpeg"},
            (413,),
        ),
        Hostile(
            "TIFF: 1,000,000 one-row strips",
            "mnist",
            tiff_many_strips(),
            {"Content-Type": "image/tiff"},
            (413,),
        ),
    ]


GOOD = {
    "sentiment": ({"Content-Type": "text/plain"}, b"I loved this film"),
    "mnist": ({"Content-Type": "image/png"}, png(Image.new("L", (28, 28)))),
}
