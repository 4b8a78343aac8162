"""ts_handlers.tools.client against stub HTTP servers that answer like TorchServe 0.12.

The canned bodies below were copied from a real TorchServe 0.12.0 (token auth on, model API
enabled), so the tests pin the client to what the server really sends, including its quirks:
auth failures are 400 ``InvalidKeyException``, handler output usually carries no Content-Type,
and ``GET /models`` hands out a ``nextPageToken`` for a full page even when nothing follows.
"""

from __future__ import annotations

import json
import pickle
import socket
import threading
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from ts_handlers.tools.client import TorchServeClient, TorchServeError

INFERENCE_KEY = "xk593eaj"
MANAGEMENT_KEY = "0IJ0kSQz"

KEY_FILE = {
    "management": {"key": MANAGEMENT_KEY, "expiration time": "2026-11-23T13:53:17.801869155Z"},
    "inference": {"key": INFERENCE_KEY, "expiration time": "2026-11-23T13:53:17.801854022Z"},
    "API": {"key": "kXp0U5WQ"},
}

WORKER_READY = {
    "id": "9000",
    "startTime": "2026-11-23T12:53:40.286Z",
    "status": "READY",
    "memoryUsage": 0,
    "pid": 3257,
    "gpu": False,
    "gpuUsage": "N/A",
}

DESCRIBE_ECHO = [
    {
        "modelName": "echo",
        "modelVersion": "1.0",
        "modelUrl": "echo.mar",
        "runtime": "python",
        "minWorkers": 2,
        "maxWorkers": 2,
        "batchSize": 1,
        "maxBatchDelay": 100,
        "responseTimeout": 120,
        "startupTimeout": 120,
        "deviceType": "cpu",
        "loadedAtStartup": False,
        # A worker that is still starting is reported as UNLOADING, not as starting.
        "workers": [WORKER_READY, {**WORKER_READY, "id": "9001", "status": "UNLOADING"}],
        "jobQueueStatus": {"remainingCapacity": 100, "pendingRequests": 0},
    }
]

INVALID_KEY = {
    "code": 400,
    "type": "InvalidKeyException",
    "message": (
        "Token Authorization failed. Token either incorrect, expired, or not provided correctly"
    ),
}
NOT_FOUND = {"code": 404, "type": "ModelNotFoundException", "message": "Model not found: nope"}


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str | None


