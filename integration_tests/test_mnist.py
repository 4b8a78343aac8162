"""mnist.mar, mnist_aoti.mar and mnist_onnx.mar on real TorchServe: held-out accuracy, request
forms, batching, and bad input."""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image
from serving import described, png_bytes

MIN_ACCURACY = 0.95


# The same digits model exported two ways: TorchScript and torch.export + AOTInductor.
@pytest.fixture(scope="module", params=["mnist", "mnist_aoti", "mnist_onnx"])
def model_name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def predict_url(torchserve, model_name) -> str:
    return f"{torchserve.inference_url}/predictions/{model_name}"


def post_all(inference, url, payloads, workers=8):
    """Sends payloads concurrently (bounded pool); returns the responses in order."""

    def send(payload):
        kwargs = {"json": payload} if isinstance(payload, dict) else {"data": payload}
        return inference.post(url, timeout=60, **kwargs)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(send, payloads))


def accuracy(responses, labels) -> float:
    assert all(response.status_code == 200 for response in responses), [
        response.text for response in responses if response.status_code != 200
    ][:3]
    predicted = [response.json()[0]["label"] for response in responses]
    return sum(p == str(label) for p, label in zip(predicted, labels, strict=True)) / len(labels)


def test_heldout_digits_as_png_bytes(inference, predict_url, heldout_digits):
    images, labels = heldout_digits
    responses = post_all(inference, predict_url, [png_bytes(image) for image in images])
    score = accuracy(responses, labels)
    print(f"served held-out accuracy (PNG bytes): {score:.4f} over {len(labels)} digits")
    assert score >= MIN_ACCURACY
    first = responses[0].json()
    assert len(first) == 3  # top_k from setup_config.json
    assert [item["score"] for item in first] == sorted((i["score"] for i in first), reverse=True)


def test_heldout_digits_as_base64_and_json(inference, predict_url, heldout_digits):
    images, labels = heldout_digits[0][:120], heldout_digits[1][:120]
    encoded = [base64.b64encode(png_bytes(image)) for image in images]
    as_base64 = post_all(inference, predict_url, encoded)
    as_json = post_all(inference, predict_url, [{"data": e.decode(), "top_k": 1} for e in encoded])
    assert accuracy(as_base64, labels) >= MIN_ACCURACY
    assert accuracy(as_json, labels) >= MIN_ACCURACY
    assert all(len(response.json()) == 1 for response in as_json)


def test_larger_colour_photos_are_resized(inference, predict_url, heldout_digits):
    images, labels = heldout_digits
    payloads = []
    for image in images[:60]:
        big = Image.fromarray(image, mode="L").resize((96, 96), Image.Resampling.NEAREST)
        payloads.append(png_bytes(big.convert("RGB")))
    assert accuracy(post_all(inference, predict_url, payloads), labels[:60]) >= 0.9


def test_concurrent_requests_are_batched(
    torchserve, inference, model_name, predict_url, heldout_digits
):
    described = torchserve.client().describe(model_name)
    assert described["batchSize"] > 1
    payloads = [png_bytes(image) for image in heldout_digits[0][:32]]
    responses = post_all(inference, predict_url, payloads, workers=16)
    batch_sizes = [int(response.headers["X-Batch-Size"]) for response in responses]
    print(f"batch sizes seen by the handler: {sorted(batch_sizes)}")
    assert max(batch_sizes) > 1
    assert max(batch_sizes) <= described["batchSize"]


def huge_png() -> bytes:
    return png_bytes(Image.new("L", (10_000, 10_000)))


BAD_INPUTS = {
    "not an image": (b"GET / HTTP/1.1 this is certainly not an image", {}, 415),
    "empty body": (b"", {}, 400),
    "truncated png": (None, {}, 400),
    "10000x10000 image": ("huge", {}, 413),
    "wrong json": (b'{"image_b64": 12}', {"Content-Type": "application/json"}, 400),
    "broken json": (b'{"data": "iVBOR', {"Content-Type": "application/json"}, 400),
    "bad top_k": (b'{"data": "aGVsbG8=", "top_k": -1}', {"Content-Type": "application/json"}, 400),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_4xx_and_the_worker_keeps_serving(
    torchserve, inference, model_name, predict_url, heldout_digits, case
):
    body, headers, status = BAD_INPUTS[case]
    good = png_bytes(heldout_digits[0][0])
    if body is None:
        body = good[: len(good) // 2]
    elif body == "huge":
        body = huge_png()
    pid_before = torchserve.client().describe(model_name)["workers"][0]["pid"]
    response = inference.post(predict_url, data=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["code"] == status and error["message"]
    follow_up = inference.post(predict_url, data=good, timeout=60)
    assert follow_up.status_code == 200
    assert follow_up.json()[0]["label"] == str(heldout_digits[1][0])
    assert torchserve.client().describe(model_name)["workers"][0]["pid"] == pid_before


def test_bad_requests_in_a_batch_do_not_fail_their_neighbours(
    inference, predict_url, heldout_digits
):
    images, labels = heldout_digits
    payloads = []
    for index in range(24):
        payloads.append(b"junk" if index % 3 == 1 else png_bytes(images[index]))
    responses = post_all(inference, predict_url, payloads, workers=12)
    for index, response in enumerate(responses):
        if index % 3 == 1:
            assert response.status_code == 415
        else:
            assert response.status_code == 200, response.text
    assert max(int(r.headers["X-Batch-Size"]) for r in responses) > 1


def test_requests_without_the_token_are_refused(torchserve, predict_url, heldout_digits):
    import requests

    response = requests.post(predict_url, data=png_bytes(heldout_digits[0][0]), timeout=30)
    assert response.status_code in (400, 401, 403)


def test_describe_shows_the_served_config_and_verification(torchserve):
    metadata = described(torchserve, "mnist")
    assert metadata["config"]["mode"] == "image_classification"
    assert metadata["export"]["verification"]["dynamic_shapes"]["passed"] is True


def test_torchserve_records_handler_and_prediction_time(
    torchserve, inference, model_name, predict_url, heldout_digits
):
    """Our handlers do not inherit BaseHandler, yet TorchServe's per-model timings are there:
    on /metrics, in Prometheus format (metrics_mode=prometheus, ts_handlers/metrics.yaml)."""
    images, _ = heldout_digits
    assert inference.post(predict_url, data=png_bytes(images[0])).status_code == 200
    label = f'ModelName="{model_name}"'
    deadline = time.monotonic() + 20
    lines: list[str] = []
    while time.monotonic() < deadline:
        text = requests.get(f"{torchserve.metrics_url}/metrics", timeout=10).text
        lines = [line for line in text.splitlines() if label in line]
        if any(line.startswith("HandlerTime{") for line in lines) and any(
            line.startswith("PredictionTime{") for line in lines
        ):
            break
        time.sleep(0.5)
    assert any(line.startswith("HandlerTime{") for line in lines), lines
    assert any(line.startswith("PredictionTime{") for line in lines), lines
