"""Reduced-precision exports (``dtype``, ``quantization``) and the accuracy gates they must pass.

A reduced-precision graph keeps the float32 interface of the original: :class:`Float32Interface`
casts floating inputs to the model's dtype and the output back to float32 inside the graph, so
handlers, clients and the verification code never see another dtype.

Closeness to within ``verify_atol`` means nothing at bfloat16's 8-bit mantissa, so such an export
is instead gated on what its users observe, measured against the float32 eager model over a
calibration set of real text (``calibration_file``) and over the usual verification shapes:

- embeddings: the smallest cosine similarity, and (int8) whether each input's nearest neighbour
  among the others stays the same;
- classifiers: agreement of the top-1 class, and (dtypes) the largest score difference.

Only the build imports this module; a served archive needs none of it.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ts_handlers.config import ConfigError
from ts_handlers.export import ExportError, ExportPlan, Judge

logger = logging.getLogger(__name__)

OutputKind = Literal["embedding", "classifier"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Gate:
    """The thresholds an export at one precision must meet (each None: not checked)."""

    min_cosine: float | None = None
    min_neighbour_agreement: float | None = None
    min_top1_agreement: float | None = None
    max_score_diff: float | None = None

    def failures(self, figures: dict[str, float]) -> list[str]:
        checks = [
            ("min_cosine", self.min_cosine, ">="),
            ("neighbour_agreement", self.min_neighbour_agreement, ">="),
            ("top1_agreement", self.min_top1_agreement, ">="),
            ("max_score_diff", self.max_score_diff, "<="),
        ]
        failed = []
        for name, bound, sense in checks:
            if bound is None or name not in figures:
                continue
            value = figures[name]
            if (value < bound) if sense == ">=" else (value > bound):
                failed.append(f"{name} {value:.6g} (needs {sense} {bound:g})")
        return failed


# The gates of issue 10: a dtype keeps the answers (top-1 everywhere, scores within 1e-2);
# int8 may move a few borderline ones, and must keep retrieval (nearest neighbours) intact.
GATES: dict[tuple[str, OutputKind], Gate] = {
    ("dtype", "embedding"): Gate(min_cosine=0.999),
    ("dtype", "classifier"): Gate(min_top1_agreement=1.0, max_score_diff=1e-2),
    ("dynamic_int8", "embedding"): Gate(min_cosine=0.99, min_neighbour_agreement=0.98),
    ("dynamic_int8", "classifier"): Gate(min_top1_agreement=0.99),
}


def gate_for(config: Any, kind: OutputKind) -> Gate:
    return GATES[("dynamic_int8" if config.quantization else "dtype", kind)]


def is_reduced(config: Any) -> bool:
    return config.dtype != "float32" or config.quantization is not None


def precision_name(config: Any) -> str:
    return config.quantization or config.dtype


def cpu_support(dtype: str) -> dict[str, Any]:
    """Whether this CPU runs ``dtype`` natively (oneDNN's own check: avx512_bf16/AMX, fp16)."""
    native = {
        "float32": True,
        "bfloat16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
        "float16": torch.ops.mkldnn._is_mkldnn_fp16_supported(),
    }[dtype]
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "native": bool(native)}


class Float32Interface(nn.Module):
    """Runs ``model`` in its own dtype behind float32 inputs and outputs (any inputs; traces)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        cast = [x.to(self.dtype) if x.is_floating_point() else x for x in inputs]
        return self.model(*cast).float()


class _OneInput(Float32Interface):
    """The same for one input, spelled out so that ``torch.jit.script`` compiles it too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.model(_cast(x, self.dtype)).float()


class _TwoInputs(Float32Interface):
    """The same for two inputs (``input_ids, attention_mask``), scriptable."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.model(_cast(x, self.dtype), _cast(y, self.dtype)).float()


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if x.is_floating_point() else x


def convert_dtype(model: nn.Module, dtype: str) -> nn.Module:
    """A copy of ``model`` with its weights in ``dtype``, behind a float32 interface."""
    if dtype == "float32":
        return model
    target = DTYPES[dtype]
    arity = len(inspect.signature(model.forward).parameters)
    interface = {1: _OneInput, 2: _TwoInputs}.get(arity, Float32Interface)
    return interface(copy.deepcopy(model).to(target).eval(), target).eval()


# ---- the build's steps ----------------------------------------------------------------------


def reduce_precision(config: Any, plan: ExportPlan) -> tuple[nn.Module, dict[str, Any]]:
    """The eager model at the config's precision, and what the report says about it."""
    assert plan.model is not None
    if not plan.calibration_inputs:
        raise ConfigError(
            f"{precision_name(config)} needs calibration_file: real inputs the accuracy "
            "gates run on (text: one per line; images: a folder of image files)"
        )
    report: dict[str, Any] = {"dtype": config.dtype, "quantization": config.quantization}
    report["cpu"] = support = cpu_support(config.dtype)
    if not support["native"]:
        warning = (
            f"this CPU ({support['cpu_capability']}) has no native {config.dtype}: the "
            "archive works but runs emulated, usually slower than float32"
        )
        report["warning"] = warning
        print(f"WARNING: {warning}")
    if config.quantization is None:
        return convert_dtype(plan.model, config.dtype), report
    gate = gate_for(config, plan.output_kind)
    expected = rows_compared(plan, plan.model, plan.calibration_inputs)

    def evaluate(candidate: Any) -> dict[str, float]:
        actual = rows_compared(plan, candidate, plan.calibration_inputs)
        return compare(expected, actual, plan.output_kind)

    try:
        model, recipe = quantize_dynamic_int8(plan.model, plan.calibration_inputs, evaluate, gate)
    except ValueError as error:
        raise ExportError(f"dynamic_int8: {error}") from None
    report["recipe"] = recipe
    return model, report


