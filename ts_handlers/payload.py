"""One incoming request, whatever form TorchServe hands it over in.

TorchServe gives a handler one dict per request. The body sits under ``body`` (a raw POST) or
``data`` (a form field) as ``bytes``/``bytearray``, as ``str`` for ``text/*`` content, or as an
already-parsed dict/list for ``application/json``; query parameters and other form fields sit
beside it. :class:`Request` normalises that, and its accessors turn every malformed body into an
:class:`~ts_handlers.errors.InvalidInput` rather than an exception from deep inside a library.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ts_handlers.errors import InvalidInput

BODY_KEYS = ("body", "data")
JSON_TYPES = (dict, list, str, int, float, bool)


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
        cls, row: Any, content_type: str = "", headers: Mapping[str, Any] | None = None
    ) -> Request:
        content_type = content_type.split(";")[0].strip().lower()
        headers = {
            str(key).lower(): value
            for key, value in (headers or {}).items()
            if isinstance(value, str)
        }
        if not isinstance(row, Mapping):
            return cls(body=row, content_type=content_type, headers=headers)
        body_key = next((key for key in BODY_KEYS if key in row), None)
        params = {key: _param_text(value) for key, value in row.items() if key != body_key}
        body = row.get(body_key) if body_key else None
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
        """The body parsed as JSON; TorchServe has already parsed application/json bodies."""
        if isinstance(self.body, JSON_TYPES) and not isinstance(self.body, str):
            return self.body
        if isinstance(self.body, str) and self.content_type == "application/json":
            return self.body  # a bare JSON string TorchServe decoded: not JSON to parse again
        text = self.text()
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise InvalidInput(
                f"the body is not valid JSON: {error.msg} at char {error.pos}"
            ) from None

    def looks_like_json(self) -> bool:
        if isinstance(self.body, dict | list):
            return True
        if self.content_type.startswith("text/"):
            return False  # declared text, even when it starts with "[" or "{"
        if self.content_type == "application/json":
            return True
        head = self.body[:1] if isinstance(self.body, bytes | bytearray | str) else b""
        return head in (b"{", b"[", "{", "[")


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


def int_option(name: str, value: Any, default: int | None, minimum: int = 1) -> int | None:
    """Reads an integer option that came from a JSON field or a query parameter."""
    if value is None:
        return default
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise InvalidInput(f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be an integer, got {json.dumps(value)}")
    if value < minimum:
        raise InvalidInput(f"{name} must be at least {minimum}, got {value}")
    return value


def bool_option(name: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "false", "0"):
        return value.strip().lower() in ("true", "1")
    raise InvalidInput(f"{name} must be true or false, got {json.dumps(value)}")


def _param_text(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value)
    return value
