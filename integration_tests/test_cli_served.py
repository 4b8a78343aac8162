"""The ``ts-handlers`` command against real TorchServe, run as a user runs it: a subprocess.

``predict`` starts its own server on mnist.mar and prints the digit, and on sentiment_eager.mar
draws an explanation as HTML; ``serve`` prints where the server listens and where its key is,
answers requests made with that key, and stops on Ctrl-C.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from serving import MODEL_STORE, ROOT, png_bytes, require

COMMAND = str(Path(sys.executable).parent / "ts-handlers")
START_TIMEOUT = 240  # seconds; TorchServe's JVM and one worker on a busy 2-core machine
STOP_TIMEOUT = 30

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A real handwritten digit from scikit-learn, as the demo model was trained on them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    index = 3  # a 3, fixed so the run repeats
    # Ink bright on dark, 0..255: scripts/train_digits.py's digit_images().
    image = np.clip(digits.images[index] * 16.0, 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("digit") / "digit.png"
    path.write_bytes(png_bytes(image))
    return path, int(digits.target[index])


def test_predict_starts_a_server_and_prints_the_digit(digit_png: tuple[Path, int]) -> None:
    path, label = digit_png
    archive = require(MODEL_STORE / "mnist.mar")
    started = time.monotonic()
    result = subprocess.run(
        [COMMAND, "predict", str(archive), "--file", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT + STOP_TIMEOUT,
    )
    print(f"ts-handlers predict took {time.monotonic() - started:.1f}s:\n{result.stdout}")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0][0] == str(label)
    assert len(rows) == 3  # archiver_configs/mnist: top_k 3
    scores = [float(row[1]) for row in rows]
    assert scores == sorted(scores, reverse=True)


def test_predict_explain_html_draws_the_served_attributions(tmp_path: Path) -> None:
    archive = require(MODEL_STORE / "sentiment_eager.mar")
    page = tmp_path / "out.html"
    text = "I loved this film, a <wonderful> cast"
    started = time.monotonic()
    result = subprocess.run(
        [COMMAND, "predict", str(archive), "--text", text, "--explain", "--html", str(page)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT + STOP_TIMEOUT,
    )
    print(f"ts-handlers predict --explain took {time.monotonic() - started:.1f}s:\n{result.stdout}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    label, score = lines[0].split()
    assert label == "positive" and 0.5 < float(score) <= 1.0
    assert lines[-1] == f"wrote {page}"
    html = page.read_text(encoding="utf-8")
    tokens = [row.split()[0] for row in lines[1:-1]]
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "loved" in tokens
    # One coloured span per token, the text escaped, nothing fetched from elsewhere.
    assert html.count('<span class="token') == len(tokens)
    assert f"predicted <strong>{label}</strong>" in html
    assert "&lt;" in html and "<wonderful>" not in html
    assert "http" not in html and "<script" not in html


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def test_serve_prints_urls_and_key_answers_and_stops_on_ctrl_c(
    digit_png: tuple[Path, int],
) -> None:
    path, label = digit_png
    require(MODEL_STORE / "mnist.mar")
    process = subprocess.Popen(
        [COMMAND, "serve", "mnist.mar", "--model-store", str(MODEL_STORE)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True).start()
    printed: dict[str, str] = {}
    output: list[str] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "serving" not in printed:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "ts-handlers serve exited:\n" + "\n".join(output)
            output.append(line)
            key, _, value = line.partition(":")
            if line.startswith("serving"):
                printed["serving"] = line
            elif value.strip():
                printed[key.strip()] = value.strip()
        for name in ("inference", "management", "metrics", "key file"):
            assert name in printed, output
        assert printed["inference"].startswith("http://127.0.0.1:")
        key_file = Path(printed["key file"])
        key = json.loads(key_file.read_text())["inference"]["key"]

        url = f"{printed['inference']}/predictions/mnist"
        refused = requests.post(url, data=path.read_bytes(), timeout=60)
        # Token authorization is on: TorchServe 0.12 answers 400 without a token
        # (docs/security.md), before any handler runs.
        assert refused.status_code == 400 and "token" in refused.text.lower(), refused.text
        answer = requests.post(
            url,
            data=path.read_bytes(),
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()[0]["label"] == str(label)

        process.send_signal(signal.SIGINT)
        stopping = time.monotonic()
        assert process.wait(timeout=STOP_TIMEOUT) == 0
        print(f"stopped {time.monotonic() - stopping:.1f}s after SIGINT")
        while (line := lines.get(timeout=5)) is not None:
            output.append(line)
        assert output[-1] == "stopped", output
        assert not key_file.exists()  # the server's private folder is gone
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{printed['inference']}/ping", timeout=5)
    finally:
        if process.poll() is None:
            process.kill()  # serve's own finally never ran: a bug this test reports
            process.wait()
