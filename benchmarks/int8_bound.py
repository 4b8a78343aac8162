"""How much faster int8 can make MiniLM on this CPU, and how much of that the accuracy gate keeps.

    python benchmarks/int8_bound.py

Everything runs in this process, on TorchScript graphs traced and frozen as the build writes
them, timed as the build times a reduced graph (``precision.measure_speed``: alternating with
float32, at the largest verification batch, shortest and longest sentences). It prints, against
float32:

- the share of float32 time spent in Linear layers (torch.profiler): what int8 can speed up;
- every Linear layer int8 on fbgemm's dynamic kernel as it comes (activations quantized per
  tensor, nothing added around it): the most dynamic int8 gives this model on this CPU, and
  what that costs in accuracy;
- every Linear layer in our recipe (SmoothQuant, activations per token): what the recipe's
  extra work costs;
- the layers the build's gate chooses (``quantize_dynamic_int8``, as ``minilm_int8.mar``).

With ``onnxruntime`` installed (the ``[onnx]`` extra) it then does the same for ONNX Runtime,
timed against ONNX Runtime's own float32 graph: every MatMul as ``quantize_dynamic`` makes it
(activations per tensor, 7-bit weights as our builds use, and 8-bit); every MatMul per token
(rows scaled to one range before ``DynamicQuantizeLinear``, 8-bit unsigned weights, which no
AVX2 kernel saturates); ``MatMulNBits`` with 8-bit weights in blocks of 32 and int8 compute
(``accuracy_level`` 4: activations quantized per block of 32 inside the kernel); and the
build's own gated choice (``onnx_export.quantize_int8``, as ``minilm_onnx_int8.mar``).

Each line gives the gate's figures over ``datasets/calibration.txt`` (min cosine, nearest-
neighbour agreement; the gate needs 0.99 and 0.98). The CPU's instruction sets come first:
without VNNI, fbgemm multiplies int8 with AVX2's ``vpmaddubsw``, which is why this bound is
lower there than with VNNI. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ts_handlers import cpu, onnx_export, precision  # noqa: E402
from ts_handlers.tools.build import (  # noqa: E402
    SETUP_CONFIG_FILE,
    load_task_config,
    resolve_hub_model,
    resolve_paths,
)

CONFIG_DIR = ROOT / "archiver_configs" / "minilm_int8"


class PerTensorInt8Linear(nn.Module):
    """fbgemm's dynamic int8 Linear as it comes: one activation scale per tensor."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = torch.ao.nn.quantized.dynamic.Linear(
            linear.in_features, linear.out_features, dtype=torch.qint8
        )
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        quantized = torch.quantize_per_channel(
            weight, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8
        )
        self.linear.set_weight_bias(quantized, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class RowScaledLinear(onnx_export.SmoothedLinear):
    """The ONNX int8 build's smoothed Linear, with each input row scaled to [-1, 1] before the
    product and the output scaled back: ONNX Runtime's per-tensor ``DynamicQuantizeLinear`` is
    then per token in effect, as in our fbgemm recipe."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.inverse_smooth
        row_max = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8)
        out = nn.functional.linear(x / row_max, self.weight) * row_max
        return out + self.bias if self.bias is not None else out


def with_every_linear(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module]) -> nn.Module:
    """A copy of ``model`` with each ``nn.Linear`` replaced by ``make(name, linear)``."""
    converted = copy.deepcopy(model).eval()
    for name, module in list(converted.named_modules()):
        if isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            parent = converted.get_submodule(parent_name) if parent_name else converted
            setattr(parent, child, make(name, module))
    return converted


def with_every_smoothed_linear(
    model: nn.Module,
    input_absmax: dict[str, torch.Tensor],
    alpha: float,
    make: Callable[[nn.Linear, torch.Tensor, float], nn.Module],
) -> nn.Module:
    """The same for a smoothed replacement ``make(linear, input_absmax, alpha)`` of each layer
    that ran on the calibration set (one that never runs has no input range to smooth by)."""
    return with_every_linear(
        model,
        lambda name, linear: (
            make(linear, input_absmax[name], alpha) if name in input_absmax else linear
        ),
    )


def traced(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    with torch.inference_mode():
        return torch.jit.freeze(torch.jit.trace(model, inputs, check_trace=False).eval())


def linear_share(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    """The share of the eager float32 model's CPU time spent in ``aten::linear``."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(*inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                model(*inputs)
    events = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    linear = sum(event.cpu_time_total for event in events if event.key == "aten::linear")
    return linear / total


def onnx_variants(
    model: nn.Module, plan: Any, config: Any, absmax: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """ONNX Runtime sessions (callable like the model): float32 first, then the int8 variants."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from ts_handlers.config import OnnxRuntimeConfig
    from ts_handlers.onnx_format import ONNXModel, session_from_bytes

    settings = OnnxRuntimeConfig()
    alpha = onnx_export.SMOOTHING_ALPHA
    float32_bytes = onnx_export.export_onnx(model, plan)

    def every_matmul(model_bytes: bytes, weight_type: Any, reduce_range: bool) -> bytes:
        with tempfile.TemporaryDirectory() as folder:
            source, target = Path(folder) / "float32.onnx", Path(folder) / "int8.onnx"
            source.write_bytes(model_bytes)
            quantize_dynamic(
                source,
                target,
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=list(onnx_export.linear_layers(model_bytes)),
                per_channel=True,
                reduce_range=reduce_range,
                weight_type=weight_type,
            )
            return target.read_bytes()

    row_scaled = with_every_smoothed_linear(model, absmax, alpha, RowScaledLinear)
    blocks = MatMulNBitsQuantizer(
        onnx.load_from_string(float32_bytes),
        bits=8,
        block_size=32,
        is_symmetric=True,
        accuracy_level=4,
    )
    blocks.process()
    smoothed_bytes = onnx_export.export_onnx(onnx_export.smoothed(model, plan, alpha), plan)
    gated_bytes, report = onnx_export.quantize_int8(smoothed_bytes, plan, config, settings)
    graphs = {
        "float32": float32_bytes,
        "every MatMul, per tensor, 7-bit weights": every_matmul(
            float32_bytes, QuantType.QInt8, reduce_range=True
        ),
        "every MatMul, per tensor, 8-bit weights": every_matmul(
            float32_bytes, QuantType.QInt8, reduce_range=False
        ),
        "every MatMul, per token, u8 weights": every_matmul(
            onnx_export.export_onnx(row_scaled, plan), QuantType.QUInt8, reduce_range=False
        ),
        "every MatMul, MatMulNBits 8-bit, blocks of 32": blocks.model.model.SerializeToString(),
        f"gate's choice ({report['recipe']['quantized_layers']} int8)": gated_bytes,
    }
    return {name: ONNXModel(session_from_bytes(data, settings)) for name, data in graphs.items()}


def print_rows(
    title: str,
    cases: dict[str, tuple[torch.Tensor, ...]],
    rows: list[tuple[str, dict[str, float], dict[str, Any]]],
    linear_shares: dict[str, float] | None = None,
) -> None:
    """Each case's float32 rate (and the Linear layers' share of it, where given), and every
    variant's speed ratio and gate figures."""
    print(f"\n== {title}")
    for case, inputs in cases.items():
        shape = "x".join(str(size) for size in inputs[0].shape)
        float32_rate = statistics.median(found[case]["float32_per_s"] for _, _, found in rows)
        share = (
            f"; Linear layers take {linear_shares[case]:.0%} of float32 time"
            if linear_shares
            else ""
        )
        print(f"{case} {shape}: float32 {float32_rate:.1f} rows/s{share}")
        for name, found, speed in rows:
            print(
                f"  {name:46} {speed[case]['ratio']:5.2f}x float32   min cosine "
                f"{found['min_cosine']:.4f}, neighbour agreement {found['neighbour_agreement']:.3f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--no-onnx", action="store_true", help="TorchScript (fbgemm) only, not ONNX Runtime"
    )
    args = parser.parse_args(argv)
    isa = cpu.instruction_sets()
    print(
        f"CPU: torch capability {isa['cpu_capability']}; "
        + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in isa.items() if isinstance(v, bool)),
        flush=True,
    )
    task, config = load_task_config(CONFIG_DIR / SETUP_CONFIG_FILE)
    config, _ = resolve_hub_model(config, CONFIG_DIR)
    config = resolve_paths(config, CONFIG_DIR)
    plan = task.prepare_export(config)
    model = plan.model.eval()
    calibration = plan.calibration_inputs
    cases = precision.speed_cases(plan)
    expected = precision.rows_compared(plan, model, calibration)

    def figures(candidate: nn.Module) -> dict[str, float]:
        actual = precision.rows_compared(plan, candidate, calibration)
        return precision.compare(expected, actual, plan.output_kind)

    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    absmax = precision.input_ranges(model, linears, calibration)
    gated, report = precision.reduce_precision(config, plan)  # the build's own step
    recipe = report["recipe"]
    variants = {
        "every Linear, per tensor": with_every_linear(
            model, lambda name, linear: PerTensorInt8Linear(linear)
        ),
        "every Linear, per token": with_every_smoothed_linear(
            model, absmax, precision.SMOOTHING_ALPHA, precision.FbgemmInt8Linear
        ),
        f"gate's choice ({recipe['quantized_layers']} int8)": gated,
    }
    example = cases[max(cases, key=lambda case: cases[case][0].numel())]
    float32_graph = traced(model, example)
    rows = []
    for name, variant in variants.items():
        speed = precision.measure_speed(float32_graph, traced(variant, example), plan)
        rows.append((name, figures(variant), speed["cases"]))
    shares = {case: linear_share(model, inputs) for case, inputs in cases.items()}
    print_rows("TorchScript, fbgemm (as the torchscript builds)", cases, rows, shares)
    if args.no_onnx or importlib.util.find_spec("onnxruntime") is None:
        return 0
    sessions = onnx_variants(model, plan, config, absmax)
    float32_session = sessions.pop("float32")
    rows = []
    for name, session in sessions.items():
        speed = precision.measure_speed(float32_session, session, plan)
        rows.append((name, figures(session), speed["cases"]))
    print_rows("ONNX Runtime (as the onnx builds), against its own float32", cases, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
