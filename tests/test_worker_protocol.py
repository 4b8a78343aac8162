"""ts_handlers.worker_protocol reads TorchServe's framing as TorchServe does, bounded for forms.

Each message is built the way the frontend's ``ModelRequestEncoder`` writes it (read with
``javap``: per request its id, ``(name, value)`` headers and ``-1``, then ``(name, content
type, value)`` parameters and ``-1``, a null content type written as ``-1``; ``-1`` after the
last request), sent over a real socket pair, and read both by TorchServe's own
``_retrieve_request`` and by ours: the results must be identical, every byte of the message
consumed and no byte past it. A form of more fields than ``MAX_FORM_FIELDS`` keeps
``MAX_FORM_FIELDS + 1`` of them and hands the count on in a header, and the handler answers 413.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from harness import run_batch
from ts.protocol import otf_message_handler as otf
from ts.service import Service

from ts_handlers import worker_protocol
from ts_handlers.payload import FORM_FIELDS_HEADER, MAX_FORM_FIELDS

FORM = "application/x-www-form-urlencoded"
TRAILER = b"I" + struct.pack("!i", -1)  # the next message on the socket: an empty batch

# (name, content type or None, value) parameters and (name, value) headers of one request.
Parameter = tuple[bytes, bytes | None, bytes]


def field(value: bytes | None) -> bytes:
    if value is None:
        return struct.pack("!i", -1)  # ModelRequestEncoder.encodeField of a null
    return struct.pack("!i", len(value)) + value


def request_frames(
    request_id: bytes, headers: list[tuple[bytes, bytes]], parameters: list[Parameter]
) -> bytes:
    parts = [field(request_id)]
    parts += [field(name) + field(value) for name, value in headers]
    parts.append(struct.pack("!i", -1))
    parts += [field(name) + field(kind) + field(value) for name, kind, value in parameters]
    parts.append(struct.pack("!i", -1))
    return b"".join(parts)


def batch_frames(requests: list[tuple[bytes, list, list]]) -> bytes:
    """An inference message after its command byte, as the frontend writes it."""
    return b"".join(request_frames(*request) for request in requests) + struct.pack("!i", -1)


class Trickle(socket.socket):
    """A real socket whose every recv (peeks included) returns at most ``step`` bytes."""

    step = 1 << 30

    def recv(self, size: int, flags: int = 0) -> bytes:
        return super().recv(min(size, self.step), flags)


@pytest.fixture
def connection() -> Iterator[Callable[[bytes, int | None], socket.socket]]:
    """Sends bytes from a thread into a socket pair; yields the reading end."""
    opened: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def connect(data: bytes, step: int | None = None) -> socket.socket:
        writer, plain = socket.socketpair()
        reader = Trickle(fileno=plain.detach())
        if step:
            reader.step = step
        opened.extend([writer, reader])
        thread = threading.Thread(target=writer.sendall, args=(data,), daemon=True)
        thread.start()
        threads.append(thread)
        return reader

    yield connect
    for thread in threads:
        thread.join(timeout=30)
    for sock in opened:
        sock.close()


def read_batch(reader: Callable[[Any], Any], conn: socket.socket) -> list[dict[str, Any]]:
    """TorchServe's _retrieve_inference_msg, with the request reader given."""
    batch = []
    while (request := reader(conn)) is not None:
        batch.append(request)
    return batch


