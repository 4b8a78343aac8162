"""save_mode "aot_inductor": torch.export + AOTInductor, packaged as model.pt2 and served by our
handlers. Each compile takes about 20 s on 2 cores, so one tiny archive serves every check here.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import (
    RGB_SETUP,
    UserCNN,
    load_text_handler,
    run_batch,
    write_text_config,
)
from torch import nn

from ts_handlers import artifacts
from ts_handlers.config import ConfigError
from ts_handlers.export import METADATA_FILE, AOTInductorFormat, ExportError, ExportPlan
from ts_handlers.tools.build import REPORT_FILE, build_archive

TEXTS = [
    "tea",
    "the movie was great",
    "i hated every minute of this awful boring film, and the popcorn was stale too",
    "service was slow but the food was really tasty; we will come back next week " * 4,
    "What a WONDERFUL surprise!!!",
]


@pytest.fixture(scope="module")
def aoti_archive(tiny_text_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_text_aoti")
    config_dir = write_text_config(
        root / "tiny_text_aoti",
        tiny_text_checkpoint,
        save_mode="aot_inductor",
        inference_batch_size=3,
    )
    mar_path = build_archive(config_dir, root / "store", force=True)
    assert mar_path is not None
    return mar_path


@pytest.fixture(scope="module")
def aoti_handler(aoti_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_text_handler(aoti_archive, tmp_path_factory.mktemp("tiny_text_aoti_model"))


def answers(handler: Any, texts: list[str]) -> list[Any]:
    """One batch of single-text requests plus one request holding every text."""
    requests = [({"body": {"inputs": text}}, {}) for text in texts]
    requests.append(({"body": {"inputs": texts}}, {}))
    results = run_batch(handler, requests)
    assert [status for status, _, _ in results] == [200] * len(requests), results
    return [answer for _, answer, _ in results]


def test_the_archive_holds_a_pt2_package_verified_against_eager(aoti_archive: Path) -> None:
    with zipfile.ZipFile(aoti_archive) as archive:
        names = archive.namelist()
        report = json.loads(archive.read(REPORT_FILE))
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    assert "model.pt2" in names and "model.pt" not in names
    assert manifest["model"]["serializedFile"] == "model.pt2"
    assert report["save_mode"] == "aot_inductor"
    verification = report["verification"]["dynamic_shapes"]
    assert verification["reference"] == "eager" and verification["passed"]
    # Batches of 1, 3 and 8 at several sequence lengths: one package serves them all.
    shapes = {tuple(case["shape"]) for case in verification["cases"]}
    assert {size for size, _ in shapes} == {1, 3, 8} and len({n for _, n in shapes}) >= 2
    assert verification["max_abs_diff"] < 1e-4


def test_answers_equal_the_torchscript_archive(aoti_handler: Any, text_handlers: Any) -> None:
    served = answers(aoti_handler, TEXTS)
    expected = answers(text_handlers["torchscript"], TEXTS)
    for got, want in zip(served[:-1] + served[-1], expected[:-1] + expected[-1], strict=True):
        assert [item["label"] for item in got] == [item["label"] for item in want]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(got, want, strict=True)) < 1e-5


def test_the_package_carries_our_metadata(aoti_handler: Any) -> None:
    metadata = aoti_handler.export_metadata
    assert metadata["num_classes"] == 3  # the tiny checkpoint's labels
    assert metadata["verification"]["dynamic_shapes"]["passed"] is True


def test_a_one_token_input_runs(aoti_handler: Any) -> None:
    # The sequence dimension is exported from 1, not specialised away from it.
    model = aoti_handler.model
    with torch.inference_mode():
        logits = model(torch.tensor([[2], [5]]), torch.ones(2, 1, dtype=torch.long))
    assert logits.shape == (2, 3) and bool(torch.isfinite(logits).all())


def test_a_package_compiled_for_cpu_is_refused_on_another_device(aoti_handler: Any) -> None:
    with pytest.raises(ExportError, match="compiled for CPU and cannot run on cuda:0"):
        AOTInductorFormat().load(aoti_handler.model_dir / "model.pt2", torch.device("cuda:0"))


def test_a_package_for_instructions_this_cpu_lacks_is_refused_at_load(
    aoti_handler: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A CPU without the vector instructions the kernels were compiled for (AVX-512 on the
    # project's machine) would die on SIGILL at the first request.
    for name in artifacts._CPU_ISA_CHECKS:
        monkeypatch.setitem(artifacts._CPU_ISA_CHECKS, name, lambda: False)
    with pytest.raises(ExportError, match=r"compiled for AVX\S*.* this CPU lacks AVX"):
        AOTInductorFormat().load(aoti_handler.model_dir / "model.pt2", torch.device("cpu"))


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.export cannot capture one graph for it."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(1)
        if flat.sum() > 0:
            return flat[:, :5]
        return -flat[:, :5]


def test_a_model_torch_export_cannot_capture_is_refused_with_the_cause() -> None:
    plan = ExportPlan(model=DataDependent(), example_inputs=(torch.randn(2, 3, 8, 8),))
    with pytest.raises(ExportError) as caught:
        AOTInductorFormat().export(DataDependent(), plan, "trace")
    message = str(caught.value)
    assert message.startswith("torch.export could not capture the model")
    assert "data-dependent" in message.lower() and "save_mode 'torchscript'" in message
    assert len(message.splitlines()) <= 8  # the cause, not pages of guards


def test_a_users_torchscript_file_cannot_be_compiled_by_aot_inductor(tmp_path: Path) -> None:
    config_dir = tmp_path / "user_cnn"
    config_dir.mkdir()
    torch.jit.script(UserCNN().eval()).save(str(config_dir / "model.pt"))
    setup = {**RGB_SETUP, "serialized_file": "model.pt", "save_mode": "aot_inductor"}
    (config_dir / "setup_config.json").write_text(json.dumps(setup))
    with pytest.raises(ConfigError, match="exports an eager model.*use save_mode 'torchscript'"):
        build_archive(config_dir, tmp_path / "store", force=True)
    assert not (tmp_path / "store").exists()


def test_metadata_round_trips_through_the_pt2_extra_folder(aoti_handler: Any) -> None:
    # The upstream loader sees the same file: our JSON sits in the archive's extra/ folder.
    with zipfile.ZipFile(aoti_handler.model_dir / "model.pt2") as package:
        [name] = [n for n in package.namelist() if n.endswith(f"extra/{METADATA_FILE}")]
        assert json.loads(package.read(name)) == aoti_handler.export_metadata
