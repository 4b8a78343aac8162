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

from ts_handlers import cpu, precision
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
    assert set(reduced["cpu"]) >= {"AVX2", "AVX512", "AVX512_BF16", "AVX512_VNNI", "AMX_TILE"}
    if kind == "dynamic_int8":
        assert reduced["recipe"]["quantized_layers"] >= 1
        assert reduced["recipe"]["kernel"] == precision.int8_kernel(setup.get("save_mode", ""))
    # Timed on this CPU against the float32 graph the archive also carries.
    speed = reduced["speed"]
    assert speed["instruction_sets"] == cpu.instruction_sets()
    assert set(speed["cases"]) == {"short", "long"}
    assert all(case["ratio"] > 0 for case in speed["cases"].values())
    with zipfile.ZipFile(mar_path) as archive:
        names = set(archive.namelist())
    assert "float32_model.pt" in names  # a TorchScript trace, for AOTInductor archives too

    handler = load_text_handler(mar_path, tmp_path / "model")
    [(status, answer, _)] = run_batch(handler, [({"body": {"inputs": "a great film"}}, {})])
    assert status == 200
    assert 0.0 <= answer[0]["score"] <= 1.0
    served = handler.describe()["precision"]
    assert served["archive"] == precision.precision_name(handler.config)
    assert served["serving"] in (served["archive"], "float32")

    # Served where the CPU has no fast kernel for it: the float32 graph, which answers as the
    # float32 model does, and says so.
    monkeypatch.setattr(cpu, "fast_here", lambda *_: (False, "no fast kernel on this CPU"))
    fallback_handler = load_text_handler(mar_path, tmp_path / "model_fallback")
    assert fallback_handler.describe()["precision"] == {
        **served,
        "serving": "float32",
        "reason": "no fast kernel on this CPU",
    }
    [(status, fallback_answer, _)] = run_batch(
        fallback_handler, [({"body": {"inputs": "a great film"}}, {})]
    )
    assert status == 200
    float32_handler = load_text_handler(
        float32_archive(tiny_text_checkpoint, tmp_path), tmp_path / "f"
    )
    [(_, float32_answer, _)] = run_batch(
        float32_handler, [({"body": {"inputs": "a great film"}}, {})]
    )
    assert fallback_answer[0]["score"] == pytest.approx(float32_answer[0]["score"], abs=1e-5)


def float32_archive(checkpoint: Path, tmp_path: Path) -> Path:
    mar_path = build_archive(
        write_text_config(tmp_path / "float32", checkpoint), tmp_path / "store32", force=True
    )
    assert mar_path is not None
    return mar_path


# ---- which layers int8, and which precision serves -----------------------------------------


def fake_evaluate(harm: dict[str, float]):
    """Figures of a model whose layers each cost ``harm`` of cosine when quantized."""
    calls: list[frozenset[str]] = []

    def evaluate(candidate: frozenset[str]) -> dict[str, float]:
        calls.append(candidate)
        lost = sum(harm[name] for name in candidate)
        return {"min_cosine": 1.0 - 2 * lost, "mean_cosine": 1.0 - lost}

    return evaluate, calls


def test_layer_choice_keeps_the_most_harmful_layers_and_depends_on_accuracy_only():
    # e and b tie (within 3 significant digits): the name decides, on every run and CPU.
    harm = {"a": 0.001, "b": 0.0040001, "c": 0.0005, "d": 0.0002, "e": 0.0040002, "f": 0.0001}
    gate = precision.Gate(min_cosine=0.985)  # quantized harm must stay <= 0.0075
    evaluate, calls = fake_evaluate(harm)
    choice = precision.choose_layers(list(harm), evaluate, gate)
    assert [name for name, _ in choice.ranking] == ["b", "e", "a", "c", "d", "f"]
    assert choice.kept == ("b",)
    assert choice.quantized == ("a", "c", "d", "e", "f")
    assert choice.figures["min_cosine"] >= 0.985
    # n rankings, then a bisection: fewer gate runs than layers.
    assert choice.evaluations == len(calls) < 2 * len(harm)
    shuffled, _ = fake_evaluate(harm)
    assert precision.choose_layers(["f", "e", "d", "c", "b", "a"], shuffled, gate) == choice


