"""Run a real TorchServe on loopback for the demo, the integration tests and the benchmarks.

Every port is a free port on 127.0.0.1, token authorization stays on (the keys are read from
the ``key_file.json`` TorchServe writes), and all state (logs, pid file, keys) lives in a
private working folder, so several servers can run side by side and nothing leaks between runs.
The server runs in the foreground in its own process group and is always killed on exit.

    with LocalTorchServe(model_store="model_store", models=["mnist.mar"]) as server:
        print(server.client().predict("mnist", png_bytes))
"""

from __future__ import annotations

import contextlib
import json
import os
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

KEY_FILE = "key_file.json"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TorchServeStartError(RuntimeError):
    pass


class LocalTorchServe:
    def __init__(
        self,
        model_store: str | Path,
        models: Iterable[str] = (),
        *,
        python: str | Path | None = None,
        enable_model_api: bool = True,
        extra_properties: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 180.0,
    ) -> None:
        self.model_store = Path(model_store).resolve()
        self.models = list(models)
        # The worker runs on the Python that launches TorchServe; naming another one (a venv
        # without ts_handlers, say) changes what the handlers can import.
        self.python = str(python or sys.executable)
        self.enable_model_api = enable_model_api
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

    def start(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="ts-handlers-serve-"))
        ports = {
            name: free_port() for name in ("inference", "management", "metrics", "grpc_i", "grpc_m")
        }
        self.inference_url = f"http://127.0.0.1:{ports['inference']}"
        self.management_url = f"http://127.0.0.1:{ports['management']}"
        self.metrics_url = f"http://127.0.0.1:{ports['metrics']}"
        properties = {
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": self.metrics_url,
            "grpc_inference_address": "127.0.0.1",
            "grpc_management_address": "127.0.0.1",
            "grpc_inference_port": ports["grpc_i"],
            "grpc_management_port": ports["grpc_m"],
            "model_store": self.model_store,
            "default_workers_per_model": 1,
            "install_py_dep_per_model": "false",
            "disable_system_metrics": "true",
            **self.extra_properties,
        }
        config_path = self.workdir / "config.properties"
        config_path.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
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
        if self.enable_model_api:
            command.append("--enable-model-api")
        if self.models:
            command += ["--models", *[f"{Path(m).stem}={m}" for m in self.models]]
        private_tmp = self.workdir / "tmp"
        private_tmp.mkdir()
        env = {
            **os.environ,
            "TMPDIR": str(private_tmp),  # TorchServe's pid file lives in the temp dir
            "TEMP": str(private_tmp),
            "LOG_LOCATION": str(self.workdir / "logs"),
            "METRICS_LOCATION": str(self.workdir / "logs"),
            **self.env,
        }
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
        from ts_handlers.client import TorchServeClient

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
                    return False
        except requests.RequestException:
            return False
        return True
