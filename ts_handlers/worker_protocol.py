"""TorchServe's worker reading one request's parameters, bounded for form bodies.

TorchServe's frontend turns every field of a form (urlencoded pairs, multipart parts) into its
own parameter of the message it sends the worker, and the worker's own reader
(``ts.protocol.otf_message_handler._retrieve_request``) takes each one with six ``recv`` calls
and keeps a dict per field, all before any handler runs: 740,000 empty fields (1.5 MB of body)
cost the worker about 14 s and 178 MB, which no handler code can refuse (docs/security.md,
"Form and multipart bodies").

:func:`retrieve_request` reads the same framing with the same results, except that:

* it peeks at what has arrived on the socket (``MSG_PEEK``), parses whole frames out of those
  bytes, and then takes from the socket exactly the bytes parsed, so a field costs about a
  microsecond of Python, not six system calls, and no byte past the request is ever consumed;
* it keeps at most ``payload.MAX_FORM_FIELDS + 1`` parameters and only counts the rest, and
  hands the count to the handler as the request header :data:`payload.FORM_FIELDS_HEADER`
  (added after the client's headers; a copy sent by a client is always dropped), so the handler
  answers its usual 413 naming the count and the limit, with bounded memory.

Everything else is TorchServe's own code: the request id, headers and kept parameters are read
by TorchServe's ``_retrieve_int``, ``_retrieve_buffer``, ``_retrieve_reqest_header`` and
``_retrieve_input_data`` (so JSON/text decoding per content type, ``TS_DECODE_INPUT_REQUEST``
and the exit on a frontend disconnect are exactly TorchServe's), fed from the peeked bytes.

:func:`install` puts :func:`retrieve_request` in place of TorchServe's, once, when the handler
loads in a worker (``base.entry_point``), and only for the TorchServe whose framing it was
written against (0.12); with any other it logs one line and leaves TorchServe's reader alone.
"""

from __future__ import annotations

import logging
import socket
import struct
import sys
from typing import Any

from ts_handlers.payload import FORM_FIELDS_HEADER, MAX_FORM_FIELDS

logger = logging.getLogger(__name__)

# The TorchServe versions whose otf_message_handler framing this module was checked against.
SUPPORTED_VERSIONS = ("0.12.",)
# The functions of TorchServe's reader used here, or replaced.
READER_FUNCTIONS = (
    "_retrieve_inference_msg",
    "_retrieve_request",
    "_retrieve_int",
    "_retrieve_buffer",
    "_retrieve_reqest_header",
    "_retrieve_input_data",
)
# Bytes peeked at once: a Unix socket rarely holds more than this, and one peek copies it.
PEEK_BYTES = 256 * 1024
_INT = struct.Struct("!i")
_END_OF_LIST = -1


class _PeekedSocket:
    """A socket stand-in for TorchServe's reader that serves peeked bytes.

    ``recv`` returns bytes from the last peek; the socket gives them up only in :meth:`take`,
    which consumes exactly the bytes served so far. A read longer than a peek goes to the
    socket directly (after a take), as TorchServe's would.
    """

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.peeked = b""
        self.pos = 0  # bytes of ``peeked`` served (taken from the socket at the next take)

    def recv(self, size: int) -> bytes:
        if self.pos >= len(self.peeked):
            self.take()
            if size >= PEEK_BYTES:  # a large value: straight from the socket, exactly
                return self.conn.recv(size)
            # Blocks until at least one byte has arrived; b"" only when the frontend is gone,
            # which TorchServe's _retrieve_buffer then handles (it logs and exits).
            self.peeked = self.conn.recv(PEEK_BYTES, socket.MSG_PEEK)
        data = self.peeked[self.pos : self.pos + size]
        self.pos += len(data)
        return data

    def take(self) -> None:
        """Consumes from the socket exactly the bytes served from the peek."""
        remaining, self.peeked, self.pos = self.pos, b"", 0
        while remaining > 0:
            taken = len(self.conn.recv(remaining))
            if taken == 0:  # cannot happen for bytes already peeked; handled as TorchServe does
                logging.info("Frontend disconnected.")
                sys.exit(0)
            remaining -= taken

    def skip_parameters(self) -> int:
        """Reads parameter frames up to the end of the list without keeping any; their count.

        A parameter is three (length, bytes) frames: name, content type, value; a name length
        of -1 ends the list, and any other negative length reads as empty, as in TorchServe's
        ``_retrieve_buffer``. Whole parameters are parsed out of the peeked bytes in one tight
        loop; one that has not wholly arrived is read frame by frame through ``recv``.
        """
        count = 0
        unpack = _INT.unpack_from
        while True:
            buffer, pos, end = self.peeked, self.pos, len(self.peeked)
            # The hot loop (about 0.6 us a parameter): no calls but unpack_from.
            while pos + 4 <= end:
                (length,) = unpack(buffer, pos)
                if length == _END_OF_LIST:
                    self.pos = pos + 4
                    return count
                cursor = pos + 4 + length if length > 0 else pos + 4
                if cursor + 4 > end:
                    break
                (length,) = unpack(buffer, cursor)
                cursor += 4 + length if length > 0 else 4
                if cursor + 4 > end:
                    break
                (length,) = unpack(buffer, cursor)
                cursor += 4 + length if length > 0 else 4
                if cursor > end:
                    break
                pos = cursor
                count += 1
            self.pos = pos
            if not self._skip_one_parameter():
                return count
            count += 1

    def _skip_one_parameter(self) -> bool:
        """One parameter read through TorchServe's own framing functions; False at the end."""
        otf = _otf()
        length = otf._retrieve_int(self)
        if length == _END_OF_LIST:
            return False
        for _ in range(2):
            self._discard(length)
            length = otf._retrieve_int(self)
        self._discard(length)
        return True

    def _discard(self, length: int) -> None:
        while length > 0:
            data = self.recv(min(length, PEEK_BYTES))
            if not data:
                logging.info("Frontend disconnected.")
                sys.exit(0)
            length -= len(data)


