"""A small synchronous client for TorchServe's inference and management REST APIs.

TorchServe splits its HTTP surface in two: the *inference* API (``/ping``, ``/predictions``,
``/explanations``) and the *management* API (``/models``).  With token authorization on (the
default in 0.12) each side wants its own bearer token, which the server writes to
``key_file.json`` at start-up, so this client keeps one key per API and picks the right one.

The lifecycle of a model maps onto four calls::

    with TorchServeClient.from_key_file("key_file.json") as ts:
        ts.register("my_model.mar", initial_workers=1)   # register + deploy
        ts.predict("my_model", {"text": "hello"})
        ts.scale("my_model", 0)                           # undeploy, stay registered
        ts.unregister("my_model")                         # delete

Every non-2xx answer becomes a :class:`TorchServeError`; transport failures (connection refused,
timeouts) are left as the ``requests`` exceptions they are, so callers can tell "the server said
no" apart from "there is no server".
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import requests

__all__ = ["TorchServeClient", "TorchServeError"]

DEFAULT_INFERENCE_URL = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"

# Synchronous register/scale calls block until the workers have loaded the model, which is far
# slower than an inference call; TorchServe itself waits up to 120 s per worker by default.
DEFAULT_LIFECYCLE_TIMEOUT = 300.0

# One entry of GET /models, or one description from GET /models/{name}.
ModelInfo = dict[str, Any]


class TorchServeError(RuntimeError):
    """TorchServe answered with a non-2xx status.

    ``body`` keeps the parsed JSON error (``{"code", "type", "message"}``) when the server sent
    one, otherwise the raw text, so callers can branch on ``error_type`` (for example
    ``"ModelNotFoundException"``) instead of parsing the message.
    """

    def __init__(self, status_code: int, message: str, body: Any = None) -> None:
        # Passing every field to RuntimeError keeps the exception picklable (multiprocessing).
        super().__init__(status_code, message, body)
        self.status_code = status_code
        self.message = message
        self.body = body

    @property
    def error_type(self) -> str | None:
        """TorchServe's exception class name, e.g. ``"ConflictStatusException"``."""
        if isinstance(self.body, dict):
            value = self.body.get("type")
            return value if isinstance(value, str) else None
        return None

    def __str__(self) -> str:
        return f"TorchServe returned HTTP {self.status_code}: {self.message}"


