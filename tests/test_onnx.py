"""save_mode "onnx": torch.onnx's graph, verified against eager, served by ONNX Runtime through
the same loading interface as model.pt and model.pt2. One tiny archive serves most checks."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import load_text_handler, run_batch, write_text_config
from torch import nn

from ts_handlers import precision
from ts_handlers.config import ConfigError, OnnxRuntimeConfig, parse_config
from ts_handlers.export import METADATA_FILE, ExportError, ExportPlan, format_for
from ts_handlers.onnx_export import ONNXFormat, _fewest_kept, linear_layers
from ts_handlers.onnx_format import ONNXModel
from ts_handlers.sequence_classification import SequenceClassificationConfig
from ts_handlers.tools.build import REPORT_FILE, build_archive

TEXTS = [
    "tea",
    "the movie was great",
    "i hated every minute of this awful boring film, and the popcorn was stale too",
    "service was slow but the food was really tasty; we will come back next week " * 4,
    "What a WONDERFUL surprise!!!",
]


@pytest.fixture(scope="module")
def onnx_archive(tiny_text_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_text_onnx")
    config_dir = write_text_config(
        root / "tiny_text_onnx",
        tiny_text_checkpoint,
        save_mode="onnx",
        inference_batch_size=3,
        onnxruntime={"intra_op_num_threads": 1},
    )
    mar_path = build_archive(config_dir, root / "store", force=True)
    assert mar_path is not None
    return mar_path


@pytest.fixture(scope="module")
def onnx_handler(onnx_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_text_handler(onnx_archive, tmp_path_factory.mktemp("tiny_text_onnx_model"))


def answers(handler: Any, texts: list[str]) -> list[Any]:
    """One batch of single-text requests plus one request holding every text."""
    requests = [({"body": {"inputs": text}}, {}) for text in texts]
    requests.append(({"body": {"inputs": texts}}, {}))
    results = run_batch(handler, requests)
    assert [status for status, _, _ in results] == [200] * len(requests), results
    return [answer for _, answer, _ in results]


def test_the_archive_holds_an_onnx_graph_verified_against_eager(onnx_archive: Path) -> None:
    with zipfile.ZipFile(onnx_archive) as archive:
        names = archive.namelist()
        report = json.loads(archive.read(REPORT_FILE))
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    assert "model.onnx" in names and "model.pt" not in names
    assert manifest["model"]["serializedFile"] == "model.onnx"
    assert report["save_mode"] == "onnx"
    verification = report["verification"]["dynamic_shapes"]
    assert verification["reference"] == "eager" and verification["passed"]
    # The same shapes as every format: batches of 1, 3 and 8 at several sequence lengths.
    shapes = {tuple(case["shape"]) for case in verification["cases"]}
    assert {size for size, _ in shapes} == {1, 3, 8} and len({n for _, n in shapes}) >= 2
    assert verification["max_abs_diff"] < 1e-4


def test_answers_equal_the_torchscript_archive(onnx_handler: Any, text_handlers: Any) -> None:
    served = answers(onnx_handler, TEXTS)
    expected = answers(text_handlers["torchscript"], TEXTS)
    for got, want in zip(served[:-1] + served[-1], expected[:-1] + expected[-1], strict=True):
        assert [item["label"] for item in got] == [item["label"] for item in want]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(got, want, strict=True)) < 1e-5


def test_onnx_runtime_runs_it_with_the_archives_settings(onnx_handler: Any) -> None:
    assert isinstance(onnx_handler.model, ONNXModel)
    options = onnx_handler.model.session.get_session_options()
    assert options.intra_op_num_threads == 1  # setup_config.json onnxruntime
    runtime = onnx_handler.describe()["export"]["runtime"]
    assert runtime["name"] == "onnxruntime" and runtime["intra_op_num_threads"] == 1
    assert runtime["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert onnx_handler.describe()["config"]["onnxruntime"]["intra_op_num_threads"] == 1


def test_the_graph_carries_our_metadata(onnx_handler: Any) -> None:
    import onnx

    metadata = onnx_handler.export_metadata
    assert metadata["num_classes"] == 3  # the tiny checkpoint's labels
    assert metadata["verification"]["dynamic_shapes"]["passed"] is True
    # What a C/C++ program reads: the model's metadata_props entry ts_handlers.json.
    graph = onnx.load(str(onnx_handler.model_dir / "model.onnx"))
    props = {entry.key: entry.value for entry in graph.metadata_props}
    assert json.loads(props[METADATA_FILE])["num_classes"] == 3
    assert [value.name for value in graph.graph.input] == ["input_ids", "attention_mask"]


def test_a_one_token_input_runs(onnx_handler: Any) -> None:
    with torch.inference_mode():
        logits = onnx_handler.model(torch.tensor([[2], [5]]), torch.ones(2, 1, dtype=torch.long))
    assert logits.shape == (2, 3) and bool(torch.isfinite(logits).all())


def test_a_device_onnx_runtime_has_no_provider_for_is_refused(onnx_handler: Any) -> None:
    import onnxruntime

    # CUDA when this ONNX Runtime is the CPU build (as here); a device it never runs otherwise.
    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    device = torch.device("mps" if cuda else "cuda:0")
    with pytest.raises(ExportError, match=f"no execution provider for {device}"):
        ONNXFormat().load(onnx_handler.model_dir / "model.onnx", device)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            {"onnxruntime": {"intra_op_threads": 2}},
            "unknown key onnxruntime.intra_op_threads; valid keys are graph_optimization_level",
        ),
        ({"onnxruntime": {"intra_op_num_threads": -1}}, "intra_op_num_threads must be at least 0"),
        (
            {"onnxruntime": {"graph_optimization_level": "max"}},
            "onnxruntime.graph_optimization_level='max' is not supported; choose one of "
            "'disable', 'basic', 'extended', 'all'",
        ),
        ({"onnxruntime": 3}, "onnxruntime must be an object, got 3"),
        (
            {"save_mode": "torchscript", "onnxruntime": {"intra_op_num_threads": 2}},
            "onnxruntime settings apply to save_mode 'onnx'",
        ),
        ({"dtype": "bfloat16"}, "dtype 'bfloat16' is not supported there"),
    ],
)
def test_onnx_settings_are_checked(setup: dict, message: str) -> None:
    raw = {"mode": "sequence_classification", "save_mode": "onnx", **setup}
    with pytest.raises(ConfigError) as caught:
        parse_config(SequenceClassificationConfig, raw, "setup_config.json")
    assert message in str(caught.value)


def test_settings_reach_the_session() -> None:
    from ts_handlers.onnx_format import session_options

    options = session_options(
        OnnxRuntimeConfig(
            graph_optimization_level="disable", intra_op_num_threads=2, allow_spinning=False
        )
    )
    assert options.intra_op_num_threads == 2
    assert str(options.graph_optimization_level).endswith("ORT_DISABLE_ALL")
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


class DataDependent(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(1)
        if flat.sum() > 0:
            return flat[:, :5]
        return -flat[:, :5]


def test_a_model_the_exporter_cannot_capture_is_refused_with_the_cause() -> None:
    plan = ExportPlan(model=DataDependent(), example_inputs=(torch.randn(2, 3, 8, 8),))
    with pytest.raises(ExportError) as caught:
        format_for("onnx").export(DataDependent(), plan, "trace")
    message = str(caught.value)
    assert message.startswith("torch.onnx could not export the model")
    assert "save_mode 'torchscript'" in message and len(message.splitlines()) <= 8


def test_the_fewest_kept_layers_are_found_for_every_threshold() -> None:
    # Passing from `needed` kept layers on: the search must return exactly `needed`.
    for total in (1, 2, 5, 36):
        for needed in range(total):
            calls: list[int] = []

            def passes(count: int, needed: int = needed, calls: list[int] = calls) -> bool:
                calls.append(count)
                return count >= needed

            assert _fewest_kept(total, passes) == needed
            assert len(calls) <= 2 * total.bit_length() + 1
        assert _fewest_kept(total, lambda count: False) is None


@pytest.fixture
def calibration_file(tmp_path: Path) -> Path:
    from harness import TINY_TEXT_CORPUS

    path = tmp_path / "calibration.txt"
    texts = [f"{text} ({n})" for n in range(4) for text in TINY_TEXT_CORPUS]
    path.write_text("# calibration texts\n" + "\n".join(texts) + "\n")
    return path


def test_int8_keeps_the_worst_layers_in_float32_until_the_gate_passes(
    tiny_text_checkpoint: Path,
    calibration_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A gate that passes only with float32 scores exactly: every layer is ranked and kept,
    # and the build refuses, naming the gate.
    monkeypatch.setitem(
        precision.GATES, ("dynamic_int8", "classifier"), precision.Gate(max_score_diff=0.0)
    )
    setup = {"save_mode": "onnx", "quantization": "dynamic_int8"}
    config_dir = write_text_config(
        tmp_path / "strict", tiny_text_checkpoint, calibration_file=str(calibration_file), **setup
    )
    with pytest.raises(ExportError, match="no Linear layer can be quantized.*max_score_diff"):
        build_archive(config_dir, tmp_path / "store", force=True)
    assert not (tmp_path / "store").exists()

    # A gate every model passes: every layer int8, the recipe and figures recorded, and the
    # served answers are probabilities from the int8 graph.
    monkeypatch.setitem(
        precision.GATES, ("dynamic_int8", "classifier"), precision.Gate(max_score_diff=1.0)
    )
    config_dir = write_text_config(
        tmp_path / "int8", tiny_text_checkpoint, calibration_file=str(calibration_file), **setup
    )
    mar_path = build_archive(config_dir, tmp_path / "store", force=True)
    assert mar_path is not None
    with zipfile.ZipFile(mar_path) as archive:
        report = json.loads(archive.read(REPORT_FILE))
    reduced = report["verification"]["precision"]
    recipe = reduced["recipe"]
    assert recipe["float32_layers"] == [] and recipe["candidates_tried"] == [0]
    assert recipe["quantized_layers"] == len(recipe["impact"]) >= 2
    # Layers are named by the torch module they came from, ranked by their own int8 error.
    assert all(name.startswith("model.") for name in recipe["impact"])
    assert list(recipe["impact"].values()) == sorted(recipe["impact"].values(), reverse=True)
    assert 0.0 < reduced["calibration"]["max_score_diff"] <= 1.0
    handler = load_text_handler(mar_path, tmp_path / "model")
    ops = {node.op_type for node in _graph(handler.model_dir / "model.onnx").node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    [(status, answer, _)] = run_batch(handler, [({"body": {"inputs": "a great film"}}, {})])
    assert status == 200 and 0.0 <= answer[0]["score"] <= 1.0


def _graph(path: Path) -> Any:
    import onnx

    return onnx.load(str(path)).graph


def test_linear_layers_are_the_matmuls_with_constant_weights(onnx_handler: Any) -> None:
    layers = linear_layers((onnx_handler.model_dir / "model.onnx").read_bytes())
    # The tiny BERT: 2 layers x (query, key, value, attention output, intermediate, output)
    # and the classifier head; attention's own MatMuls have no constant weight.
    assert "model.bert.encoder.layer.0.attention.self.query" in layers.values()
    assert len(layers) >= 12