def test_layer_choice_ranks_with_the_cheaper_evaluation_when_given():
    harm = {"a": 0.01, "b": 0.001}
    evaluate, calls = fake_evaluate(harm)
    cheap, cheap_calls = fake_evaluate({"a": 0.0001, "b": 0.002})  # ranks b first
    choice = precision.choose_layers(harm, evaluate, precision.Gate(), rank_with=cheap)
    assert [name for name, _ in choice.ranking] == ["b", "a"]
    assert choice.kept == () and len(cheap_calls) == 2 and calls == [frozenset("ab")]


def test_layer_choice_refuses_when_no_layer_passes():
    evaluate, _ = fake_evaluate({"a": 0.1, "b": 0.2})
    with pytest.raises(ValueError, match="no layer can be quantized .*min_cosine"):
        precision.choose_layers(["a", "b"], evaluate, precision.Gate(min_cosine=0.99))


@pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines, reason="needs fbgemm (x86)"
)
def test_fbgemm_int8_linear_stays_close_and_scripts():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(5, 7, 64)
    x[..., 3] *= 30  # an outlier channel, which smoothing moves into the weights
    int8 = precision.FbgemmInt8Linear(linear, x.abs().amax(dim=(0, 1)), 0.7)
    with torch.no_grad():
        expected, actual = linear(x), int8(x)
        traced = torch.jit.freeze(torch.jit.trace(int8.eval(), (x,)))
        assert torch.equal(traced(x), actual)
    cosine = torch.nn.functional.cosine_similarity(expected, actual, dim=-1)
    assert actual.shape == expected.shape and cosine.min() > 0.995


def test_int_mm_simulation_computes_the_same_integers():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 16)
    x = torch.randn(4, 9, 48)
    absmax = x.abs().amax(dim=(0, 1))
    real = precision.Int8Linear(linear, absmax, 0.7)
    simulated = precision.Int8Linear(linear, absmax, 0.7, simulate=True)
    with torch.no_grad():
        torch.testing.assert_close(simulated(x), real(x), rtol=1e-6, atol=1e-6)


def test_serving_precision_falls_back_where_the_cpu_is_not_fast(monkeypatch):
    recorded = {"name": "bfloat16", "kernel": None, "float32_file": "float32_model.pt"}
    monkeypatch.setattr(cpu, "fast_here", lambda *_: (True, "native"))
    assert cpu.serving_precision(recorded)["serving"] == "bfloat16"
    assert cpu.serving_precision(None) == {
        "archive": "float32",
        "serving": "float32",
        "reason": "a float32 archive",
    }
    # Measured slower than float32 by the build on a CPU with these same instruction sets.
    cases = {"short": {"ratio": 0.8}, "long": {"ratio": 1.6}}
    slower = {**recorded, "speed": {"instruction_sets": cpu.instruction_sets(), "cases": cases}}
    choice = cpu.serving_precision(slower)
    assert choice["serving"] == "float32" and "short 0.80x" in choice["reason"]
    # A gain within the build's timing noise is not worth the reduced graph's accuracy.
    cases = {"short": {"ratio": 1.11}, "long": {"ratio": 1.03}}
    marginal = {**recorded, "speed": {"instruction_sets": cpu.instruction_sets(), "cases": cases}}
    choice = cpu.serving_precision(marginal)
    assert choice["serving"] == "float32" and "long 1.03x" in choice["reason"]
    # ... on another CPU the measurement says nothing about this one.
    elsewhere = {**slower, "speed": {"instruction_sets": {"AVX2": False}, "cases": cases}}
    assert cpu.serving_precision(elsewhere)["serving"] == "bfloat16"
    monkeypatch.setattr(cpu, "fast_here", lambda *_: (False, "emulated here"))
    assert cpu.serving_precision(recorded) == {
        "archive": "bfloat16",
        "serving": "float32",
        "reason": "emulated here",
    }
    # An archive with no float32 graph can only serve what it has.
    alone = cpu.serving_precision({"name": "bfloat16"})
    assert alone["serving"] == "bfloat16" and "carries no float32 graph" in alone["reason"]


def test_fast_here_asks_the_cpu_for_each_kernel():
    isa = cpu.instruction_sets()
    assert isa["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert cpu.fast_here("float32") == (True, "float32")
    assert cpu.fast_here("bfloat16")[0] == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert cpu.fast_here("dynamic_int8", cpu.INT_MM)[0] == (isa["AVX512_VNNI"] or isa["AMX_TILE"])
    fbgemm = "fbgemm" in torch.backends.quantized.supported_engines and isa["AVX2"]
    assert cpu.fast_here("dynamic_int8", cpu.FBGEMM)[0] == fbgemm


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
