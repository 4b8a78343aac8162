"""What KServe's TorchServe runtime mounts, and an ``InferenceService`` that points at it.

``ts-handlers kserve OUT_DIR`` writes::

    OUT_DIR/
      config/config.properties   model_snapshot (one entry per archive), addresses, metrics
      config/metrics.yaml        the package's metrics.yaml (metrics_config points at it)
      model-store/<name>.mar     the archives, copied
      inferenceservice.yaml      serving.kserve.io/v1beta1 InferenceService, predictor pytorch

KServe copies the folder ``storageUri`` names to ``/mnt/models`` and starts its TorchServe
runtime (``config/runtimes/kserve-torchserve.yaml`` in KServe's repository) with
``--model-store=/mnt/models/model-store --ts-config=/mnt/models/config/config.properties``.
In that image a KServe model server (pytorch/serve's ``kubernetes/kserve/kserve_wrapper``)
listens on port 8080, reads the model names from ``model_snapshot``, and forwards each KServe
v1 or v2 request body unchanged to TorchServe's ``/predictions/<name>`` on
``inference_address``. Our handlers read KServe v1 and v2 bodies themselves, so no
``service_envelope`` is set.

Token authorization is off in this layout, on purpose: the wrapper is TorchServe's only client
in the pod and sends no token (it would get 400 on every call), and TorchServe's inference and
management APIs listen on 127.0.0.1 only, so nothing outside the pod reaches them; requests
from outside go through KServe's port 8080 and whatever authentication the cluster puts in
front of it (docs/kserve.md). The model API (register and unregister) stays off.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ts_handlers.config import SETUP_CONFIG_FILE
from ts_handlers.payload import DEFAULT_MAX_REQUEST_SIZE, DEFAULT_MAX_RESPONSE_SIZE
from ts_handlers.tasks import Task, tasks
from ts_handlers.tools.server import properties_text, store_urls_pattern

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
MODEL_FORMAT = "pytorch"
# What KServe's TorchServe runtime mounts and where it reads the config from.
MOUNT = PurePosixPath("/mnt/models")
CONFIG_DIR = "config"
MODEL_STORE_DIR = "model-store"
CONFIG_FILE = "config.properties"
METRICS_FILE = "metrics.yaml"
MANIFEST_FILE = "inferenceservice.yaml"
# The ports the kserve_wrapper and KServe's runtime expect: the wrapper forwards to 8085 and
# the runtime's prometheus.kserve.io/port annotation names 8082.
INFERENCE_PORT = 8085
METRICS_PORT = 8082
GRPC_INFERENCE_PORT = 7070
GRPC_MANAGEMENT_PORT = 7071
# KServe protocols our handlers answer in their own bodies (grpc-v2 would need TorchServe's
# gRPC API, which this layout does not configure).
PROTOCOLS = ("v1", "v2")
# KServe's webhook: pkg/apis/serving/v1beta1/inference_service_validation.go, IsvcNameFmt. The
# name is also a Kubernetes object name, at most 63 characters.
SERVICE_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_SERVICE_NAME_LENGTH = 63
# KServe's controller: pkg/controller/v1beta1/inferenceservice/utils/utils.go,
# SupportedStorageURIPrefixList.
STORAGE_URI_PREFIXES = (
    "gs://",
    "s3://",
    "pvc://",
    "file://",
    "https://",
    "http://",
    "hdfs://",
    "webhdfs://",
    "oci://",
    "oci+native://",
    "oci+fetch://",
    "hf://",
)
DEFAULT_SERVICE_NAME = "ts-handlers"
DEFAULT_STORAGE_URI = "pvc://ts-handlers-models"
# TorchServe's own defaults for a model-config.yaml key that is absent; workers follow
# default_workers_per_model, which this layout sets to 1.
WORKER_DEFAULTS = {
    "minWorkers": 1,
    "maxWorkers": 1,
    "batchSize": 1,
    "maxBatchDelay": 100,
    "responseTimeout": 120,
}


class LayoutError(ValueError):
    """An archive or an option the layout cannot be written for; the message says why."""


@dataclass(frozen=True)
class Archive:
    """What the layout needs from one ``.mar``: read from its manifest and configs."""

    path: Path
    name: str
    version: str
    handler: str
    mode: str | None
    explains: bool
    workers: dict[str, int]

    @property
    def plugin_mode(self) -> bool:
        """True when the handler is an installed module (``ts_handlers.<task>:handle``)."""
        return ":" in self.handler

    @property
    def extras(self) -> list[str]:
        """The ts-handlers extras the serving image needs for this archive."""
        if self.explains:
            return ["explain"]  # the text extra and captum
        task = self.task
        return [task.extra] if task is not None and task.extra else []

    @property
    def packages(self) -> list[str]:
        """What else the serving image installs: the package of a third party's task."""
        task = self.task
        return [task.package] if task is not None and task.package else []

    @property
    def task(self) -> Task | None:
        """The registry's task for the archive's mode (built-in or an installed package's)."""
        return tasks().get(self.mode) if self.mode else None


