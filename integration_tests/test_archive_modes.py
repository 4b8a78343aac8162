"""Plugin archives need ts_handlers installed; self-contained ones serve on a stock TorchServe."""

from __future__ import annotations

import subprocess
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from serving import MODEL_STORE, ROOT, png_bytes

from ts_handlers.tools.build import build_archive
from ts_handlers.tools.server import LocalTorchServe


@pytest.fixture(scope="module")
def stock_python(tmp_path_factory) -> Path:
    """A Python that sees torch and TorchServe but not ts_handlers: a stock TorchServe install.

    The new environment borrows this one's site-packages through a path file; that adds the
    folder to sys.path without running its own .pth files, so the editable install of
    ts_handlers stays invisible.
    """
    env_dir = tmp_path_factory.mktemp("stock") / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    Path(site, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = (
        "import torch, ts, PIL\ntry:\n import ts_handlers\nexcept ImportError:\n print('absent')"
    )
    result = subprocess.run([python, "-c", probe], cwd=env_dir, capture_output=True, text=True)
    assert result.stdout.strip() == "absent", result.stderr
    return python


def python_files(mar: Path) -> list[str]:
    with zipfile.ZipFile(mar) as archive:
        return [name for name in archive.namelist() if name.endswith(".py")]


def manifest_handler(mar: Path) -> str:
    import json

    with zipfile.ZipFile(mar) as archive:
        return json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]["handler"]


def test_plugin_archive_carries_no_handler_code(torchserve, inference, heldout_digits):
    mar = MODEL_STORE / "mnist.mar"
    assert manifest_handler(mar) == "ts_handlers.image_classification:handle"
    assert python_files(mar) == []
    response = inference.post(
        f"{torchserve.inference_url}/predictions/mnist", data=png_bytes(heldout_digits[0][0])
    )
    assert response.status_code == 200


def test_self_contained_archive_serves_on_stock_torchserve(stock_python, tmp_path, heldout_digits):
    store = tmp_path / "store"
    mar = build_archive(
        ROOT / "archiver_configs/mnist", store, name="mnist_standalone", self_contained=True
    )
    assert mar is not None
    assert "ts_handlers/image_classification.py" in python_files(mar)
    assert manifest_handler(mar) == "ts_handlers_entry.py"
    images, labels = heldout_digits
    with LocalTorchServe(store, [mar.name], python=stock_python) as server:
        session = server.client()
        answers = [session.predict("mnist_standalone", png_bytes(image)) for image in images[:20]]
    correct = sum(
        answer[0]["label"] == str(label) for answer, label in zip(answers, labels[:20], strict=True)
    )
    assert correct >= 19


def test_plugin_archive_fails_to_load_without_the_package(stock_python, tmp_path):
    """The other side of plugin mode: a stock TorchServe cannot import the named module."""
    import shutil

    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(MODEL_STORE / "mnist.mar", store)
    server = LocalTorchServe(store, ["mnist.mar"], python=stock_python, startup_timeout=25)
    with pytest.raises(RuntimeError, match="No module named 'ts_handlers'"):
        server.start()
