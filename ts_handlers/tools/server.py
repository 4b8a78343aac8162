"""Run a real TorchServe on loopback for the demo, the integration tests and the benchmarks.

Safe defaults, written explicitly into the ``config.properties`` it generates (see
docs/security.md): every address on 127.0.0.1 unless ``host`` says otherwise, token
authorization on (the keys are read from the ``key_file.json`` TorchServe writes), the model
API (register/unregister at run time) off unless ``enable_model_api=True``, ``allowed_urls``
limited to ``.mar`` files inside the model store, and explicit request and response size
limits. The worker forwards bodies undecoded (``decode_input_request=false``) so the
handler's strict JSON parser sees every body. ``/metrics`` answers in Prometheus format
(``metrics_mode=prometheus``, with no token: keep it on loopback) with the handlers' per-stage
metrics declared by ``ts_handlers/metrics.yaml`` (docs/metrics.md). All state (logs, pid file,
keys) lives in a private working folder, so several servers can run side by side and nothing
leaks between runs.
The server runs in the foreground in its own process group and is always killed on exit.

    with LocalTorchServe(model_store="model_store", models=["mnist.mar"]) as server:
        print(server.client().predict("mnist", png_bytes))
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import requests

from ts_handlers.metrics import METRICS_CONFIG
from ts_handlers.payload import DEFAULT_MAX_REQUEST_SIZE, DEFAULT_MAX_RESPONSE_SIZE

KEY_FILE = "key_file.json"
CONFIG_FILE = "config.properties"
LOOPBACK = "127.0.0.1"
# TorchServe's own size defaults come from payload.py (the runtime bounds bodies and answers by
# them) and are written out so a reader of config.properties sees the limits. A body over
# max_request_size gets the frontend's 413 (with an empty body); an answer over
# max_response_size makes the frontend drop the worker's connection, so the worker restarts.
PORT_NAMES = ("inference", "management", "metrics", "grpc_i", "grpc_m")
# The worker's environment unless the caller's says otherwise. GNU OpenMP's idle threads spin
# 300,000 times before sleeping by default, taking the cores the frontend and the next batch
# need; spinning 1,000 times gave MiniLM 3-6% more requests/s and a 30% lower p99 at 16
# concurrent clients on 2 cores (docs/performance.md).
WORKER_ENV = {"GOMP_SPINCOUNT": "1000"}


def free_port(host: str = LOOPBACK) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def model_store_urls(model_store: str | Path) -> str:
    """An ``allowed_urls`` value that admits only ``file://`` URLs of archives in the store.

    TorchServe matches each comma-separated entry as a case-insensitive Java regex against the
    whole ``url`` of a register call, and only for ``http(s)://`` and ``file://`` URLs; a plain
    archive name (``url=mnist.mar``) is always looked up inside the model store. So this refuses
    every download: nothing outside the store can be registered.
    """
    store = Path(model_store).resolve().as_posix()
    return store_urls_pattern(store)


def store_urls_pattern(store: str) -> str:
    """The ``allowed_urls`` regex for archives directly in the store at POSIX path ``store``.

    Case-sensitive (``(?-i)`` overrides TorchServe's CASE_INSENSITIVE: on a case-sensitive file
    system ``FILE:///STORE/`` is another folder), and the file name is plain characters only:
    Java decodes a ``file:`` URL's percent escapes when it opens it, so ``%2e%2e%2f`` in a name
    that ``[^/]+`` admitted would be ``../`` (tests/test_server_defaults.py, and on a real
    server integration_tests/test_hostile_bodies.py).
    """
    for character in ",%":
        if character in store:
            raise ValueError(
                f"the model store path {store!r} has {character!r}, which allowed_urls cannot "
                "hold (TorchServe splits the value on commas, and Java decodes % in file: URLs)"
            )
    return f"(?-i)file://{re.escape(store)}/[A-Za-z0-9_][A-Za-z0-9_.-]*\\.mar"


def properties_text(properties: dict[str, Any]) -> str:
    """``key=value`` lines as java.util.Properties reads them back (backslashes escaped)."""
    lines = []
    for key, value in properties.items():
        text = str(value)
        if "\n" in text or "\r" in text:
            raise ValueError(f"property {key} has a line break")
        escaped = "".join(
            "\\\\" if ch == "\\" else ch if ord(ch) < 127 else _unicode_escape(ch) for ch in text
        )
        if escaped.startswith(" "):
            escaped = "\\" + escaped
        lines.append(f"{key}={escaped}\n")
    return "".join(lines)


def _unicode_escape(ch: str) -> str:
    units = ch.encode("utf-16-be")
    return "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2))


class TorchServeStartError(RuntimeError):
    pass


class ModelLoadError(TorchServeStartError):
    """Every worker of a model failed to load it: TorchServe would retry in a loop forever."""

    def __init__(self, model: str, reason: str, log_tail: str = "") -> None:
        self.model = model
        self.reason = reason
        self.summary = f"model {model!r} failed to load in every worker: {reason}"
        super().__init__(f"{self.summary}\n{log_tail}" if log_tail else self.summary)


# How the model log shows a failed load (ts/model_service_worker.py). Each worker line is tagged
# "W-<port>-<model>_<version>-stdout MODEL_LOG - ". A handler whose initialize raises ends the
# worker with "Backend worker process died." and the traceback, whose last line is the
# exception with the handler's own message; some errors are logged as "Failed to load model
# <model>, exception <message>" instead.
_WORKER_LINE = re.compile(r"W-\d+-(?P<model>.+)_[^_\s]+-std(?:out|err) MODEL_LOG - (?P<text>.*)$")
_DIED = "Backend worker process died."
_FAILED_TO_LOAD = re.compile(r"^Failed to load model \S+, exception (?P<message>.*)$")
_EXCEPTION_LINE = re.compile(
    r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit)\b:? ?.*$"
)


class LocalTorchServe:
    def __init__(
        self,
        model_store: str | Path,
        models: Iterable[str] = (),
        *,
        python: str | Path | None = None,
        enable_model_api: bool = False,
        host: str = LOOPBACK,
        max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
        extra_properties: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 180.0,
    ) -> None:
        """``enable_model_api``: allow register/unregister at run time (model store only).

        ``host``: the address every API binds to. ``extra_properties`` are written last and
        override anything above, token authorization included: a deliberate choice.
        """
        if min(max_request_size, max_response_size) < 1:
            raise ValueError("max_request_size and max_response_size must be positive")
        self.model_store = Path(model_store).resolve()
        self.models = list(models)
        # The worker runs on the Python that launches TorchServe; naming another one (a venv
        # without ts_handlers, say) changes what the handlers can import.
        self.python = str(python or sys.executable)
        self.enable_model_api = enable_model_api
        self.host = host
        self.max_request_size = max_request_size
        self.max_response_size = max_response_size
        self.extra_properties = extra_properties or {}
        self.env = env or {}
        self.startup_timeout = startup_timeout
        self.workdir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.inference_url = ""
        self.management_url = ""
        self.metrics_url = ""
        self.keys: dict[str, str] = {}

    # ---- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> LocalTorchServe:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def properties(self, ports: dict[str, int]) -> dict[str, Any]:
        """The ``config.properties`` entries for the given ports (see ``PORT_NAMES``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return {
            "inference_address": f"http://{host}:{ports['inference']}",
            "management_address": f"http://{host}:{ports['management']}",
            "metrics_address": f"http://{host}:{ports['metrics']}",
            "grpc_inference_address": self.host,
            "grpc_management_address": self.host,
            "grpc_inference_port": ports["grpc_i"],
            "grpc_management_port": ports["grpc_m"],
            "model_store": self.model_store,
            "disable_token_authorization": "false",
            "enable_model_api": "true" if self.enable_model_api else "false",
            "allowed_urls": model_store_urls(self.model_store),
            "max_request_size": self.max_request_size,
            "max_response_size": self.max_response_size,
            # The worker hands the handler raw bytes, which it parses strictly (payload.py);
            # TorchServe sets the worker's TS_DECODE_INPUT_REQUEST from this, over any env.
            "decode_input_request": "false",
            "default_workers_per_model": 1,
            "install_py_dep_per_model": "false",
            "disable_system_metrics": "true",
            # /metrics in Prometheus format, with the handlers' per-stage metrics declared
            # (the frontend drops a backend metric its metrics_config does not declare).
            "metrics_mode": "prometheus",
            "metrics_config": METRICS_CONFIG,
            **self.extra_properties,
        }

    def write_config(self, folder: Path, ports: dict[str, int]) -> Path:
        """Writes ``config.properties`` into ``folder`` (starts nothing) and returns its path."""
        path = Path(folder) / CONFIG_FILE
        path.write_text(properties_text(self.properties(ports)), encoding="ascii")
        return path

    def start(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="ts-handlers-serve-"))
        ports = {name: free_port(self.host) for name in PORT_NAMES}
        config_path = self.write_config(self.workdir, ports)
        properties = self.properties(ports)
        self.inference_url = properties["inference_address"]
        self.management_url = properties["management_address"]
        self.metrics_url = properties["metrics_address"]
        command = [
            self.python,
            "-c",
            "from ts.model_server import start; start()",
            "--start",
            "--foreground",
            "--ncs",
            "--ts-config",
            str(config_path),
            "--model-store",
            str(self.model_store),
        ]
        if self.models:
            command += ["--models", *[f"{Path(m).stem}={m}" for m in self.models]]
        private_tmp = self.workdir / "tmp"
        private_tmp.mkdir()
        env = self.server_env(self.workdir)
        self.log_path = self.workdir / "torchserve.out"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def server_env(self, workdir: Path) -> dict[str, str]:
        """The environment TorchServe starts with: the caller's, less every ``TS_*`` variable.

        TorchServe reads ``TS_CONFIG_FILE`` before ``--ts-config`` (both its launcher and its
        frontend), and with ``enable_envvars_config`` any ``TS_<PROPERTY>`` overrides the
        written file, so a variable left in a shell would replace the safe defaults. Only
        ``env=`` (the caller's deliberate choice) may set them.
        """
        inherited = {key: value for key, value in os.environ.items() if not key.startswith("TS_")}
        private_tmp = workdir / "tmp"
        return {
            **WORKER_ENV,
            **inherited,
            "TMPDIR": str(private_tmp),  # TorchServe's pid file lives in the temp dir
            "TEMP": str(private_tmp),
            "LOG_LOCATION": str(workdir / "logs"),
            "METRICS_LOCATION": str(workdir / "logs"),
            **self.env,
        }

    def stop(self) -> None:
        if self.process is not None:
            # Frontend and workers share one process group: signal the group, never leave one.
            for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=grace)
            self.process = None
        if self.workdir is not None and not os.environ.get("TS_HANDLERS_KEEP_SERVER_DIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    # ---- use -------------------------------------------------------------------------------

    def client(self, timeout: float = 60.0):  # -> TorchServeClient
        from ts_handlers.tools.client import TorchServeClient

        return TorchServeClient(
            self.inference_url,
            self.management_url,
            inference_key=self.keys.get("inference"),
            management_key=self.keys.get("management"),
            timeout=timeout,
        )

    def auth_headers(self, api: str = "inference") -> dict[str, str]:
        key = self.keys.get(api)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def log_tail(self, lines: int = 60) -> str:
        logs = []
        if self.workdir is not None:
            for path in [self.workdir / "torchserve.out", *sorted(self.workdir.glob("logs/*.log"))]:
                if path.is_file():
                    logs.append(
                        f"--- {path.name}\n"
                        + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                    )
        return "\n".join(logs)

    # ---- internals -------------------------------------------------------------------------

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        expected = {Path(model).stem for model in self.models}
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise TorchServeStartError(f"TorchServe exited during start-up\n{self.log_tail()}")
            if not self.keys:
                self.keys = self._read_keys()
            if self.keys and self._models_ready(expected):
                return
            time.sleep(0.5)
        raise TorchServeStartError(
            f"TorchServe was not ready within {self.startup_timeout:.0f}s\n{self.log_tail()}"
        )

    def load_failures(self, model: str) -> list[str]:
        """The handler's error line of each failed load of ``model`` so far, read from the
        model log: the exception that ended each worker that died during its load."""
        if self.workdir is None:
            return []
        path = self.workdir / "logs" / "model_log.log"
        if not path.is_file():
            return []
        failures: list[str] = []
        dying = False  # inside the traceback of a worker that died
        for line in path.read_text(errors="replace").splitlines():
            match = _WORKER_LINE.search(line)
            if match is None or match.group("model") != model:
                continue
            text = match.group("text").strip()
            failed = _FAILED_TO_LOAD.match(text)
            if failed:
                failures.append(failed.group("message"))
            elif text == _DIED:
                dying = True
                failures.append("the worker died while loading the model (see the model log)")
            elif dying and _EXCEPTION_LINE.match(text):
                failures[-1] = text  # the traceback's last exception line is the cause
        return failures

    def _check_crash_loop(self, model: str, workers: int) -> None:
        """Raises once every worker of ``model`` has failed its load: with none READY, each
        failure is retried forever, and waiting out the start-up timeout tells no one why."""
        failures = self.load_failures(model)
        if failures and len(failures) >= max(workers, 1):
            raise ModelLoadError(model, failures[-1], self.log_tail())

    def _read_keys(self) -> dict[str, str]:
        assert self.workdir is not None
        path = self.workdir / KEY_FILE
        if not path.is_file():
            return {}
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError:
            return {}  # still being written
        return {api: entry["key"] for api, entry in raw.items() if isinstance(entry, dict)}

    def _models_ready(self, expected: set[str]) -> bool:
        try:
            ping = requests.get(
                f"{self.inference_url}/ping", headers=self.auth_headers(), timeout=2
            )
            if ping.status_code != 200:
                return False
            for name in expected:
                response = requests.get(
                    f"{self.management_url}/models/{name}",
                    headers=self.auth_headers("management"),
                    timeout=2,
                )
                if response.status_code != 200:
                    return False
                workers = response.json()[0].get("workers", [])
                if not any(worker.get("status") == "READY" for worker in workers):
                    self._check_crash_loop(name, len(workers))
                    return False
        except requests.RequestException:
            return False
        return True
