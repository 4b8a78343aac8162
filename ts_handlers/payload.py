"""One incoming request, whatever form TorchServe hands it over in.

TorchServe gives a handler one dict per request. The body sits under ``body`` (a raw POST) or
``data`` (a form field) as ``bytes``/``bytearray``, as ``str`` for ``text/*`` content, or as an
already-parsed dict/list for ``application/json``; query parameters and other form fields sit
beside it. :class:`Request` normalises that, and its accessors turn every malformed body into an
:class:`~ts_handlers.errors.InvalidInput` rather than an exception from deep inside a library.

Every task gets the same hardening here: a ``Content-Encoding: gzip``/``deflate`` body is
inflated with a cap (413 beyond it, so a zip bomb never expands), and JSON is parsed strictly:
nesting deeper than :data:`MAX_JSON_DEPTH` is refused by a scan before any recursive parse,
``NaN``/``Infinity`` (not JSON) and numbers that overflow are refused, a key given twice is
refused by name, and a number literal longer than :data:`MAX_NUMBER_CHARS` is a 400 before it
is converted.
TorchServe's worker ``json.loads`` an ``application/json`` body itself unless the property
``decode_input_request=false`` is set (``LocalTorchServe`` sets it): a body it parsed arrives as
a dict or list and is re-checked for depth and non-finite numbers (a repeated key is already
lost by then); a body it failed to parse arrives as bytes and is parsed here. See
docs/security.md.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ts_handlers.errors import InvalidInput, PayloadTooLarge, RequestError, UnsupportedMediaType

BODY_KEYS = ("body", "data")
JSON_TYPES = (dict, list, str, int, float, bool)

# TorchServe's own default max_request_size (bytes); its frontend answers 413 above it.
DEFAULT_MAX_REQUEST_SIZE = 6_553_500
# And its max_response_size: an answer longer than this kills the worker (docs/limits.md).
DEFAULT_MAX_RESPONSE_SIZE = 6_553_500
# A compressed body may inflate to at most this many bytes; more is a 413 (a zip bomb never
# expands past it). Request.from_row(max_decompressed=...) overrides it.
MAX_DECOMPRESSED_BYTES = DEFAULT_MAX_REQUEST_SIZE
# Content-Encoding values a body may carry; anything else is a 415.
CONTENT_ENCODINGS = ("identity", "gzip", "x-gzip", "deflate")
# gzip members one body may hold (RFC 1952 allows any number; a client compresses once). Each
# member costs a fresh inflater, so their count is bounded apart from their size; more: 413.
MAX_GZIP_MEMBERS = 64
# Compressed bytes handed to zlib at a time (see inflate).
INFLATE_SLICE = 64 * 1024
# JSON containers nested deeper than this are refused before parsing (our requests need 2).
MAX_JSON_DEPTH = 64
# Longest piece of a client's value an error message quotes back.
PREVIEW_CHARS = 40
# Longest number literal (sign, digits, point, exponent) a JSON body may hold: an int64 takes
# 20 characters and a double's shortest form 24. Longer ones are refused before any conversion
# (int() of n digits costs O(n^2), and a shape product of a few of them overflows str()).
MAX_NUMBER_CHARS = 64
# Form fields (multipart parts or urlencoded pairs) one request may carry: the body and a few
# options. TorchServe hands every field over as its own parameter; more: 413 before any is read.
MAX_FORM_FIELDS = 64
# The request header in which ts_handlers.worker_protocol, reading a request in TorchServe's
# worker, hands on how many form fields it counted when there were more than MAX_FORM_FIELDS
# (it keeps only MAX_FORM_FIELDS + 1 of them). It drops any copy a client sends; where it is
# not installed (another TorchServe), a client's copy can only refuse that client's request.
FORM_FIELDS_HEADER = "ts-handlers-form-fields"


@dataclass(frozen=True)
class Request:
    body: Any
    content_type: str = ""
    # Form fields sent beside the body (TorchServe 0.12 does not forward the query string).
    params: Mapping[str, Any] = field(default_factory=dict)
    # HTTP headers, lower-cased; they carry credentials, so they are never logged.
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_row(
        cls,
        row: Any,
        content_type: str = "",
        headers: Mapping[str, Any] | None = None,
        *,
        max_decompressed: int = MAX_DECOMPRESSED_BYTES,
    ) -> Request:
        """Normalises one TorchServe row; a compressed body is inflated here (capped)."""
        content_type = content_type.split(";")[0].strip().lower()
        headers = {
            str(key).lower(): value
            for key, value in (headers or {}).items()
            if isinstance(value, str)
        }
        encoding = headers.get("content-encoding", "")
        fields = _counted_form_fields(headers.get(FORM_FIELDS_HEADER))
        if fields is not None or (isinstance(row, Mapping) and len(row) > MAX_FORM_FIELDS):
            raise PayloadTooLarge(
                f"the request has {fields or len(row)} form fields; the limit is "
                f"{MAX_FORM_FIELDS} (payload.MAX_FORM_FIELDS): send the input as the body, or "
                'as one field named "data", with the options beside it'
            )
        if not isinstance(row, Mapping):
            body = decode_content(row, encoding, max_decompressed)
            return cls(body=body, content_type=content_type, headers=headers)
        body_key = next((key for key in BODY_KEYS if key in row), None)
        params = {key: _param_text(value) for key, value in row.items() if key != body_key}
        body = decode_content(row.get(body_key) if body_key else None, encoding, max_decompressed)
        return cls(body=body, content_type=content_type, params=params, headers=headers)

    def option(self, name: str, json_body: Any = None) -> Any:
        """A per-request option: a JSON field, else a form field, else an ``X-Name`` header."""
        if isinstance(json_body, Mapping) and name in json_body:
            return json_body[name]
        if name in self.params:
            return self.params[name]
        return self.headers.get("x-" + name.replace("_", "-"))

    @property
    def is_empty(self) -> bool:
        return self.body is None or (
            isinstance(self.body, bytes | bytearray | str) and not self.body
        )

    def raw_bytes(self) -> bytes | None:
        """The body as bytes when it arrived undecoded, else None."""
        if isinstance(self.body, bytes | bytearray):
            return bytes(self.body)
        return None

    def text(self) -> str:
        if isinstance(self.body, str):
            return self.body
        raw = self.raw_bytes()
        if raw is None:
            raise InvalidInput(f"expected a text body, got JSON {type(self.body).__name__}")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidInput(
                f"the body is not valid UTF-8 (byte {error.start}); send UTF-8 text"
            ) from None

    def json(self) -> Any:
        """The body parsed as strict JSON (see :func:`parse_json`).

        TorchServe's worker may have parsed an application/json body already (leniently:
        it takes NaN and keeps the last of a repeated key); such a value is re-checked for
        depth and non-finite numbers.
        """
        if isinstance(self.body, JSON_TYPES) and not isinstance(self.body, str):
            check_parsed_json(self.body)
            return self.body
        if isinstance(self.body, str) and self.content_type == "application/json":
            return self.body  # a bare JSON string TorchServe decoded: not JSON to parse again
        return parse_json(self.text())

    def json_structure(self) -> Any:
        """The body's JSON structure when :meth:`json` refused it for a number, a constant or
        a repeated key, else None: numbers read as 0, never converted; the last of a repeated
        key kept. What a KServe body needs to be recognised, so that its error is written in
        its protocol's error body. One more linear parse, only for a body already refused."""
        if not isinstance(self.body, bytes | bytearray | str):
            return None
        try:
            text = self.text()
            if json_depth(text) > MAX_JSON_DEPTH:
                return None
            return json.loads(text, parse_constant=_zero, parse_float=_zero, parse_int=_zero)
        except (InvalidInput, ValueError, RecursionError):
            return None

    def looks_like_json(self) -> bool:
        if isinstance(self.body, dict | list):
            return True
        if self.content_type.startswith("text/"):
            return False  # declared text, even when it starts with "[" or "{"
        if self.content_type == "application/json":
            return True
        head = self.body[:1] if isinstance(self.body, bytes | bytearray | str) else b""
        return head in (b"{", b"[", "{", "[")