def rest(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += socket.socket.recv(conn, size - len(data))
    return data


TORCHSERVE = worker_protocol._torchserve_retrieve_request()
OURS = worker_protocol.retrieve_request

ORDINARY = [
    (
        b"a1",
        [(b"Content-Type", b"application/json"), (b"url_path", b""), (b"X-Top-K", b"2")],
        [(b"body", b"application/json", b'{"inputs": ["the film", "\\u00e9t\\u00e9"]}')],
    ),
    (b"b2", [(b"Content-Type", b"text/plain; charset=utf-8")], [(b"body", b"text/plain", b"")]),
    (b"c3", [], [(b"body", b"image/png", bytes(range(256)) * 40)]),
    (  # multipart: several fields, an empty one, a null content type, broken JSON and UTF-8
        b"d4",
        [(b"Content-Type", b"multipart/form-data; boundary=x")],
        [
            (b"data", b"text/plain", "caf\u00e9".encode()),
            (b"top_k", None, b"3"),
            (b"empty", b"", b""),
            (b"json", b"application/json", b'{"a": [1, 2'),
            (b"latin", b"text/plain", b"\xe9t\xe9"),
            (b"", b"application/octet-stream", b"\x00" * 70_000),
        ],
    ),
    (b"e5", [(b"describe", b"True")], []),  # no parameters, as the management describe sends
]


@pytest.mark.parametrize("decode", [True, False], ids=["decoded", "bytes"])
@pytest.mark.parametrize("step", [1, 3, 7, 64, None])
def test_ordinary_batches_read_as_torchserve_reads_them(
    connection, monkeypatch, caplog, decode, step
):
    monkeypatch.setenv("TS_DECODE_INPUT_REQUEST", "true" if decode else "false")
    caplog.set_level(logging.ERROR)  # TorchServe warns, with a traceback, on each bad JSON
    message = batch_frames(ORDINARY)
    expected_conn = connection(message + TRAILER, step)
    ours_conn = connection(message + TRAILER, step)
    expected = read_batch(TORCHSERVE, expected_conn)
    assert read_batch(OURS, ours_conn) == expected
    assert len(expected) == len(ORDINARY) and expected[0]["parameters"][0]["value"] != b""
    assert rest(ours_conn, len(TRAILER)) == TRAILER  # nothing past the message was taken
    # The rows a handler gets are the same too.
    assert Service.retrieve_data_for_inference(expected)[1] == [
        {parameter["name"]: parameter["value"] for parameter in request["parameters"]}
        for request in expected
    ]


def form(count: int, name: Callable[[int], bytes] = lambda index: b"f%d" % index) -> list:
    return [(name(index), b"text/plain", b"") for index in range(count)]


@pytest.mark.parametrize("step", [5, None])
def test_a_form_over_the_limit_keeps_its_first_fields_and_counts_the_rest(connection, step):
    count = 5000
    requests = [
        (b"good", [(b"Content-Type", b"text/plain")], [(b"body", b"text/plain", b"the film")]),
        (b"form", [(b"Content-Type", FORM.encode())], form(count)),
        (b"after", [], [(b"body", b"text/plain", b"last")]),
    ]
    message = batch_frames(requests)
    expected = read_batch(TORCHSERVE, connection(message, step))
    ours_conn = connection(message + TRAILER, step)
    ours = read_batch(OURS, ours_conn)
    assert rest(ours_conn, len(TRAILER)) == TRAILER
    assert [ours[0], ours[2]] == [expected[0], expected[2]]
    kept = ours[1]["parameters"]
    assert kept == expected[1]["parameters"][: MAX_FORM_FIELDS + 1]
    assert ours[1]["headers"] == [
        *expected[1]["headers"],
        {"name": FORM_FIELDS_HEADER.encode(), "value": str(count).encode()},
    ]


def test_a_form_at_the_limit_is_read_whole_without_a_count(connection):
    requests = [(b"r", [], form(MAX_FORM_FIELDS))]
    message = batch_frames(requests)
    assert read_batch(OURS, connection(message)) == read_batch(TORCHSERVE, connection(message))


def test_hundreds_of_thousands_of_fields_are_counted_not_kept(connection):
    count = 300_000  # repeated names, as x&x&x... sends them; multipart parts with values
    parameters = [(b"x", b"text/plain", b"v" * (index % 3)) for index in range(count)]
    request = (b"big", [(FORM_FIELDS_HEADER.encode(), b"1")], parameters)  # a client's own copy
    conn = connection(batch_frames([request]) + TRAILER)
    (ours,) = read_batch(OURS, conn)
    assert rest(conn, len(TRAILER)) == TRAILER
    assert len(ours["parameters"]) == MAX_FORM_FIELDS + 1
    assert ours["headers"] == [{"name": FORM_FIELDS_HEADER.encode(), "value": b"300000"}]


def test_a_clients_copy_of_the_count_header_never_reaches_the_handler(connection):
    headers = [(b"TS-Handlers-Form-Fields", b"999"), (b"Content-Type", b"text/plain")]
    request = (b"r", headers, [(b"body", b"text/plain", b"the film")])
    message = batch_frames([request])
    (expected,) = read_batch(TORCHSERVE, connection(message))
    (ours,) = read_batch(OURS, connection(message))
    assert ours["headers"] == expected["headers"][1:]
    assert ours["parameters"] == expected["parameters"]


def test_a_frontend_gone_mid_request_exits_as_torchserve_does(connection):
    message = batch_frames([(b"r", [], form(1000))])
    for reader in (TORCHSERVE, OURS):
        writer, plain = socket.socketpair()
        with writer, plain:
            writer.sendall(message[: len(message) // 2])
            writer.close()
            with pytest.raises(SystemExit):
                read_batch(reader, plain)


def test_the_handler_answers_413_naming_the_count_and_serves_its_neighbours(
    connection, text_handlers
):
    requests = [
        (b"form", [(b"Content-Type", FORM.encode())], form(100_000, lambda index: b"x")),
        (b"good", [(b"Content-Type", b"text/plain")], [(b"body", b"text/plain", b"the film")]),
    ]
    batch = read_batch(OURS, connection(batch_frames(requests)))
    processors, rows, _ = Service.retrieve_data_for_inference(batch)
    handler = text_handlers["torchscript"]
    headers = [processor.get_request_properties() for processor in processors]
    results = run_batch(handler, list(zip(rows, headers, strict=True)))
    status, body, _ = results[0]
    assert status == 413, body
    assert body["message"].startswith("the request has 100000 form fields; the limit is 64")
    assert results[1][0] == 200
    assert len(json.dumps(body)) < 1000


def test_install_is_idempotent_and_only_for_the_framing_it_reads(monkeypatch, caplog):
    original = otf._retrieve_request
    try:
        worker_protocol.uninstall()
        torchserve = otf._retrieve_request
        assert worker_protocol.install() and worker_protocol.install()
        installed = otf._retrieve_request
        assert installed is not torchserve and installed.torchserve_original is torchserve
        assert worker_protocol._torchserve_retrieve_request() is torchserve
        worker_protocol.uninstall()
        assert otf._retrieve_request is torchserve
        import ts

        monkeypatch.setattr(ts, "__version__", "0.13.0")
        with caplog.at_level(logging.WARNING, logger=worker_protocol.__name__):
            assert not worker_protocol.install()
        assert otf._retrieve_request is torchserve
        assert "TorchServe 0.13.0" in caplog.text and len(caplog.records) == 1
    finally:
        otf._retrieve_request = original