def read_archive(path: Path) -> Archive:
    """The manifest, ``model-config.yaml`` and ``setup_config.json`` of one archive."""
    import yaml

    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
            model = manifest["model"]
            config_file = model.get("configFile")
            model_config = (
                yaml.safe_load(archive.read(config_file)) if config_file in names else None
            )
            setup = (
                json.loads(archive.read(SETUP_CONFIG_FILE)) if SETUP_CONFIG_FILE in names else {}
            )
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, yaml.YAMLError) as error:
        raise LayoutError(f"{path} is not a readable TorchServe archive: {error}") from None
    name = path.stem
    if model.get("modelName", name) != name:
        # TorchServe registers a snapshot entry under its key; a manifest that disagrees would
        # leave KServe's URL and TorchServe's model name apart.
        raise LayoutError(
            f"{path.name} calls its model {model.get('modelName')!r}; rename the file to "
            f"{model.get('modelName')}.mar or rebuild it as {name}"
        )
    return Archive(
        path=path,
        name=name,
        version=str(model.get("modelVersion") or "1.0"),
        handler=str(model.get("handler", "")),
        mode=setup.get("mode") if isinstance(setup, dict) else None,
        explains=bool(isinstance(setup, dict) and setup.get("captum_explanation")),
        workers=_worker_settings(path.name, model_config),
    )


def _worker_settings(archive: str, model_config: Any) -> dict[str, int]:
    if model_config is None:
        model_config = {}
    if not isinstance(model_config, dict):
        raise LayoutError(f"{archive}: model-config.yaml is not a mapping")
    settings = {}
    for key, default in WORKER_DEFAULTS.items():
        value = model_config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise LayoutError(
                f"{archive}: model-config.yaml {key} is {value!r}; it needs a whole number >= 0"
            )
        settings[key] = value
    if settings["maxWorkers"] < settings["minWorkers"]:
        settings["maxWorkers"] = settings["minWorkers"]
    return settings


def model_snapshot(archives: Sequence[Archive]) -> dict[str, Any]:
    """TorchServe's ``model_snapshot``: every archive, loaded at start with its own settings."""
    return {
        "name": "startup.cfg",
        "modelCount": len(archives),
        "models": {
            archive.name: {
                archive.version: {
                    "defaultVersion": True,
                    "marName": archive.path.name,
                    **archive.workers,
                }
            }
            for archive in archives
        },
    }


def torchserve_properties(archives: Sequence[Archive]) -> dict[str, Any]:
    """``config/config.properties`` as KServe's TorchServe runtime reads it."""
    model_store = MOUNT / MODEL_STORE_DIR
    loopback = f"http://127.0.0.1:{INFERENCE_PORT}"
    return {
        # The wrapper in the same pod is the only client; it reads both addresses from here.
        "inference_address": loopback,
        "management_address": loopback,
        # Prometheus scrapes the pod's address, so metrics listen on every interface.
        "metrics_address": f"http://0.0.0.0:{METRICS_PORT}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_management_address": "127.0.0.1",
        "grpc_inference_port": GRPC_INFERENCE_PORT,
        "grpc_management_port": GRPC_MANAGEMENT_PORT,
        # No TS_* variable overrides this file. KServe's runtime sets TS_SERVICE_ENVELOPE (our
        # handlers want none), and Kubernetes adds <SERVICE>_* variables for the namespace's
        # services (enableServiceLinks): a Service named "ts" would bring TS_PORT, ... With
        # envvars on, any TS_<PROPERTY> would replace a hardened setting here.
        "enable_envvars_config": "false",
        "disable_token_authorization": "true",
        "enable_model_api": "false",
        "model_store": model_store,
        "allowed_urls": store_urls_pattern(str(model_store)),
        "max_request_size": DEFAULT_MAX_REQUEST_SIZE,
        "max_response_size": DEFAULT_MAX_RESPONSE_SIZE,
        # The handler parses every body strictly itself (payload.py), KServe's included.
        "decode_input_request": "false",
        "default_workers_per_model": 1,
        "install_py_dep_per_model": "false",
        "enable_metrics_api": "true",
        "metrics_mode": "prometheus",
        "metrics_config": MOUNT / CONFIG_DIR / METRICS_FILE,
        "model_snapshot": json.dumps(model_snapshot(archives), separators=(",", ":")),
    }


