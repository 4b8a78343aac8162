"""Bodies small on the wire that cost far more to parse or decode, on real TorchServe.

Each body of ``hostile.py`` (every class of issue 17, each under max_request_size) goes to the
server together with a good request to the same model, so the two can share a batch. A server
of this module's own serves the two models (mnist, sentiment), so their workers' memory moves
with these requests alone. The bound, for each: an answer (4xx with the JSON body of its
protocol) within ``ANSWER_BOUND_S``, the worker's peak resident memory (sampled every 10 ms)
less than ``MAX_RSS_GROWTH_MB`` above where it started, the good neighbour answered 200, and the
same worker afterwards. Form bodies have a test of their own: hundreds of thousands of fields,
with good requests sent all the while, are refused with 413 within ``ANSWER_BOUND_S`` of the
worker's time (read from the frontend's log) and ``FORM_RSS_GROWTH_MB`` of its memory
(ts_handlers/worker_protocol.py); the frontend's own share, a few microseconds a field, is
bounded only by a proxy rule (docs/security.md). The last test registers archives by URLs that
``allowed_urls`` must refuse.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest
import requests
from hostile import GOOD, MULTIPART_BOUNDARY, cases, form_fields, multipart_parts
from serving import MODEL_STORE, require

from ts_handlers.tools.server import LocalTorchServe

pytestmark = pytest.mark.integration

ANSWER_BOUND_S = 5.0
MAX_RSS_GROWTH_MB = 300
CASES = [case for case in cases() if not case.name.startswith(("form", "multipart"))]
# Worker memory a form body may add: TorchServe's own reader kept a dict per field (+120 MB for
# 400,000 fields here); ts_handlers.worker_protocol keeps 65 and counts the rest.
FORM_RSS_GROWTH_MB = 60
# The frontend's own cost per form field, before the worker sees the request (measured: 2 to
# 36 us on this 2-core machine, more under load); only a proxy rule bounds it.
FRONTEND_S_PER_FIELD = 40e-6
FORMS = {
    "urlencoded, 400,000 fields": (
        form_fields(400_000),
        "application/x-www-form-urlencoded",
        400_000,
    ),
    "multipart, 50,000 parts": (
        multipart_parts(50_000),
        f"multipart/form-data; boundary={MULTIPART_BOUNDARY}",
        50_000,
    ),
}
BACKEND_TIME = re.compile(rb"Backend response time: (\d+)")


@pytest.fixture(scope="module")
def torchserve() -> Iterator[LocalTorchServe]:
    models = [require(MODEL_STORE / f"{name}.mar").name for name in GOOD]
    with LocalTorchServe(MODEL_STORE, models, enable_model_api=True) as server:
        yield server


@pytest.fixture(scope="module")
def inference(torchserve: LocalTorchServe) -> requests.Session:
    session = requests.Session()
    session.headers.update(torchserve.auth_headers("inference"))
    return session


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def worker_pid(torchserve, model: str) -> int:
    workers = torchserve.client().describe(model)["workers"]
    ready = [entry["pid"] for entry in workers if entry["status"] == "READY"]
    assert len(ready) == 1, workers
    return ready[0]


class PeakRss:
    """The peak of a process's resident memory while the block runs, sampled every 10 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.start = pid, rss_kib(pid)
        self.peak, self.done = self.start, threading.Event()
        self.thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.01)

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.done.set()
        self.thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 1024


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_hostile_body_is_answered_in_bounded_time_and_memory(torchserve, inference, case):
    pid = worker_pid(torchserve, case.model)
    url = f"{torchserve.inference_url}/predictions/{case.model}"
    good_headers, good_body = GOOD[case.model]

    def post(body: bytes, headers: dict[str, str]) -> tuple[requests.Response, float]:
        started = time.monotonic()
        response = inference.post(url, data=body, headers=headers, timeout=120)
        return response, time.monotonic() - started

    with PeakRss(pid) as memory, ThreadPoolExecutor(2) as pool:
        hostile = pool.submit(post, case.body, case.headers)
        good = pool.submit(post, good_body, good_headers)
        (response, elapsed), (neighbour, _) = hostile.result(), good.result()
    print(
        f"{case.name}: {len(case.body):,} bytes -> {response.status_code} in {elapsed:.2f} s, "
        f"worker +{memory.growth_mb:.0f} MB; neighbour {neighbour.status_code}"
    )
    assert response.status_code in case.expected, response.text[:300]
    body = response.json()
    if case.kserve:
        assert set(body) == {"error"}, body
    else:
        assert set(body) == {"code", "type", "message"} and body["code"] == response.status_code
    assert len(response.content) < 2000
    assert elapsed < ANSWER_BOUND_S
    assert memory.growth_mb < MAX_RSS_GROWTH_MB
    assert neighbour.status_code == 200, neighbour.text[:300]
    assert worker_pid(torchserve, case.model) == pid


