"""Reduced-precision exports: the config keys, the gates' figures, and the build's plumbing.

The gates' thresholds are meant for trained models; a tiny random model's near-uniform scores
would flip under any rounding. So the build tests here set the gate (monkeypatch) to one the
tiny model passes, or one it cannot, and check what the build writes or refuses. The real
models are gated at the real thresholds in integration_tests/test_reduced_precision.py.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from harness import TINY_TEXT_CORPUS, load_text_handler, run_batch, write_text_config

from ts_handlers import precision
from ts_handlers.config import ConfigError, parse_config
from ts_handlers.export import ExportError
from ts_handlers.sequence_classification import SequenceClassificationConfig
from ts_handlers.tools.build import REPORT_FILE, build_archive


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ({"dtype": "bfloat16", "quantization": "dynamic_int8"}, "leave dtype at 'float32'"),
        ({"dtype": "bfloat16", "save_mode": "pretrained"}, "save_mode 'pretrained' serves"),
        ({"dtype": "float64"}, "dtype='float64' is not supported"),
        ({"quantization": "int4"}, "quantization='int4' is not supported"),
    ],
)
def test_precision_keys_are_checked(setup: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        parse_config(
            SequenceClassificationConfig, {"mode": "sequence_classification", **setup}, "setup"
        )


def test_embedding_figures():
    expected = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    actual = expected.clone()
    actual[2] = torch.tensor([0.6, 0.8])  # cosine 0.8 to where it was
    figures = precision.compare(expected, actual, "embedding")
    assert figures["min_cosine"] == pytest.approx(0.8)
    # Row 1's nearest neighbour moves from row 0 to the rotated row 2: one of four disagrees.
    assert figures["neighbour_agreement"] == pytest.approx(0.75)


def test_classifier_figures_and_gate_failures():
    expected = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]])
    actual = torch.tensor([[0.89, 0.11], [0.6, 0.4], [0.2, 0.8]])
    figures = precision.compare(expected, actual, "classifier")
    assert figures["top1_agreement"] == pytest.approx(2 / 3)
    assert figures["max_score_diff"] == pytest.approx(0.2)
    failures = precision.GATES[("dtype", "classifier")].failures(figures)
    assert [failure.split()[0] for failure in failures] == ["top1_agreement", "max_score_diff"]
    assert not precision.Gate(min_top1_agreement=0.5).failures(figures)


def test_cpu_support_is_reported():
    support = precision.cpu_support("bfloat16")
    assert support["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(support["native"], bool)
    assert precision.cpu_support("float32")["native"]


def test_float32_interface_keeps_inputs_and_outputs_float32():
    model = precision.convert_dtype(torch.nn.Linear(4, 2), "bfloat16")
    output = model(torch.randn(3, 4))
    assert output.dtype == torch.float32
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.fixture
def calibration_file(tmp_path: Path) -> Path:
    path = tmp_path / "calibration.txt"
    texts = [f"{text} ({n})" for n in range(4) for text in TINY_TEXT_CORPUS]
    path.write_text("# calibration texts\n" + "\n".join(texts) + "\n")
    return path


@pytest.mark.parametrize(
    ("setup", "kind"),
    [
        ({"dtype": "bfloat16"}, "dtype"),
        ({"quantization": "dynamic_int8"}, "dynamic_int8"),
        # The same gates hold for the AOTInductor format; torch._int_mm compiles into it too.
        ({"quantization": "dynamic_int8", "save_mode": "aot_inductor"}, "dynamic_int8"),
    ],
)
def test_reduced_archive_records_its_figures_and_serves_float32(
    tiny_text_checkpoint: Path,
    calibration_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    setup: dict,
    kind: str,
):
    # A gate every model passes (probabilities differ by at most 1): the plumbing is under test
    # here, not accuracy. The tiny tokenizer's vocabulary order, and so the tiny model's scores,
    # changes from process to process (tokenizers' trainer breaks ties through a randomly seeded
    # hash map), and int8 moved a random token batch's scores by 0.02 to 0.22 in runs here.
    monkeypatch.setitem(precision.GATES, (kind, "classifier"), precision.Gate(max_score_diff=1.0))
    config_dir = write_text_config(
        tmp_path / "reduced",
        tiny_text_checkpoint,
        calibration_file=str(calibration_file),
        **setup,
    )
    mar_path = build_archive(config_dir, tmp_path / "store", force=True)
    assert mar_path is not None
    with zipfile.ZipFile(mar_path) as archive:
        report = json.loads(archive.read(REPORT_FILE))
    reduced = report["verification"]["precision"]
    assert reduced["calibration"]["inputs"] == 4 * len(TINY_TEXT_CORPUS)
    assert 0.0 < reduced["calibration"]["max_score_diff"] <= 1.0  # measured, and recorded
    assert reduced["cpu"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if kind == "dynamic_int8":
        assert reduced["recipe"]["quantized_layers"] >= 1
    handler = load_text_handler(mar_path, tmp_path / "model")
    [(status, answer, _)] = run_batch(handler, [({"body": {"inputs": "a great film"}}, {})])
    assert status == 200
    assert 0.0 <= answer[0]["score"] <= 1.0


def test_a_failed_gate_writes_nothing_and_prints_the_figures(
    tiny_text_checkpoint: Path,
    calibration_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    monkeypatch.setitem(
        precision.GATES, ("dtype", "classifier"), precision.Gate(max_score_diff=0.0)
    )
    config_dir = write_text_config(
        tmp_path / "bf16",
        tiny_text_checkpoint,
        dtype="bfloat16",
        calibration_file=str(calibration_file),
    )
    with pytest.raises(ExportError, match=r"fails its accuracy gate .*max_score_diff"):
        build_archive(config_dir, tmp_path / "store", force=True)
    assert not (tmp_path / "store").exists()
    assert "bfloat16 against float32 over 24 calibration rows" in capsys.readouterr().out


def test_reduced_precision_needs_a_calibration_file(tiny_text_checkpoint: Path, tmp_path: Path):
    config_dir = write_text_config(tmp_path / "bf16", tiny_text_checkpoint, dtype="bfloat16")
    with pytest.raises(ConfigError, match="needs calibration_file"):
        build_archive(config_dir, tmp_path / "store", force=True)