class StubServer:
    """Records every request and answers from per-(method, path) queues of scripted replies."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self._replies: dict[tuple[str, str], deque[Reply]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        # A short poll interval keeps shutdown() (and so the whole module) fast.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def reply(
        self,
        method: str,
        path: str,
        body: Any,
        *,
        status: int = 200,
        content_type: str | None = "application/json",
    ) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body, indent=2).encode()
        with self._lock:
            self._replies[(method, path)].append(Reply(status, raw, content_type))

    def reset(self) -> None:
        with self._lock:
            self.seen.clear()
            self._replies.clear()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _answer(self, seen: Seen) -> Reply:
        with self._lock:
            self.seen.append(seen)
            queue = self._replies.get((seen.method, seen.path))
            if queue:
                return queue.popleft()
        return Reply(599, b"no reply scripted for this request", "text/plain")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                seen = Seen(
                    method=self.command,
                    path=parts.path,
                    query=parse_qs(parts.query, keep_blank_values=True),
                    headers={name.lower(): value for name, value in self.headers.items()},
                    body=self.rfile.read(length),
                )
                reply = stub._answer(seen)
                self.send_response(reply.status)
                if reply.content_type is not None:
                    self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        return Handler


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # A CI proxy setting must not divert loopback traffic away from the stubs.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[StubServer, StubServer]]:
    inference, management = StubServer(), StubServer()
    yield inference, management
    inference.close()
    management.close()


@pytest.fixture
def inference(servers: tuple[StubServer, StubServer]) -> StubServer:
    servers[0].reset()
    return servers[0]


@pytest.fixture
def management(servers: tuple[StubServer, StubServer]) -> StubServer:
    servers[1].reset()
    return servers[1]


@pytest.fixture
def client(inference: StubServer, management: StubServer) -> Iterator[TorchServeClient]:
    with TorchServeClient(
        inference.url,
        management.url,
        inference_key=INFERENCE_KEY,
        management_key=MANAGEMENT_KEY,
        timeout=5.0,
    ) as ts:
        yield ts


def only(server: StubServer) -> Seen:
    assert len(server.seen) == 1, server.seen
    return server.seen[0]


# -- key file and auth ------------------------------------------------------------------------


def test_from_key_file_uses_each_key_on_its_own_api(
    tmp_path: Path, inference: StubServer, management: StubServer
) -> None:
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps(KEY_FILE, indent=2))
    inference.reply("GET", "/ping", {"status": "Healthy"})
    management.reply("GET", "/models", {"models": []})

    with TorchServeClient.from_key_file(key_file, inference.url, management.url) as ts:
        assert ts.ping() is True
        assert ts.list_models() == []

    assert only(inference).headers["authorization"] == f"Bearer {INFERENCE_KEY}"
    assert only(management).headers["authorization"] == f"Bearer {MANAGEMENT_KEY}"


def test_from_key_file_rejects_other_json(tmp_path: Path) -> None:
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "x"}}))
    with pytest.raises(ValueError, match="management"):
        TorchServeClient.from_key_file(key_file)


def test_without_keys_no_authorization_header_is_sent(inference: StubServer) -> None:
    inference.reply("GET", "/ping", {"status": "Healthy"})
    with TorchServeClient(inference.url, "http://127.0.0.1:9") as ts:
        assert ts.ping() is True
    assert "authorization" not in only(inference).headers


def test_rejected_token_raises_with_server_message(
    client: TorchServeClient, management: StubServer
) -> None:
    management.reply("GET", "/models", INVALID_KEY, status=400)
    with pytest.raises(TorchServeError) as info:
        client.list_models()
    assert info.value.status_code == 400
    assert info.value.error_type == "InvalidKeyException"
    assert info.value.message.startswith("Token Authorization failed")


# -- lifecycle ------------------------------------------------------------------------------


def test_register_defaults_wait_for_one_worker(
    client: TorchServeClient, management: StubServer
) -> None:
    status = {"status": 'Model "echo" Version: 1.0 registered with 1 initial workers'}
    management.reply("POST", "/models", status)

    assert client.register("echo.mar") == status

    seen = only(management)
    assert seen.method == "POST"
    assert seen.query == {"url": ["echo.mar"], "initial_workers": ["1"], "synchronous": ["true"]}
    assert seen.headers["authorization"] == f"Bearer {MANAGEMENT_KEY}"
    assert seen.body == b""


def test_register_with_name_path_async_and_options(
    client: TorchServeClient, management: StubServer
) -> None:
    management.reply("POST", "/models", {"status": "Processing worker updates..."}, status=202)

    result = client.register(
        "/srv/store/echo v2.mar",
        model_name="other",
        initial_workers=0,
        wait_until_ready=False,
        batch_size=4,
        decode_request=False,
    )

    assert result == {"status": "Processing worker updates..."}
    assert only(management).query == {
        "url": ["/srv/store/echo v2.mar"],
        "initial_workers": ["0"],
        "synchronous": ["false"],
        "model_name": ["other"],
        "batch_size": ["4"],
        "decode_request": ["false"],
    }


def test_register_conflict_maps_to_error(client: TorchServeClient, management: StubServer) -> None:
    conflict = {
        "code": 409,
        "type": "ConflictStatusException",
        "message": "Model version 1.0 is already registered for model echo",
    }
    management.reply("POST", "/models", conflict, status=409)

    with pytest.raises(TorchServeError) as info:
        client.register("echo.mar")

    assert info.value.status_code == 409
    assert info.value.body == conflict
    assert info.value.error_type == "ConflictStatusException"


def test_scale_pins_min_and_max_and_waits_for_ready_workers(
    client: TorchServeClient, management: StubServer
) -> None:
    management.reply("PUT", "/models/echo", {"status": "Workers scaled to 2 for model: echo"})
    starting = [{"status": "READY"}, {"status": "UNLOADING"}]
    management.reply("GET", "/models/echo", [{"modelName": "echo", "workers": starting}])
    ready = [{"status": "READY"}, {"status": "READY"}]
    management.reply("GET", "/models/echo", [{"modelName": "echo", "workers": ready}])

    assert client.scale("echo", 2) == {"status": "Workers scaled to 2 for model: echo"}

    put, *polls = management.seen
    assert put.method == "PUT"
    assert put.query == {"min_worker": ["2"], "max_worker": ["2"], "synchronous": ["true"]}
    assert [(poll.method, poll.path) for poll in polls] == [("GET", "/models/echo")] * 2


def test_scale_to_zero_undeploys_a_version_without_waiting(
    client: TorchServeClient, management: StubServer
) -> None:
    management.reply(
        "PUT", "/models/echo/2.0", {"status": "Processing worker updates..."}, status=202
    )

    client.scale("echo", 0, version="2.0", wait=False)

    assert only(management).query == {
        "min_worker": ["0"],
        "max_worker": ["0"],
        "synchronous": ["false"],
    }


def test_scale_refuses_negative_workers_before_calling_the_server(
    client: TorchServeClient, management: StubServer
) -> None:
    with pytest.raises(ValueError):
        client.scale("echo", -1)
    assert management.seen == []


@pytest.mark.parametrize(("version", "path"), [(None, "/models/echo"), ("1.0", "/models/echo/1.0")])
def test_unregister(
    client: TorchServeClient, management: StubServer, version: str | None, path: str
) -> None:
    management.reply("DELETE", path, {"status": 'Model "echo" unregistered'})

    assert client.unregister("echo", version) == {"status": 'Model "echo" unregistered'}
    assert only(management).method == "DELETE"


def test_unregister_default_version_is_forbidden(
    client: TorchServeClient, management: StubServer
) -> None:
    forbidden = {
        "code": 403,
        "type": "InvalidModelVersionException",
        "message": "Cannot remove default version for model echo",
    }
    management.reply("DELETE", "/models/echo", forbidden, status=403)

    with pytest.raises(TorchServeError, match="Cannot remove default version") as info:
        client.unregister("echo")
    assert info.value.status_code == 403


def test_model_names_are_quoted_into_one_path_segment(
    client: TorchServeClient, management: StubServer
) -> None:
    management.reply("DELETE", "/models/a%2Fb%20c", {"status": "ok"})
    client.unregister("a/b c")
    assert only(management).path == "/models/a%2Fb%20c"


def test_list_follows_page_tokens_until_an_empty_page(
    client: TorchServeClient, management: StubServer
) -> None:
    pages = [
        {"nextPageToken": "2", "models": [{"modelName": "a", "modelUrl": "a.mar"}] * 2},
        {"nextPageToken": "4", "models": [{"modelName": "b", "modelUrl": "b.mar"}] * 2},
        {"models": []},  # TorchServe sends a token for every full page, then this
    ]
    for page in pages:
        management.reply("GET", "/models", page)

    models = client.list_models(page_size=2)

    assert [m["modelName"] for m in models] == ["a", "a", "b", "b"]
    assert [s.query for s in management.seen] == [
        {"limit": ["2"]},
        {"limit": ["2"], "next_page_token": ["2"]},
        {"limit": ["2"], "next_page_token": ["4"]},
    ]


def test_list_stops_on_a_page_without_token(
    client: TorchServeClient, management: StubServer
) -> None:
    management.reply("GET", "/models", {"models": [{"modelName": "echo", "modelUrl": "echo.mar"}]})

    assert client.list_models() == [{"modelName": "echo", "modelUrl": "echo.mar"}]
    assert only(management).query == {"limit": ["100"]}


def test_describe_returns_first_entry_and_counts_ready_workers(
    client: TorchServeClient, management: StubServer
) -> None:
    management.reply("GET", "/models/echo/1.0", DESCRIBE_ECHO)
    management.reply("GET", "/models/echo", DESCRIBE_ECHO)

    description = client.describe("echo", "1.0")
    ready = client.ready_workers("echo")

    assert description == DESCRIBE_ECHO[0]
    assert description["minWorkers"] == 2
    assert len(description["workers"]) == 2
    assert ready == 1
    assert [s.path for s in management.seen] == ["/models/echo/1.0", "/models/echo"]


def test_describe_missing_model(client: TorchServeClient, management: StubServer) -> None:
    management.reply("GET", "/models/nope", NOT_FOUND, status=404)

    with pytest.raises(TorchServeError) as info:
        client.describe("nope")

    error = info.value
    assert isinstance(error, RuntimeError)
    assert (error.status_code, error.message) == (404, "Model not found: nope")
    assert error.error_type == "ModelNotFoundException"
    assert str(error) == "TorchServe returned HTTP 404: Model not found: nope"


# -- inference API ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [(200, {"status": "Healthy"}, True), (500, {"status": "Unhealthy"}, False)],
)
def test_ping(
    client: TorchServeClient, inference: StubServer, status: int, body: Any, expected: bool
) -> None:
    inference.reply("GET", "/ping", body, status=status)
    assert client.ping() is expected
    assert only(inference).headers["authorization"] == f"Bearer {INFERENCE_KEY}"


def test_ping_with_rejected_token_raises(client: TorchServeClient, inference: StubServer) -> None:
    inference.reply("GET", "/ping", INVALID_KEY, status=400)
    with pytest.raises(TorchServeError) as info:
        client.ping()
    assert info.value.status_code == 400


def test_predict_bytes_are_sent_raw(client: TorchServeClient, inference: StubServer) -> None:
    # Handlers' dicts come back JSON-encoded but without any Content-Type header.
    inference.reply("POST", "/predictions/echo", {"label": 3}, content_type=None)

    assert client.predict("echo", b"\xff\x00raw") == {"label": 3}

    seen = only(inference)
    assert seen.body == b"\xff\x00raw"
    assert seen.headers["content-type"] == "application/octet-stream"
    assert seen.headers["authorization"] == f"Bearer {INFERENCE_KEY}"
    assert seen.query == {}


def test_predict_str_is_sent_as_utf8_text(client: TorchServeClient, inference: StubServer) -> None:
    inference.reply("POST", "/predictions/echo", [0.1, 0.9], content_type=None)

    assert client.predict("echo", "héllo") == [0.1, 0.9]

    seen = only(inference)
    assert seen.body == "héllo".encode()
    assert seen.headers["content-type"] == "text/plain; charset=utf-8"


def test_predict_object_is_sent_as_json(client: TorchServeClient, inference: StubServer) -> None:
    inference.reply("POST", "/predictions/echo/2.0", {"ok": True})

    result = client.predict("echo", {"data": [1, 2]}, version="2.0", params={"top_k": 3})

    assert result == {"ok": True}
    seen = only(inference)
    # The TorchServe worker only decodes JSON for exactly this content type.
    assert seen.headers["content-type"] == "application/json"
    assert seen.json() == {"data": [1, 2]}
    assert seen.query == {"top_k": ["3"]}


def test_predict_honours_explicit_content_type(
    client: TorchServeClient, inference: StubServer
) -> None:
    inference.reply("POST", "/predictions/vision", {"ok": True})
    client.predict("vision", b"\x89PNG", content_type="image/png")
    assert only(inference).headers["content-type"] == "image/png"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [(b"\x89PNG\r\n", "image/png"), (b"plain words", None), (b"", None)],
)
def test_predict_returns_bytes_for_non_json(
    client: TorchServeClient, inference: StubServer, body: bytes, content_type: str | None
) -> None:
    inference.reply("POST", "/predictions/echo", body, content_type=content_type)
    assert client.predict("echo", b"x") == body


def test_predict_handler_failure(client: TorchServeClient, inference: StubServer) -> None:
    failed = {"code": 503, "type": "InternalServerException", "message": "Prediction failed"}
    inference.reply("POST", "/predictions/echo", failed, status=503)

    with pytest.raises(TorchServeError, match="Prediction failed") as info:
        client.predict("echo", "fail")
    assert info.value.status_code == 503


def test_error_without_json_body_keeps_the_text(
    client: TorchServeClient, inference: StubServer
) -> None:
    inference.reply("POST", "/predictions/echo", b"Bad Gateway\n", status=502, content_type=None)

    with pytest.raises(TorchServeError) as info:
        client.predict("echo", b"x")

    assert (info.value.status_code, info.value.message) == (502, "Bad Gateway")
    assert info.value.body == "Bad Gateway\n"
    assert info.value.error_type is None


def test_explain_posts_to_explanations(client: TorchServeClient, inference: StubServer) -> None:
    inference.reply("POST", "/explanations/echo", [[0.5, -0.5]], content_type=None)

    assert client.explain("echo", {"text": "good"}) == [[0.5, -0.5]]

    seen = only(inference)
    assert seen.json() == {"text": "good"}
    assert seen.headers["content-type"] == "application/json"


def test_embed_sends_only_the_options_given(
    client: TorchServeClient, inference: StubServer
) -> None:
    vectors = [[0.0, 0.2, 0.3], [0.1, 0.2, 0.3]]
    inference.reply("POST", "/predictions/minilm", vectors, content_type=None)

    assert client.embed("minilm", ("a", "b"), normalize=True) == vectors

    seen = only(inference)
    assert seen.json() == {"inputs": ["a", "b"], "normalize": True}
    assert seen.headers["content-type"] == "application/json"


def test_embed_single_string_returns_what_the_server_returns(
    client: TorchServeClient, inference: StubServer
) -> None:
    inference.reply("POST", "/predictions/minilm", [[0.1, 0.2, 0.3]], content_type=None)

    assert client.embed("minilm", "a", truncate=False) == [[0.1, 0.2, 0.3]]
    assert only(inference).json() == {"inputs": "a", "truncate": False}


# -- errors and resources -----------------------------------------------------------------


def test_error_survives_pickling() -> None:
    error = TorchServeError(404, "Model not found: nope", NOT_FOUND)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.status_code, copy.message, copy.body) == (404, "Model not found: nope", NOT_FOUND)


def test_transport_errors_propagate_unchanged() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port now, so the connection is refused immediately.
    url = f"http://127.0.0.1:{port}"
    with TorchServeClient(url, url) as ts, pytest.raises(requests.ConnectionError):
        ts.ping()


def test_context_manager_closes_the_session(
    inference: StubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ts = TorchServeClient(inference.url)
    closed: list[bool] = []
    monkeypatch.setattr(ts._session, "close", lambda: closed.append(True))

    with ts as entered:
        assert entered is ts
    assert closed == [True]


def test_embed_sends_the_embedding_options_given(
    client: TorchServeClient, inference: StubServer
) -> None:
    inference.reply("POST", "/predictions/minilm", [[0.1, 0.2]], content_type=None)

    client.embed("minilm", "a", dimensions=2, prompt_name="query", truncation_side="left")
    assert only(inference).json() == {
        "inputs": "a",
        "dimensions": 2,
        "prompt_name": "query",
        "truncation_side": "left",
    }


def test_tokenize_posts_under_the_default_version(
    client: TorchServeClient, inference: StubServer, management: StubServer
) -> None:
    management.reply("GET", "/models/echo", DESCRIBE_ECHO)
    tokens = [[{"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}]]
    inference.reply(
        "POST", f"/predictions/echo/{DESCRIBE_ECHO[0]['modelVersion']}/tokenize", tokens
    )

    assert client.tokenize("echo", ["a"], add_special_tokens=True) == tokens
    seen = only(inference)
    assert seen.json() == {"inputs": ["a"], "add_special_tokens": True}
    assert seen.headers["content-type"] == "application/json"
