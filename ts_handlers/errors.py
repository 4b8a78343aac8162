"""Errors that carry the HTTP status a client should see.

A handler raises these from any stage; the base catches them per request, so one bad request in
a dynamic batch answers with its own 4xx while its neighbours still get their predictions. The
body has the same shape as TorchServe's own error responses.
"""

from __future__ import annotations

import json
from http import HTTPStatus


class RequestError(ValueError):
    """The request cannot be served as sent; the message tells the client how to fix it."""

    status: HTTPStatus = HTTPStatus.BAD_REQUEST

    def __init__(self, message: str, status: HTTPStatus | int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = HTTPStatus(status)

    @property
    def error_type(self) -> str:
        return type(self).__name__

    def to_json(self) -> str:
        return error_body(self.status, self.error_type, self.message)


class InvalidInput(RequestError):
    status = HTTPStatus.BAD_REQUEST


class PayloadTooLarge(RequestError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class NotFound(RequestError):
    """A route (the URL after ``/predictions/<model>/<version>/``) this model does not serve."""

    status = HTTPStatus.NOT_FOUND


class UnsupportedMediaType(RequestError):
    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class TooManyRequests(RequestError):
    """The worker's share for this kind of work is taken; the answer carries ``Retry-After``."""

    status = HTTPStatus.TOO_MANY_REQUESTS

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# An error body stays small whatever a message quotes: an answer longer than TorchServe's
# max_response_size would kill the worker instead of reaching the client.
MAX_MESSAGE_CHARS = 1000


def shorten(message: str) -> str:
    """``message`` cut to ``MAX_MESSAGE_CHARS``: every protocol's error body uses this."""
    if len(message) > MAX_MESSAGE_CHARS:
        return message[: MAX_MESSAGE_CHARS - 1] + "…"
    return message


def error_body(status: HTTPStatus | int, error_type: str, message: str) -> str:
    return json.dumps({"code": int(status), "type": error_type, "message": shorten(message)})


def first_lines(error: BaseException, count: int = 1) -> str:
    """An error's first ``count`` lines (the cause, before pages of guards and links); its
    type's name when it has no message."""
    lines = str(error).strip().splitlines()
    return "\n".join(lines[:count]) if lines else type(error).__name__


def check_count(count: int, limit: int, unit: str, key: str) -> None:
    """Refuses ``count`` items of one request (texts, images, instances) over ``limit`` with a
    413 naming the key that sets it."""
    if count > limit:
        raise PayloadTooLarge(f"{count} {unit} in one request; the limit is {limit} ({key})")