def _otf() -> Any:
    from ts.protocol import otf_message_handler

    return otf_message_handler


def retrieve_request(conn: Any) -> dict[str, Any] | None:
    """One request of an inference message, as TorchServe's ``_retrieve_request`` reads it,
    with at most ``MAX_FORM_FIELDS + 1`` parameters kept and the rest counted (module doc)."""
    otf = _otf()
    if not isinstance(conn, socket.socket):  # a stand-in that cannot peek: TorchServe's own
        return _torchserve_retrieve_request()(conn)
    stream = _PeekedSocket(conn)
    try:
        length = otf._retrieve_int(stream)
        if length == _END_OF_LIST:
            return None
        request: dict[str, Any] = {"requestId": otf._retrieve_buffer(stream, length)}
        headers = []
        name = FORM_FIELDS_HEADER.encode()
        while (header := otf._retrieve_reqest_header(stream)) is not None:
            if bytes(header["name"]).lower() != name:  # the handler trusts ours alone
                headers.append(header)
        parameters = []
        while (parameter := otf._retrieve_input_data(stream)) is not None:
            parameters.append(parameter)
            if len(parameters) > MAX_FORM_FIELDS:
                count = len(parameters) + stream.skip_parameters()
                headers.append({"name": name, "value": str(count).encode()})
                break
        request["headers"] = headers
        request["parameters"] = parameters
        return request
    finally:
        stream.take()


def _torchserve_retrieve_request() -> Any:
    reader = _otf()._retrieve_request
    return getattr(reader, "torchserve_original", reader)


def install() -> bool:
    """Puts :func:`retrieve_request` in TorchServe's worker in place of its own; idempotent.

    True when it is (or already was) in place; False, with one log line, when the installed
    TorchServe is not one whose framing this module reads.
    """
    try:
        import ts

        otf = _otf()
    except ImportError:
        return False
    version = str(getattr(ts, "__version__", "unknown"))
    missing = [name for name in READER_FUNCTIONS if not callable(getattr(otf, name, None))]
    if not version.startswith(SUPPORTED_VERSIONS) or missing:
        logger.warning(
            "TorchServe %s: its worker protocol is not the one ts_handlers.worker_protocol reads "
            "(TorchServe %s); form bodies are read by TorchServe's own reader, unbounded",
            version,
            "/".join(v + "x" for v in SUPPORTED_VERSIONS),
        )
        return False
    current = otf._retrieve_request
    if getattr(current, "torchserve_original", None) is not None:
        return True

    def bounded_retrieve_request(conn: Any) -> dict[str, Any] | None:
        return retrieve_request(conn)

    bounded_retrieve_request.torchserve_original = current  # type: ignore[attr-defined]
    otf._retrieve_request = bounded_retrieve_request
    logger.info(
        "TorchServe %s worker: request parameters read by ts_handlers.worker_protocol "
        "(at most %d kept, the rest counted)",
        version,
        MAX_FORM_FIELDS + 1,
    )
    return True


def uninstall() -> None:
    """Puts TorchServe's own reader back (tests)."""
    otf = _otf()
    original = getattr(otf._retrieve_request, "torchserve_original", None)
    if original is not None:
        otf._retrieve_request = original
