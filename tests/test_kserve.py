"""``ts-handlers kserve``: the folder KServe mounts and the InferenceService, checked offline.

The manifest is validated against KServe's own CRD schema (a pruned copy in tests/data, its
source named there) and against the rules KServe keeps in Go, each with its file named.
Archives here are small zips with the files the layout reads; integration_tests/
test_kserve_layout.py serves a real one from the written config.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ts_handlers.tools import cli, kserve

SCHEMA_FILE = Path(__file__).parent / "data" / "kserve_inferenceservice_v1beta1.schema.yaml"


def make_archive(
    store: Path,
    name: str,
    *,
    model_config: str | None = "batchSize: 4\nmaxBatchDelay: 25\nresponseTimeout: 30\n",
    setup: dict[str, Any] | None = None,
    handler: str = "ts_handlers.image_classification:handle",
    model_name: str | None = None,
) -> Path:
    """A .mar holding what the layout reads: the manifest, model-config.yaml, setup."""
    store.mkdir(parents=True, exist_ok=True)
    path = store / f"{name}.mar"
    manifest: dict[str, Any] = {
        "runtime": "python",
        "model": {"modelName": model_name or name, "handler": handler, "modelVersion": "1.0"},
        "archiverVersion": "0.12.0",
    }
    with zipfile.ZipFile(path, "w") as archive:
        if model_config is not None:
            manifest["model"]["configFile"] = "model-config.yaml"
            archive.writestr("model-config.yaml", model_config)
        archive.writestr("setup_config.json", json.dumps(setup or {"mode": "image_classification"}))
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
    return path


def read_properties(path: Path) -> dict[str, str]:
    """key=value lines, as KServe's kserve_wrapper reads them (split at the first '=')."""
    properties = {}
    for line in path.read_text(encoding="ascii").splitlines():
        key, _, value = line.partition("=")
        properties[key] = value
    return properties


