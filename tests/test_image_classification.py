"""ImageClassificationHandler on a tiny exported model, driven through a real ts.context.Context."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from harness import body_headers, make_context, run_batch, unpack_archive
from PIL import Image

from ts_handlers.image_classification import (
    ImageClassificationConfig,
    ImageClassificationHandler,
    image_to_tensor,
)


def encode(image: Image.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    return buffer.getvalue()


def digit_like(size: int = 8, mode: str = "L") -> Image.Image:
    rng = np.random.default_rng(size)
    return Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), mode="L").convert(
        mode
    )


PNG = encode(digit_like())


def assert_prediction(body, top_k: int = 2) -> None:
    assert isinstance(body, list) and len(body) == top_k
    assert all(set(item) == {"label", "score"} for item in body)
    scores = [item["score"] for item in body]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= score <= 1.0 for score in scores)
    assert {item["label"] for item in body} <= {"zero", "one", "two", "three"}


def test_every_request_form_gives_the_same_answer(batch):
    b64 = base64.b64encode(PNG)
    results = batch(
        [
            ({"body": bytearray(PNG)}, body_headers("image/png")),
            ({"body": b64}, body_headers("")),
            ({"body": b64.decode()}, body_headers("text/plain")),
            ({"body": {"data": b64.decode()}}, body_headers("application/json")),
            ({"body": json.dumps({"data": b64.decode()}).encode()}, body_headers("")),
            ({"data": bytearray(PNG)}, {"data": {"content-type": "image/png"}}),
        ]
    )
    assert [status for status, _, _ in results] == [200] * 6
    first = results[0][1]
    assert_prediction(first)
    for _, body, headers in results[1:]:
        assert [item["label"] for item in body] == [item["label"] for item in first]
        assert [item["score"] for item in body] == pytest.approx(
            [i["score"] for i in first], abs=1e-6
        )
        assert headers["X-Batch-Size"] == "6"


def test_any_size_and_mode_is_converted(batch):
    images = [
        encode(digit_like(64, "RGB"), "JPEG"),
        encode(digit_like(5, "RGBA")),
        encode(digit_like(300, "L"), "BMP"),
        encode(digit_like(20, "P"), "GIF"),
        encode(digit_like(33, "I;16")),
    ]
    results = batch([({"body": image}, body_headers("")) for image in images])
    for status, body, _ in results:
        assert status == 200, body
        assert_prediction(body)


def test_top_k_from_json_form_field_or_header(batch):
    b64 = base64.b64encode(PNG).decode()
    results = batch(
        [
            ({"body": {"data": b64, "top_k": 1}}, body_headers("application/json")),
            ({"data": PNG, "top_k": bytearray(b"3")}, {"data": {"content-type": "image/png"}}),
            ({"body": PNG}, body_headers("", **{"X-Top-K": "4"})),
            ({"body": {"data": b64, "top_k": 99}}, body_headers("application/json")),
        ]
    )
    assert [len(body) for _, body, _ in results] == [1, 3, 4, 4]


@pytest.mark.parametrize(
    ("row", "status", "fragment"),
    [
        ({"body": b""}, 400, "empty"),
        ({"body": bytearray(b"this is not an image at all!")}, 415, "not an image"),
        ({"body": PNG[: len(PNG) // 2]}, 400, "truncated"),
        ({"body": {"data": 5}}, 400, "base64"),
        ({"body": {"data": "!!!not-base64!!!"}}, 400, "base64"),
        ({"body": [1, 2, 3]}, 400, "one image per request"),
        ({"body": b'{"data": "abc'}, 400, "not valid JSON"),
        ({"body": {"data": base64.b64encode(PNG).decode(), "top_k": "many"}}, 400, "top_k"),
        ({"body": {"data": base64.b64encode(PNG).decode(), "top_k": 0}}, 400, "top_k"),
    ],
)
def test_bad_input_gets_a_4xx_json_body(batch, row, status, fragment):
    content_type = "application/json" if isinstance(row["body"], dict | list) else ""
    [(code, body, _)] = batch([(row, body_headers(content_type))])
    assert code == status
    assert body["code"] == status
    assert fragment in body["message"]
    assert body["type"] in {"InvalidInput", "UnsupportedMediaType", "PayloadTooLarge"}


def test_oversized_image_is_413_before_decoding(batch):
    huge = encode(Image.new("L", (1200, 1000)))  # 1.2 MP > the fixture's 1 MP limit
    [(code, body, _)] = batch([({"body": huge}, body_headers("image/png"))])
    assert code == 413
    assert "1200x1000" in body["message"]
    assert Image.MAX_IMAGE_PIXELS is not None, "Pillow's decompression-bomb guard stays on"


def test_bad_request_does_not_fail_its_neighbours(batch, vision_handler):
    good = ({"body": PNG}, body_headers("image/png"))
    results = batch(
        [good, ({"body": b"junk"}, body_headers("")), good, ({"body": b""}, body_headers(""))]
    )
    assert [status for status, _, _ in results] == [200, 415, 200, 400]
    assert [item["label"] for item in results[0][1]] == [item["label"] for item in results[2][1]]
    assert results[0][2]["X-Batch-Size"] == "2"


def test_forward_failure_is_isolated_to_the_failing_request(batch, vision_handler, monkeypatch):
    original = vision_handler.forward

    def forward_that_fails_on_bright_images(inputs):
        if any(float(tensor.mean()) > 2.5 for tensor in inputs):
            raise RuntimeError("simulated kernel failure")
        return original(inputs)

    monkeypatch.setattr(vision_handler, "forward", forward_that_fails_on_bright_images)
    bright = encode(Image.new("L", (8, 8), color=255))
    results = batch([({"body": PNG}, body_headers("")), ({"body": bright}, body_headers(""))])
    assert results[0][0] == 200
    assert results[1][0] == 500
    assert results[1][1]["type"] == "InternalServerError"


def test_explanations_are_refused_with_a_4xx(batch):
    [(code, body, _)] = batch([({"body": PNG}, body_headers("", explain="True"))])
    assert code == 400
    assert "explanations" in body["message"]
    # No explanation budget: nothing is deferred with 429, batch after batch.
    for _ in range(2):
        mixed = batch([({"body": PNG}, body_headers("", explain="True")), ({"body": PNG}, {})])
        assert [code for code, _, _ in mixed] == [400, 200]


def test_preprocessing_matches_the_configured_normalisation():
    config = ImageClassificationConfig(image_size=(4, 6))
    tensor = image_to_tensor(Image.new("L", (10, 10), color=255), config)
    assert tensor.shape == (1, 4, 6)
    expected = (1.0 - 0.1307) / 0.3081
    assert float(tensor.min()) == pytest.approx(expected, rel=1e-5)
    rgb = ImageClassificationConfig(color_mode="RGB", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert image_to_tensor(Image.new("L", (3, 3)), rgb).shape == (3, 28, 28)


def test_handler_reads_labels_and_export_metadata(vision_handler):
    assert vision_handler.labels == ["zero", "one", "two", "three"]
    verification = vision_handler.export_metadata["verification"]["dynamic_shapes"]
    assert verification["passed"] is True
    assert len(verification["cases"]) >= 3


def test_bad_setup_config_fails_at_load_naming_the_key(tiny_vision_archive, tmp_path):
    manifest = unpack_archive(tiny_vision_archive, tmp_path)
    config_path = tmp_path / "setup_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "colour_mode": "RGB"}))
    with pytest.raises(ValueError, match="unknown key.*colour_mode.*valid keys are.*color_mode"):
        ImageClassificationHandler().initialize(make_context(tmp_path, manifest))


def test_describe_reports_config_and_verification(batch):
    # What TorchServe's management describe sends: one request, no body, describe=True.
    [(code, body, _)] = batch([({}, {"describe": "True"})])
    assert code == 200
    assert body["handler"] == "ImageClassificationHandler"
    assert body["config"]["image_size"] == [16, 16]
    assert body["export"]["verification"]["dynamic_shapes"]["passed"] is True


class MetricsRecorder:
    """Stands in for TorchServe's metrics cache: records add_time calls."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float, str]] = []

    def add_time(self, name: str, value: float, idx: Any = None, unit: str = "ms") -> None:
        self.times.append((name, value, unit))


def test_handler_time_is_recorded_as_torchserve_records_it(vision_handler):
    recorder = MetricsRecorder()
    context = vision_handler.context
    context.metrics = recorder
    try:
        run_batch(vision_handler, [({"body": bytearray(PNG)}, body_headers("image/png"))])
    finally:
        context.metrics = None
    [(name, value, unit)] = recorder.times
    assert name == "HandlerTime" and unit == "ms" and value > 0


def test_importing_a_task_has_no_side_effects():
    """No BaseHandler: no optional-backend messages, TF32 untouched, no transformers."""
    probe = (
        "import sys, torch\n"
        "before = torch.backends.cuda.matmul.allow_tf32\n"
        "import ts_handlers.image_classification\n"
        "assert torch.backends.cuda.matmul.allow_tf32 == before\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('transformers', 'captum', 'sentence_transformers') or m == 'ts.torch_handler']\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