def rows_compared(
    plan: ExportPlan, model: Any, input_sets: Sequence[tuple[torch.Tensor, ...]]
) -> torch.Tensor:
    """The rows the gates compare, over every input set (one tensor)."""
    rows = []
    with torch.inference_mode():
        for inputs in input_sets:
            output = model(*inputs).float()
            rows.append(plan.gate_rows(output, *inputs) if plan.gate_rows else output)
    return torch.cat(rows)


def calibration_figures(reference: Any, exported: Any, plan: ExportPlan) -> dict[str, float]:
    """The gate's figures over the calibration set, and how many rows they cover."""
    expected = rows_compared(plan, reference, plan.calibration_inputs)
    actual = rows_compared(plan, exported, plan.calibration_inputs)
    figures = compare(expected, actual, plan.output_kind)
    return {**figures, "inputs": float(len(expected))}


def shape_judge(plan: ExportPlan, gate: Gate) -> Judge:
    """Judges a verification shape (random inputs) by the gate's own figures.

    Nearest neighbours among a few random rows, and top-1 agreement on a case of three, are
    noise; those are judged on the calibration set only. A shape case checks the figure that
    holds row by row: cosine for embeddings, score differences for a dtype's classifiers.
    """
    row_gate = Gate(min_cosine=gate.min_cosine, max_score_diff=gate.max_score_diff)

    def judge(expected: Any, actual: Any, inputs: Any) -> tuple[dict[str, float], bool]:
        def rows(output: Any) -> Any:
            return plan.gate_rows(output.float(), *inputs) if plan.gate_rows else output.float()

        figures = compare(rows(expected), rows(actual), plan.output_kind)
        figures.pop("neighbour_agreement", None)
        return figures, not row_gate.failures(figures)

    return judge


def summary(config: Any, report: dict[str, Any], failures: list[str]) -> str:
    """The build's printed verdict on the calibration set."""
    figures = ", ".join(
        f"{name} {value:.6g}" for name, value in report["calibration"].items() if name != "inputs"
    )
    verdict = "FAILED: " + "; ".join(failures) if failures else "PASSED"
    lines = [
        f"{precision_name(config)} against float32 over "
        f"{int(report['calibration']['inputs'])} calibration rows: {figures}: {verdict}"
    ]
    if recipe := report.get("recipe"):
        kept = len(recipe["float32_layers"])
        lines.append(f"  {recipe['quantized_layers']} Linear layers int8, {kept} kept in float32")
    return "\n".join(lines)


# ---- dynamic int8 ----------------------------------------------------------------------------

Evaluate = Callable[[nn.Module], dict[str, float]]
# SmoothQuant's migration strength: how much of an activation channel's range moves into the
# weights. 0.7 measured best on MiniLM over calibration.txt (0.5: more neighbours flip; 0.85:
# the weights' own range starts to cost more than it saves).
SMOOTHING_ALPHA = 0.7


