"""The package a user installs: ``python -m build``, then the wheel alone in a fresh venv.

The sdist and wheel are built from a copy of the working tree (so nothing is written into it),
the wheel from the sdist as ``python -m build`` does by default. A new venv gets torch pinned
first (constraints.txt), then the wheel with the ``vision`` extra only, not editable; it must
not bring transformers, and TorchServe started from that venv must serve mnist.mar in plugin
mode (the archive names ``ts_handlers.image_classification:handle``, found in the installed
wheel) and name real held-out digits right.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from serving import DIGITS_HELDOUT, MODEL_STORE, ROOT, png_bytes, require

from ts_handlers.tools.server import LocalTorchServe

pytestmark = pytest.mark.integration

BUILD_TIMEOUT = 240  # seconds: the isolated build env installs setuptools and wheel first
INSTALL_TIMEOUT = 300
PROBE_TIMEOUT = 60
DIGITS_SENT = 8
# What the runtime reads from the package besides its modules.
PACKAGE_DATA = ["ts_handlers/metrics.yaml"]
# Top-level folders of the repository that are no part of what a user installs.
NOT_SHIPPED = ("tests/", "integration_tests/", "benchmarks/", "scripts/", "archiver_configs/")


def run(command: list[str], timeout: float, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result


def source_copy(destination: Path) -> Path:
    """The files git would commit (tracked, or new and not ignored), copied as they are now."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=PROBE_TIMEOUT,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a deleted, not yet committed file is still listed
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


@pytest.fixture(scope="module")
def timings() -> Iterator[dict[str, float]]:
    measured: dict[str, float] = {}
    yield measured
    print("wheel test timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in measured.items()))


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory, timings: dict[str, float]) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("wheel")
    source = source_copy(work / "source")
    started = time.monotonic()
    run(
        [sys.executable, "-m", "build", "--outdir", str(work / "dist"), str(source)],
        BUILD_TIMEOUT,
        work,
    )
    timings["build"] = time.monotonic() - started
    (wheel,) = (work / "dist").glob("ts_handlers-*.whl")
    (sdist,) = (work / "dist").glob("ts_handlers-*.tar.gz")
    for built in (wheel, sdist):
        print(f"{built.name}: {built.stat().st_size / 1024:.0f} KiB")
    return {"wheel": wheel, "sdist": sdist, "work": work}


def test_wheel_holds_the_runtime_and_the_tooling_and_nothing_else(dist: dict[str, Path]) -> None:
    names = zipfile.ZipFile(dist["wheel"]).namelist()
    modules = {name for name in names if name.startswith("ts_handlers/")}
    for module in (
        "ts_handlers/base.py",
        "ts_handlers/image_classification.py",
        "ts_handlers/sequence_classification.py",
        "ts_handlers/tools/cli.py",
        "ts_handlers/tools/kserve.py",
        "ts_handlers/tools/explanation_html.py",
        *PACKAGE_DATA,
    ):
        assert module in modules, module
    outside = [name for name in names if not name.startswith(("ts_handlers/", "ts_handlers-"))]
    assert outside == [], outside
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(dist["wheel"]).read(entry_points).decode()
    assert "ts-handlers = ts_handlers.tools.cli:main" in scripts

    with tarfile.open(dist["sdist"]) as sdist:
        # Every member sits under ts_handlers-<version>/.
        members = [member.name.partition("/")[2] for member in sdist.getmembers()]
    assert "ts_handlers/metrics.yaml" in members
    assert not any(name.endswith((".mar", ".pt", ".npz")) for name in members)
    assert not any(name.startswith((".venv/", "model_store/", "build/")) for name in members)


def test_fresh_venv_with_the_vision_extra_serves_mnist(
    dist: dict[str, Path], timings: dict[str, float]
) -> None:
    archive = require(MODEL_STORE / "mnist.mar")
    heldout = np.load(require(DIGITS_HELDOUT))
    venv = dist["work"] / "venv"
    run([sys.executable, "-m", "venv", str(venv)], PROBE_TIMEOUT, dist["work"])
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--no-compile"]
    constraints = ["-c", str(ROOT / "constraints.txt")]

    started = time.monotonic()
    # torch first and pinned: left to the resolver, it would fetch a multi-gigabyte CUDA build.
    run([*pip, *constraints, "torch==2.13.0"], INSTALL_TIMEOUT, dist["work"])
    timings["install torch"] = time.monotonic() - started
    started = time.monotonic()
    run([*pip, *constraints, f"{dist['wheel']}[vision]"], INSTALL_TIMEOUT, dist["work"])
    timings["install wheel[vision]"] = time.monotonic() - started

    probe = subprocess.run(
        [str(python), "-c", "import ts_handlers, PIL; print(ts_handlers.__file__)"],
        cwd=dist["work"],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT,
    )
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).is_relative_to(venv), probe.stdout  # the wheel, not ROOT
    for absent in ("transformers", "captum", "sentence_transformers"):
        missing = subprocess.run(
            [str(python), "-c", f"import {absent}"],
            cwd=dist["work"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
        )
        assert missing.returncode != 0 and "ModuleNotFoundError" in missing.stderr, absent

    store = dist["work"] / "store"
    store.mkdir()
    shutil.copyfile(archive, store / archive.name)
    started = time.monotonic()
    with LocalTorchServe(store, [archive.name], python=python, startup_timeout=180) as server:
        timings["serve: start to READY"] = time.monotonic() - started
        session = requests.Session()
        session.headers.update(server.auth_headers())
        url = f"{server.inference_url}/predictions/mnist"
        images, labels = heldout["images"][:DIGITS_SENT], heldout["labels"][:DIGITS_SENT]
        predicted = []
        for image in images:
            answer = session.post(url, data=png_bytes(image), timeout=60)
            assert answer.status_code == 200, answer.text
            predicted.append(answer.json()[0]["label"])
        assert predicted == [str(label) for label in labels]
        # The worker that answered runs on the venv's Python, so it imported the wheel.
        with server.client() as client:
            (worker,) = client.describe("mnist")["workers"]
        command = Path(f"/proc/{worker['pid']}/cmdline").read_bytes().split(b"\0")
        assert command[0].decode() == str(python), command