def _counted_form_fields(value: str | None) -> int | None:
    """The form-field count worker_protocol handed on, when over the limit; else None."""
    if value is None or not value.isdigit() or len(value) > 12:
        return None
    count = int(value)
    return count if count > MAX_FORM_FIELDS else None


def reject_unknown_fields(payload: Mapping[str, Any], accepted: Iterable[str]) -> None:
    """Every task treats a JSON field it does not know the same way: 400 listing the known."""
    accepted = list(accepted)
    unknown = sorted(set(payload) - set(accepted))
    if unknown:
        shown = ", ".join(preview(key, quote=False) for key in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise InvalidInput(f"unknown field(s) {shown}{more}; accepted: {', '.join(accepted)}")


def preview(value: Any, limit: int = PREVIEW_CHARS, *, quote: bool = True) -> str:
    """A short rendering of a client's value for an error message, never the whole value.

    An answer longer than TorchServe's max_response_size kills the worker, and a client value
    quoted in full could make one; it would also copy user text into logs and proxies.
    """
    if isinstance(value, str):
        shown = value[:limit]
        text = json.dumps(shown, ensure_ascii=False) if quote else shown
        return text if len(value) <= limit else text + "…"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[:limit] + "…"


# ---- strict JSON -------------------------------------------------------------------------

_ESCAPE = re.compile(r"\\.", re.DOTALL)
_STRING = re.compile(r'"[^"]*"')


def json_depth(text: str) -> int:
    """How deeply the containers of a JSON text nest, found by a linear scan, no recursion.

    Escapes are dropped first, so every remaining quote delimits a string; strings are dropped
    next, so every remaining bracket is structural. On invalid JSON the count may be off past
    the first error, where a parser stops anyway.
    """
    if "[" not in text and "{" not in text:
        return 0
    # UTF-8 keeps ASCII bytes for ASCII characters only, so bracket bytes are brackets.
    structure = _STRING.sub("", _ESCAPE.sub("", text)).encode("utf-8", "surrogatepass")
    codes = np.frombuffer(structure, np.uint8)
    steps = (codes == ord("[")).astype(np.int8) + (codes == ord("{"))
    steps -= (codes == ord("]")).astype(np.int8) + (codes == ord("}"))
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def parse_json(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON: every malformed body, of any shape, is an :class:`InvalidInput`.

    Refused: nesting deeper than ``max_depth`` (checked before parsing), ``NaN`` and
    ``Infinity`` (not JSON), numbers that overflow a double, number literals longer than
    :data:`MAX_NUMBER_CHARS` (refused before conversion), and a key repeated in one object
    (which value was meant is ambiguous).
    """
    if text.count("[") + text.count("{") > max_depth and json_depth(text) > max_depth:
        raise InvalidInput(_too_deep(max_depth))
    try:
        return json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_short_int,
        )
    except RequestError:
        raise
    except json.JSONDecodeError as error:
        raise InvalidInput(f"the body is not valid JSON: {error.msg} at char {error.pos}") from None
    except RecursionError:  # a backstop: the depth scan above should have refused it
        raise InvalidInput(_too_deep(max_depth)) from None
    except ValueError:  # a backstop: _short_int and _finite_float refuse long numbers first
        raise InvalidInput(_TOO_LONG) from None


def check_parsed_json(value: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """The checks of :func:`parse_json` that still apply to an already-parsed value."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidInput(_NON_FINITE)
        elif isinstance(item, int) and item.bit_length() > _MAX_INT_BITS:
            raise InvalidInput(_TOO_LONG)
        elif isinstance(item, dict | list):
            depth += 1
            if depth > max_depth:
                raise InvalidInput(_too_deep(max_depth))
            children = item.values() if isinstance(item, dict) else item
            stack.extend(
                (child, depth) for child in children if isinstance(child, dict | list | float | int)
            )


_NON_FINITE = "the body is not valid JSON: NaN and Infinity are not JSON numbers"
_TOO_LONG = (
    f"the body is not valid JSON for this server: a number is longer than {MAX_NUMBER_CHARS} "
    "characters"
)
# The widest integer a literal of MAX_NUMBER_CHARS characters can write.
_MAX_INT_BITS = int(MAX_NUMBER_CHARS * math.log2(10)) + 1


def _too_deep(max_depth: int) -> str:
    return f"the JSON body nests more than {max_depth} levels deep"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidInput(
                    f"the JSON body repeats the key {preview(key)} in one object; "
                    "send each key once"
                )
            seen.add(key)
    return result


def _zero(text: str) -> int:
    return 0


def _reject_constant(name: str) -> Any:
    raise InvalidInput(_NON_FINITE)


def _short_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise InvalidInput(_TOO_LONG)
    return int(text)


def _finite_float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise InvalidInput(_TOO_LONG)
    value = float(text)
    if math.isinf(value):
        raise InvalidInput(
            "the body is not valid JSON for this server: a number is too large for a double"
        )
    return value


# ---- Content-Encoding --------------------------------------------------------------------


def decode_content(body: Any, encoding: str, limit: int = MAX_DECOMPRESSED_BYTES) -> Any:
    """The body with its ``Content-Encoding`` undone, inflating at most ``limit`` bytes."""
    codings = [c.strip().lower() for c in encoding.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return body
    if len(codings) > 1 or codings[0] not in CONTENT_ENCODINGS:
        raise UnsupportedMediaType(
            f"Content-Encoding {preview(encoding)} is not supported; send the body "
            "uncompressed, or compressed once with gzip or deflate"
        )
    coding = codings[0]
    if body is None or (isinstance(body, bytes | bytearray | str) and not body):
        return body
    if isinstance(body, str):
        data = body.encode("utf-8")  # TorchServe decoded a text/* body: re-encoding is lossless
    elif isinstance(body, bytes | bytearray):
        data = bytes(body)
    else:
        raise InvalidInput(f"the body is marked Content-Encoding {coding} but is not {coding} data")
    return inflate(data, coding, limit)


def inflate(
    data: bytes,
    coding: str,
    limit: int = MAX_DECOMPRESSED_BYTES,
    max_members: int = MAX_GZIP_MEMBERS,
) -> bytes:
    """gzip (every member) or deflate (zlib-wrapped or raw), refusing output past ``limit``.

    The input is fed in slices of :data:`INFLATE_SLICE` bytes and read through a memoryview,
    so nothing is copied more than once: zlib's ``unused_data`` after a member holds at most
    one slice, where feeding the whole rest would copy it again for every member (a body of
    300,000 empty members took 30 s that way). At most ``max_members`` gzip members are read.
    """
    gzip = coding in ("gzip", "x-gzip")
    if gzip:
        wbits = 16 + zlib.MAX_WBITS
    else:  # RFC 9110 deflate is zlib-wrapped; some clients send raw deflate
        zlib_header = len(data) >= 2 and data[0] & 0x0F == 8 and int.from_bytes(data[:2]) % 31 == 0
        wbits = zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS
    view = memoryview(data)
    chunks: list[bytes] = []
    size = position = members = 0
    while position < len(view):
        members += 1
        if members > max_members:
            raise PayloadTooLarge(
                f"the {coding} body has more than {max_members} members, the limit for a "
                "compressed body; compress the data as one stream"
            )
        inflater = zlib.decompressobj(wbits)
        while not inflater.eof:
            if position >= len(view):
                raise InvalidInput(f"the {coding} body is truncated")
            piece = view[position : position + INFLATE_SLICE]
            position += len(piece)
            try:
                # Output stops one byte past the limit; then the rest of the input is unread.
                chunk = inflater.decompress(piece, limit - size + 1)
            except zlib.error:
                raise InvalidInput(f"the body is not valid {coding} data") from None
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(
                    f"the {coding} body inflates to more than {limit} bytes, the limit for a "
                    "decompressed body; send less data"
                )
            chunks.append(chunk)
        position -= len(inflater.unused_data)  # the next member starts there
        if position < len(view) and not gzip:
            raise InvalidInput(f"the {coding} body has trailing data after the stream")
    return b"".join(chunks)


def decode_base64(text: str, what: str = "data") -> bytes:
    """Strict base64 (standard or URL-safe alphabet, optional data: URI prefix)."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    compact = "".join(text.split())
    if not compact:
        raise InvalidInput(f"{what} is empty")
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what} is not valid base64") from None


def _param_text(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value)
    return value