def unknown_fields(document: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare: Kubernetes would drop them without a word."""
    found = []
    if isinstance(document, dict) and "properties" in schema:
        for key, value in document.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    return found


def test_layout_and_manifest_follow_kserves_schema(tmp_path: Path) -> None:
    store = tmp_path / "store"
    mnist = make_archive(store, "mnist")
    sentiment = make_archive(
        store,
        "sentiment_eager",
        model_config="minWorkers: 1\nmaxWorkers: 2\nbatchSize: 8\nmaxBatchDelay: 20\n",
        setup={"mode": "sequence_classification", "captum_explanation": True},
        handler="ts_handlers.sequence_classification:handle",
    )
    out = tmp_path / "out"

    layout = kserve.write_layout(
        out, [mnist, sentiment], name="reviews-v2", storage_uri="s3://bucket/ts", protocol="v2"
    )

    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "config/config.properties",
        "config/metrics.yaml",
        "inferenceservice.yaml",
        "model-store/mnist.mar",
        "model-store/sentiment_eager.mar",
    ]
    assert (out / "model-store" / "mnist.mar").read_bytes() == mnist.read_bytes()
    assert (out / "config" / "metrics.yaml").read_bytes() == kserve.packaged_metrics_config()
    assert "ts_metrics" in yaml.safe_load((out / "config" / "metrics.yaml").read_text())

    manifest = yaml.safe_load(layout.manifest.read_text())
    schema = yaml.safe_load(SCHEMA_FILE.read_text())
    jsonschema.validate(manifest, schema)
    assert unknown_fields(manifest, schema) == []
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1"
    assert manifest["kind"] == "InferenceService"
    assert manifest["metadata"]["name"] == "reviews-v2"
    model = manifest["spec"]["predictor"]["model"]
    assert model == {
        "modelFormat": {"name": "pytorch"},  # the runtime's supportedModelFormats
        "protocolVersion": "v2",
        "storageUri": "s3://bucket/ts",
    }
    scraping = manifest["metadata"]["annotations"]["serving.kserve.io/enable-prometheus-scraping"]
    assert scraping == "true"  # a string: Kubernetes annotations are strings


def test_config_properties_as_kserves_torchserve_runtime_reads_them(tmp_path: Path) -> None:
    store = tmp_path / "store"
    archives = [
        make_archive(store, "mnist"),
        make_archive(
            store, "ner", model_config=None, handler="ts_handlers.token_classification:handle"
        ),
    ]
    layout = kserve.write_layout(tmp_path / "out", archives)

    properties = read_properties(layout.config)
    # KServe's runtime: --model-store=/mnt/models/model-store; its wrapper forwards to 8085 and
    # Prometheus scrapes 8082 (config/runtimes/kserve-torchserve.yaml).
    assert properties["model_store"] == "/mnt/models/model-store"
    assert properties["inference_address"] == "http://127.0.0.1:8085"
    assert properties["management_address"] == "http://127.0.0.1:8085"
    assert properties["metrics_address"] == "http://0.0.0.0:8082"
    assert properties["metrics_mode"] == "prometheus"
    assert properties["metrics_config"] == "/mnt/models/config/metrics.yaml"
    # No TS_* variable (KServe's TS_SERVICE_ENVELOPE, a Service's links) overrides the file.
    assert properties["enable_envvars_config"] == "false"
    assert properties["allowed_urls"].startswith("(?-i)file:///mnt/models/model")
    # The wrapper sends no token; the APIs listen on loopback only (docs/kserve.md).
    assert properties["disable_token_authorization"] == "true"
    assert properties["enable_model_api"] == "false"
    assert "service_envelope" not in properties  # the handlers read KServe bodies themselves

    snapshot = json.loads(properties["model_snapshot"])
    assert snapshot["modelCount"] == 2
    assert sorted(snapshot["models"]) == ["mnist", "ner"]  # the .mar names
    assert snapshot["models"]["mnist"]["1.0"] == {
        "defaultVersion": True,
        "marName": "mnist.mar",
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": 4,  # from the archive's model-config.yaml
        "maxBatchDelay": 25,
        "responseTimeout": 30,
    }
    # No model-config.yaml: TorchServe's own defaults, written out.
    assert snapshot["models"]["ner"]["1.0"]["batchSize"] == 1
    assert snapshot["models"]["ner"]["1.0"]["maxBatchDelay"] == 100


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("mnist", True),
        ("ts-handlers-2", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("Mnist", False),
        ("2mnist", False),
        ("mnist-", False),
        ("sentiment_eager", False),
        ("", False),
    ],
)
def test_service_names_follow_kserves_webhook(name: str, valid: bool) -> None:
    # KServe: pkg/apis/serving/v1beta1/inference_service_validation.go, IsvcNameFmt.
    if valid:
        kserve.check_service_name(name)
    else:
        with pytest.raises(kserve.LayoutError, match="lower-case letters"):
            kserve.check_service_name(name)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"protocol": "grpc-v2"}, "choose one of v1, v2"),
        ({"storage_uri": "ftp://host/models"}, "KServe downloads from gs://"),
        ({"name": "Not_A_Name"}, "lower-case letters"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(
    tmp_path: Path, options: dict[str, str], message: str
) -> None:
    archive = make_archive(tmp_path / "store", "mnist")
    with pytest.raises(kserve.LayoutError, match=message):
        kserve.write_layout(tmp_path / "out", [archive], **options)
    assert not (tmp_path / "out").exists()


def test_archives_the_layout_cannot_serve_are_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    renamed = make_archive(store, "copy", model_name="mnist")
    with pytest.raises(kserve.LayoutError, match="calls its model 'mnist'"):
        kserve.write_layout(tmp_path / "out", [renamed])
    bad_config = make_archive(store, "bad", model_config="batchSize: eight\n")
    with pytest.raises(kserve.LayoutError, match="batchSize is 'eight'"):
        kserve.write_layout(tmp_path / "out", [bad_config])
    not_a_zip = store / "broken.mar"
    not_a_zip.write_bytes(b"not a zip")
    with pytest.raises(kserve.LayoutError, match="not a readable TorchServe archive"):
        kserve.write_layout(tmp_path / "out", [not_a_zip])


def test_an_earlier_layout_is_replaced_only_with_force(tmp_path: Path) -> None:
    store = tmp_path / "store"
    out = tmp_path / "out"
    kserve.write_layout(out, [make_archive(store, "mnist")])
    (out / "notes.txt").write_text("mine")
    other = make_archive(store, "other")

    with pytest.raises(kserve.LayoutError, match="pass --force"):
        kserve.write_layout(out, [other])
    kserve.write_layout(out, [other], force=True)

    assert sorted(p.name for p in (out / "model-store").iterdir()) == ["other.mar"]
    assert (out / "notes.txt").read_text() == "mine"  # not ours: left alone


def test_command_writes_every_archive_in_the_store_and_names_the_extras(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    store = tmp_path / "store"
    make_archive(store, "mnist")
    make_archive(
        store,
        "sentiment_eager",
        setup={"mode": "sequence_classification", "captum_explanation": True},
        handler="ts_handlers.sequence_classification:handle",
    )
    out = tmp_path / "out"
    argv = ["kserve", str(out), "--model-store", str(store), "--image", "registry/ts:1"]

    assert cli.main(argv) == 0

    printed = capsys.readouterr().out
    assert "model:    mnist (mnist.mar; batchSize 4, maxBatchDelay 25 ms" in printed
    assert "pip install 'ts-handlers[explain,vision]'" in printed
    manifest = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    assert manifest["spec"]["predictor"]["model"]["image"] == "registry/ts:1"
    assert manifest["metadata"]["name"] == "ts-handlers"
    assert manifest["spec"]["predictor"]["model"]["storageUri"] == "pvc://ts-handlers-models"

    assert cli.main(argv) == 1  # the second run would overwrite the first
    assert "pass --force" in capsys.readouterr().err
    assert cli.main(["kserve", str(tmp_path / "o2"), "--model-store", str(tmp_path / "none")]) == 1
    assert "no .mar in" in capsys.readouterr().err