def inference_service(
    name: str,
    storage_uri: str,
    protocol: str = "v1",
    image: str | None = None,
) -> dict[str, Any]:
    """The ``InferenceService`` manifest, in the current ``predictor.model`` form."""
    check_service_name(name)
    if protocol not in PROTOCOLS:
        raise LayoutError(f"protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    if not storage_uri.startswith(STORAGE_URI_PREFIXES):
        raise LayoutError(
            f"storage URI {storage_uri!r}: KServe downloads from {', '.join(STORAGE_URI_PREFIXES)}"
        )
    model: dict[str, Any] = {
        "modelFormat": {"name": MODEL_FORMAT},
        "protocolVersion": protocol,
        "storageUri": storage_uri,
    }
    if image:
        model["image"] = image
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            # KServe adds Prometheus' scrape annotations, with the runtime's port (8082).
            "annotations": {"serving.kserve.io/enable-prometheus-scraping": "true"},
        },
        "spec": {"predictor": {"model": model}},
    }


def check_service_name(name: str) -> None:
    if len(name) > MAX_SERVICE_NAME_LENGTH or not SERVICE_NAME.match(name):
        raise LayoutError(
            f"name {name!r}: an InferenceService name is lower-case letters, digits and '-', "
            f"starts with a letter, ends with a letter or digit, at most "
            f"{MAX_SERVICE_NAME_LENGTH} characters"
        )


def packaged_metrics_config() -> bytes:
    """The package's own ``metrics.yaml``: the metrics TorchServe exports for our handlers."""
    return (importlib.resources.files("ts_handlers") / METRICS_FILE).read_bytes()


@dataclass(frozen=True)
class Layout:
    out_dir: Path
    config: Path
    metrics_config: Path
    model_store: Path
    manifest: Path
    archives: tuple[Archive, ...]


def written_paths(out_dir: Path) -> list[Path]:
    """What ``write_layout`` owns in ``out_dir``: replaced with ``force``, else refused."""
    return [out_dir / CONFIG_DIR, out_dir / MODEL_STORE_DIR, out_dir / MANIFEST_FILE]


def write_layout(
    out_dir: Path,
    archive_paths: Iterable[Path],
    *,
    name: str = DEFAULT_SERVICE_NAME,
    storage_uri: str = DEFAULT_STORAGE_URI,
    protocol: str = "v1",
    image: str | None = None,
    force: bool = False,
) -> Layout:
    """Writes ``out_dir`` (see the module docstring); every check runs before any file is."""
    import yaml

    archives = tuple(read_archive(Path(path)) for path in archive_paths)
    if not archives:
        raise LayoutError("no archives to serve; build some first (ts-handlers build --all)")
    names = [archive.name for archive in archives]
    if len(set(names)) != len(names):
        raise LayoutError(f"two archives share a model name: {', '.join(sorted(names))}")
    manifest = inference_service(name, storage_uri, protocol, image)
    properties = properties_text(torchserve_properties(archives))
    metrics_config = packaged_metrics_config()
    existing = [path for path in written_paths(out_dir) if path.exists()]
    if existing and not force:
        raise LayoutError(
            f"{', '.join(str(path) for path in existing)} exist; pass --force to replace them"
        )
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()

    config_dir = out_dir / CONFIG_DIR
    model_store = out_dir / MODEL_STORE_DIR
    config_dir.mkdir(parents=True)
    model_store.mkdir()
    (config_dir / CONFIG_FILE).write_text(properties, encoding="ascii")
    (config_dir / METRICS_FILE).write_bytes(metrics_config)
    for archive in archives:
        shutil.copyfile(archive.path, model_store / archive.path.name)
    manifest_path = out_dir / MANIFEST_FILE
    manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return Layout(
        out_dir=out_dir,
        config=config_dir / CONFIG_FILE,
        metrics_config=config_dir / METRICS_FILE,
        model_store=model_store,
        manifest=manifest_path,
        archives=archives,
    )