class TorchServeClient:
    """Talks to one TorchServe instance over a single pooled :class:`requests.Session`."""

    def __init__(
        self,
        inference_url: str = DEFAULT_INFERENCE_URL,
        management_url: str = DEFAULT_MANAGEMENT_URL,
        *,
        inference_key: str | None = None,
        management_key: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        self.inference_key = inference_key
        self.management_key = management_key
        self.timeout = timeout
        self._session = requests.Session()

    @classmethod
    def from_key_file(
        cls,
        path: str | Path = "key_file.json",
        inference_url: str = DEFAULT_INFERENCE_URL,
        management_url: str = DEFAULT_MANAGEMENT_URL,
        *,
        timeout: float = 30.0,
    ) -> TorchServeClient:
        """Build a client from the ``key_file.json`` TorchServe writes into its working dir.

        The file looks like ``{"management": {"key": ..., "expiration time": ...},
        "inference": {"key": ..., ...}, "API": {"key": ...}}``; only the first two keys are used
        because the ``API`` key merely authorises the token-refresh endpoint.  The keys expire
        (after 60 minutes by default), so build a new client from the file when they are renewed.
        """
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        try:
            inference_key = data["inference"]["key"]
            management_key = data["management"]["key"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a TorchServe key file: missing {exc}") from exc
        return cls(
            inference_url,
            management_url,
            inference_key=inference_key,
            management_key=management_key,
            timeout=timeout,
        )

    # -- lifecycle (management API) ---------------------------------------------------------

    def register(
        self,
        mar: str,
        *,
        model_name: str | None = None,
        initial_workers: int = 1,
        wait_until_ready: bool = True,
        timeout: float = DEFAULT_LIFECYCLE_TIMEOUT,
        **options: str | int | float | bool,
    ) -> dict[str, Any]:
        """Register (and, with ``initial_workers > 0``, deploy) a model archive.

        ``mar`` is what TorchServe calls ``url``: a file name inside the model store, a local
        path, or an HTTP(S) URL the server is allowed to fetch.  With ``wait_until_ready`` the
        server only answers once the workers are up, which is why ``timeout`` is much longer
        than the client default.  Extra ``options`` (``batch_size=4``, ``handler=...``) are
        passed through as query parameters.  Returns the server's ``{"status": "..."}``.
        """
        params: dict[str, Any] = {
            "url": mar,
            "initial_workers": initial_workers,
            "synchronous": _flag(wait_until_ready),
        }
        if model_name is not None:
            params["model_name"] = model_name
        params.update({key: _query_value(value) for key, value in options.items()})
        return self._management("POST", "/models", params=params, timeout=timeout).json()

    def scale(
        self,
        name: str,
        workers: int,
        *,
        version: str | None = None,
        wait: bool = True,
        timeout: float = DEFAULT_LIFECYCLE_TIMEOUT,
    ) -> dict[str, Any]:
        """Pin the model to exactly ``workers`` workers; ``0`` undeploys but keeps it registered.

        Setting min and max to the same number makes the result predictable: TorchServe would
        otherwise only guarantee ``min_worker``.  New workers show up in :meth:`describe` with
        status ``UNLOADING`` while they start, and a synchronous scale can answer before the
        last of them is ``READY``; with ``wait`` this method returns only once all ``workers``
        are ready (or raises ``TimeoutError`` after ``timeout`` seconds).
        """
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        params = {"min_worker": workers, "max_worker": workers, "synchronous": _flag(wait)}
        path = _path("models", name, version)
        deadline = time.monotonic() + timeout
        answer = self._management("PUT", path, params=params, timeout=timeout).json()
        while wait and self.ready_workers(name, version) < workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {workers} workers not ready after {timeout:.0f}s")
            time.sleep(0.2)
        return answer

    def unregister(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Delete a model (or one version of it) and stop its workers.

        TorchServe refuses (403) to remove the default version while other versions exist.
        """
        return self._management("DELETE", _path("models", name, version)).json()

    def list_models(self, *, page_size: int = 100) -> list[ModelInfo]:
        """Return every registered model as ``{"modelName": ..., "modelUrl": ...}``.

        Only each model's default version is listed.  TorchServe pages the listing and hands out a
        ``nextPageToken`` whenever a page is full, even if the next page is empty, so we stop
        on an empty page as well as on a missing token.
        """
        models: list[ModelInfo] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if token is not None:
                params["next_page_token"] = token
            page = self._management("GET", "/models", params=params).json()
            batch = page.get("models", [])
            models.extend(batch)
            next_token = page.get("nextPageToken")
            if not batch or not next_token or next_token == token:
                return models
            token = next_token

    def describe(self, name: str, version: str | None = None) -> ModelInfo:
        """Return the first entry of ``GET /models/{name}``: config plus a ``workers`` list.

        TorchServe always answers with a JSON list (one entry per version asked for, and a 404
        rather than an empty list); for one model or version the first entry is all there is.
        """
        return self._management("GET", _path("models", name, version)).json()[0]

    def ready_workers(self, name: str, version: str | None = None) -> int:
        """Count workers that can serve requests, the number that matters after :meth:`scale`."""
        workers = self.describe(name, version).get("workers", [])
        return sum(1 for worker in workers if worker.get("status") == "READY")

    # -- inference API ----------------------------------------------------------------------

    def ping(self) -> bool:
        """Health check: True when the server reports ``Healthy``.

        An ``Unhealthy`` report (HTTP 500 with a ``status`` field) returns False so the method
        can drive a readiness poll; any other error, such as a rejected token, still raises.
        """
        response = self._send("GET", self.inference_url, "/ping", self.inference_key, check=False)
        payload = _json_or_none(response)
        if isinstance(payload, dict) and "status" in payload:
            return payload["status"] == "Healthy"
        _raise_for_status(response)
        return False

    def predict(
        self,
        name: str,
        data: Any,
        *,
        version: str | None = None,
        content_type: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """Run inference and return the handler's answer.

        ``data`` travels as the TorchServe worker expects it: bytes go out raw as
        ``application/octet-stream`` (a form content type would make TorchServe parse the body
        into fields and the handler would lose it), str as ``text/plain`` (the handler gets a
        str), anything else as ``application/json`` (the handler gets the decoded object; the
        worker only decodes that exact content type).  ``content_type`` overrides the guess.
        The answer comes back parsed when it is JSON, else as bytes; see :func:`_decode`.
        """
        return self._post_inference(
            "predictions", name, data, version=version, content_type=content_type, params=params
        )

    def explain(
        self,
        name: str,
        data: Any,
        *,
        version: str | None = None,
        content_type: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """Ask the handler for an explanation instead of a result; same conventions as predict."""
        return self._post_inference(
            "explanations", name, data, version=version, content_type=content_type, params=params
        )

    def embed(
        self,
        name: str,
        inputs: str | Sequence[str],
        *,
        version: str | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        dimensions: int | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        truncation_side: str | None = None,
    ) -> Any:
        """Send ``{"inputs", <options>}`` to an embedding handler (docs/sentence_embedding.md:
        ``normalize``, ``truncate``, Matryoshka ``dimensions``, ``prompt_name`` or ``prompt``,
        ``truncation_side``).

        The handler's JSON comes back untouched: whether a single string yields one vector or a
        one-element list of vectors is the handler's decision, not this client's.  Options left
        as None are omitted so the handler's own defaults apply.
        """
        payload: dict[str, Any] = {"inputs": inputs if isinstance(inputs, str) else [*inputs]}
        options = {
            "normalize": normalize,
            "truncate": truncate,
            "dimensions": dimensions,
            "prompt_name": prompt_name,
            "prompt": prompt,
            "truncation_side": truncation_side,
        }
        payload.update({key: value for key, value in options.items() if value is not None})
        return self.predict(name, payload, version=version, content_type="application/json")

    def tokenize(
        self,
        name: str,
        inputs: str | Sequence[str],
        *,
        version: str | None = None,
        add_special_tokens: bool | None = None,
    ) -> Any:
        """A text model's tokens for ``inputs``, as it reads them (one list per input; see
        docs/openai.md#tokenize). The route sits under the model's version, so without
        ``version`` the default version is looked up first."""
        if version is None:
            version = str(self.describe(name)["modelVersion"])
        payload: dict[str, Any] = {"inputs": inputs if isinstance(inputs, str) else [*inputs]}
        if add_special_tokens is not None:
            payload["add_special_tokens"] = add_special_tokens
        return self._post_inference(
            "predictions",
            f"{quote(name, safe='')}/{quote(version, safe='')}/tokenize",
            payload,
            version=None,
            content_type="application/json",
            params=None,
            quoted=True,
        )

    # -- plumbing ---------------------------------------------------------------------------

    def _post_inference(
        self,
        endpoint: str,
        name: str,
        data: Any,
        *,
        version: str | None,
        content_type: str | None,
        params: dict[str, Any] | None,
        quoted: bool = False,
    ) -> Any:
        body, default_type = _encode(data)
        # quoted: ``name`` is already a path of quoted segments (a route under a version).
        path = f"/{endpoint}/{name}" if quoted else _path(endpoint, name, version)
        response = self._send(
            "POST",
            self.inference_url,
            path,
            self.inference_key,
            data=body,
            params=params,
            headers={"Content-Type": content_type or default_type},
        )
        return _decode(response)

    def _management(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self._send(method, self.management_url, path, self.management_key, **kwargs)

    def _send(
        self,
        method: str,
        base_url: str,
        path: str,
        key: str | None,
        *,
        check: bool = True,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        headers = dict(headers or {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        response = self._session.request(
            method,
            base_url + path,
            headers=headers,
            timeout=self.timeout if timeout is None else timeout,
            **kwargs,
        )
        if check:
            _raise_for_status(response)
        return response

    def close(self) -> None:
        """Release pooled connections; the client is unusable afterwards."""
        self._session.close()

    def __enter__(self) -> TorchServeClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _path(endpoint: str, name: str, version: str | None) -> str:
    # Quote so names/versions with "/" or spaces cannot silently hit a different endpoint.
    path = f"/{endpoint}/{quote(name, safe='')}"
    if version is not None:
        path += f"/{quote(version, safe='')}"
    return path


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _query_value(value: str | int | float | bool) -> str | int | float:
    # TorchServe's Java side expects lower-case booleans; Python's str(True) would be "True".
    return _flag(value) if isinstance(value, bool) else value


def _encode(data: Any) -> tuple[bytes, str]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data), "application/octet-stream"
    if isinstance(data, str):
        return data.encode("utf-8"), "text/plain; charset=utf-8"
    return json.dumps(data).encode("utf-8"), "application/json"


def _decode(response: requests.Response) -> Any:
    """Parse JSON answers, hand back anything else as bytes.

    Handlers rarely set a content type (TorchServe then sends none at all, even for the JSON
    it serialises from a returned dict or list), so an untyped body is tried as JSON first.
    """
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        return response.json()
    if not media_type:
        try:
            return json.loads(response.content)
        except ValueError:
            return response.content
    return response.content


def _json_or_none(response: requests.Response) -> Any:
    try:
        return json.loads(response.content)
    except ValueError:
        return None


def _raise_for_status(response: requests.Response) -> None:
    if 200 <= response.status_code < 300:
        return
    body = _json_or_none(response)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        message = body["message"]
    else:
        body = response.text
        message = body.strip() or response.reason or "no error message"
    raise TorchServeError(response.status_code, message, body)
