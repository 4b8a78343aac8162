"""Hugging Face Hub ids in ``ts-handlers init`` and ``model_name`` (issue 21).

A hub-layout cache is written in the test (``models--owner--name/refs/main`` and
``snapshots/<commit>/``) and the hub is offline (``HF_HUB_OFFLINE=1``): nothing is downloaded.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from harness import save_tiny_classifier

from ts_handlers.tools import cli, hub

REPO_ID = "tiny-org/tiny-bert-sst2"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf_home" / "hub"
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    save_tiny_classifier(repo / "snapshots" / COMMIT, "bert", "single_label")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_hub_id_is_read_from_the_cache_and_its_revision_recorded(
    hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the id must not be mistaken for a folder here
    assert hub.looks_like_hub_id(REPO_ID) and not hub.looks_like_hub_id("../models/x")
    configs = tmp_path / "configs"
    assert cli.main(["init", REPO_ID, "--configs-root", str(configs)]) == 0
    config_dir = configs / "tiny-bert-sst2"
    setup = json.loads((config_dir / "setup_config.json").read_text())
    assert setup["mode"] == "sequence_classification" and setup["model_name"] == REPO_ID
    assert (config_dir / "index_to_name.json").is_file()  # the checkpoint's id2label

    assert cli.main(["build", str(config_dir), "--model-store", str(tmp_path / "store")]) == 0
    with zipfile.ZipFile(tmp_path / "store" / "tiny-bert-sst2.mar") as archive:
        report = json.loads(archive.read("export_report.json"))
        archived_setup = json.loads(archive.read("setup_config.json"))
    assert report["model_source"] == {"hub_id": REPO_ID, "revision": COMMIT}
    assert report["verification"]["dynamic_shapes"]["passed"]
    assert archived_setup["model_name"] == REPO_ID


def test_an_id_missing_from_the_cache_offline_fails_with_what_to_do(
    hub_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = "distilbert/distilbert-base-uncased-finetuned-sst-2-english"
    assert cli.main(["init", missing, "--configs-root", str(tmp_path / "configs")]) == 1
    error = capsys.readouterr().err
    assert f"{missing!r} is not a local folder, and not in the Hugging Face cache" in error
    assert "HF_HUB_OFFLINE=1" in error and f"hf download {missing}" in error
    assert not (tmp_path / "configs").exists()