class Int8Linear(nn.Module):
    """``nn.Linear`` as int8 x int8 -> int32 (``torch._int_mm``, VNNI/AMX on x86).

    Weights are quantized per output channel; activations per token, at run time (dynamic), so
    a token's scale follows its own range. Outlier *channels*, which BERT-style models have and
    which would dominate every token's scale, are first divided down by SmoothQuant's per-channel
    factors (Xiao et al., 2023), whose inverse is folded into the weights. Traces and freezes
    as plain aten ops, so TorchScript and LibTorch run it.
    """

    def __init__(self, linear: nn.Linear, input_absmax: torch.Tensor, alpha: float) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        smooth = input_absmax.clamp(min=1e-5) ** alpha
        smooth = (smooth / weight.abs().amax(dim=0).clamp(min=1e-5) ** (1 - alpha)).clamp(1e-5)
        weight = weight * smooth
        weight_scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        quantized = (weight / weight_scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("inverse_smooth", 1.0 / smooth)
        self.register_buffer("weight_t", quantized.t().contiguous())  # (in, out), as _int_mm takes
        self.register_buffer("weight_scale", weight_scale)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = (x * self.inverse_smooth).reshape(-1, x.shape[-1])
        scale = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
        quantized = (rows / scale).round().clamp(-127, 127).to(torch.int8)
        out = torch._int_mm(quantized, self.weight_t).float() * (scale * self.weight_scale)
        if self.bias is not None:
            out = out + self.bias
        shape = list(x.shape[:-1])  # spelled out for torch.jit.script
        shape.append(out.shape[-1])
        return out.reshape(shape)


def quantize_dynamic_int8(
    model: nn.Module,
    calibration_inputs: Sequence[tuple[torch.Tensor, ...]],
    evaluate: Evaluate,
    gate: Gate,
) -> tuple[nn.Module, dict[str, Any]]:
    """Every ``nn.Linear`` as :class:`Int8Linear`, but those the gate needs in float32.

    One float32 pass over the calibration set records each layer's input range per channel (for
    smoothing). Each layer is then quantized alone to measure how far it moves the model's
    answers; all layers are quantized, and while the gate fails, the layer that moved the
    answers most goes back to float32.
    """
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    absmax = _input_ranges(model, linears, calibration_inputs)
    linears = [name for name in linears if name in absmax]  # BERT's pooler never runs, say
    if not linears:
        raise ValueError("dynamic_int8 quantizes nn.Linear layers, and the model runs none")
    impact = {name: _deviation(evaluate(_with_int8(model, [name], absmax))) for name in linears}
    by_impact = sorted(linears, key=impact.__getitem__, reverse=True)
    kept: list[str] = []
    while True:
        quantized = _with_int8(model, [name for name in linears if name not in kept], absmax)
        figures = evaluate(quantized)
        if not gate.failures(figures):
            break
        if len(kept) == len(linears) - 1:
            raise ValueError(
                "no Linear layer can be quantized without failing the accuracy gate: "
                + "; ".join(gate.failures(figures))
            )
        kept.append(by_impact[len(kept)])
    recipe = {
        "method": f"SmoothQuant (alpha {SMOOTHING_ALPHA:g}): int8 weights per output channel, "
        "int8 activations per token (dynamic), torch._int_mm",
        "quantized_layers": len(linears) - len(kept),
        "float32_layers": kept,
    }
    logger.info("dynamic_int8: %d of %d Linear layers int8", len(linears) - len(kept), len(linears))
    return quantized, recipe


def _deviation(figures: dict[str, float]) -> float:
    """How far a candidate's answers moved, on average (a smooth figure to rank layers by)."""
    return (1.0 - figures.get("mean_cosine", 1.0)) + figures.get("mean_score_diff", 0.0)


def _input_ranges(
    model: nn.Module, linears: Sequence[str], calibration_inputs: Sequence[tuple[torch.Tensor, ...]]
) -> dict[str, torch.Tensor]:
    """Each layer's largest input |value| per channel over the calibration set."""
    absmax: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float()
            largest = x.reshape(-1, x.shape[-1]).abs().amax(dim=0)
            absmax[name] = torch.maximum(absmax[name], largest) if name in absmax else largest

        return hook

    hooks = [
        model.get_submodule(name).register_forward_pre_hook(recorder(name)) for name in linears
    ]
    try:
        with torch.inference_mode():
            for inputs in calibration_inputs:
                model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return absmax


def _with_int8(
    model: nn.Module, names: Sequence[str], absmax: dict[str, torch.Tensor]
) -> nn.Module:
    quantized = copy.deepcopy(model).eval()
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = quantized.get_submodule(parent_name) if parent_name else quantized
        setattr(parent, child, Int8Linear(getattr(parent, child), absmax[name], SMOOTHING_ALPHA))
    return quantized


# ---- the figures the gates read -------------------------------------------------------------


def compare(expected: torch.Tensor, actual: torch.Tensor, kind: OutputKind) -> dict[str, float]:
    """What a gate measures between float32 rows and reduced-precision rows, (N, width) each."""
    expected, actual = expected.float(), actual.float()
    if kind == "embedding":
        cosine = F.cosine_similarity(expected, actual, dim=-1)
        figures = {"min_cosine": cosine.min().item(), "mean_cosine": cosine.mean().item()}
        if len(expected) > 2:
            agree = _nearest_neighbours(expected) == _nearest_neighbours(actual)
            figures["neighbour_agreement"] = agree.float().mean().item()
        return figures
    difference = (expected - actual).abs()
    return {
        "top1_agreement": (expected.argmax(-1) == actual.argmax(-1)).float().mean().item(),
        "max_score_diff": difference.max().item(),
        "mean_score_diff": difference.mean().item(),
    }


def _nearest_neighbours(rows: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(rows, dim=-1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2.0)  # below any cosine: a row is not its own neighbour
    return similarity.argmax(dim=-1)