class FrontendLog:
    """The longest batch the frontend handed a worker while the block ran: its WorkerThread
    logs, per batch, the milliseconds from sending the message to the worker's reply."""

    def __init__(self, torchserve: LocalTorchServe) -> None:
        self.path = torchserve.workdir / "logs" / "ts_log.log"
        self.start = self.path.stat().st_size

    def longest_batch_s(self) -> float:
        with open(self.path, "rb") as log:
            log.seek(self.start)
            times = [int(value) for value in BACKEND_TIME.findall(log.read())]
        assert times, "no batch logged"
        return max(times) / 1000


@pytest.mark.parametrize("form", FORMS, ids=list(FORMS))
def test_a_form_of_many_fields_is_refused_while_its_neighbours_are_served(
    torchserve, inference, form
):
    body, content_type, fields = FORMS[form]
    pid = worker_pid(torchserve, "sentiment")
    url = f"{torchserve.inference_url}/predictions/sentiment"
    good_headers, good_body = GOOD["sentiment"]
    log = FrontendLog(torchserve)
    answered = threading.Event()
    neighbours: list[int] = []

    def hostile() -> tuple[requests.Response, float]:
        started = time.monotonic()
        try:
            response = inference.post(
                url, data=body, headers={"Content-Type": content_type}, timeout=120
            )
            return response, time.monotonic() - started
        finally:
            answered.set()

    def good() -> None:  # good requests all the while, so some share the form's batch
        while not answered.is_set() or len(neighbours) < 2:
            response = inference.post(url, data=good_body, headers=good_headers, timeout=120)
            neighbours.append(response.status_code)

    with PeakRss(pid) as memory, ThreadPoolExecutor(3) as pool:
        sent = pool.submit(hostile)
        goods = [pool.submit(good) for _ in range(2)]
        response, elapsed = sent.result()
        for future in goods:
            future.result()
    time.sleep(0.2)  # the frontend logs a batch as its reply arrives
    worker_s = log.longest_batch_s()
    print(
        f"{form}: {len(body):,} bytes -> {response.status_code} in {elapsed:.2f} s "
        f"(the worker's longest batch {worker_s:.2f} s), worker +{memory.growth_mb:.0f} MB; "
        f"{len(neighbours)} neighbours {sorted(set(neighbours))}"
    )
    assert response.status_code == 413, response.text[:300]
    answer = response.json()
    assert set(answer) == {"code", "type", "message"} and answer["code"] == 413
    counted = re.match(r"the request has (\d+) form fields; the limit is 64 ", answer["message"])
    # The frontend hands on 399,999 fields of the 400,000 of x&x&...&x (measured).
    assert counted and fields - 1 <= int(counted[1]) <= fields, answer
    assert worker_s < ANSWER_BOUND_S
    assert elapsed < ANSWER_BOUND_S + FRONTEND_S_PER_FIELD * fields
    assert memory.growth_mb < FORM_RSS_GROWTH_MB
    assert neighbours and set(neighbours) == {200}
    assert worker_pid(torchserve, "sentiment") == pid


def test_allowed_urls_refuse_percent_encoded_and_recased_paths(torchserve, tmp_path):
    """Java opens a file: URL with its escapes decoded, so %2e%2e%2f is ../ there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(require(MODEL_STORE / "mnist.mar"), outside / "evil.mar")
    store = torchserve.model_store.as_posix()
    escaped = "%2e%2e%2f" * store.count("/") + quote(str(outside / "evil.mar").lstrip("/"), "")
    urls = {
        "escaped": f"file://{store}/{escaped}",
        "escaped upper": f"file://{store}/{escaped.upper().replace('.MAR', '.mar')}",
        "recased": f"FILE://{store.upper()}/mnist.mar",
    }
    client = torchserve.client()
    for label, url in urls.items():
        name = f"evil_{label.replace(' ', '_')}"
        response = requests.post(
            f"{torchserve.management_url}/models",
            params={"url": url, "model_name": name, "initial_workers": 1, "synchronous": "true"},
            headers=torchserve.auth_headers("management"),
            timeout=120,
        )
        print(f"{label}: {url} -> {response.status_code} {' '.join(response.text.split())}")
        assert 400 <= response.status_code < 500, (label, response.text)
        listed = {model["modelName"] for model in client.list_models()}
        assert name not in listed
    assert not list(torchserve.model_store.glob("*evil*"))
