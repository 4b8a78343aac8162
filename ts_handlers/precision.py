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
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ts_handlers import cpu
from ts_handlers.config import ConfigError
from ts_handlers.export import ExportError, ExportPlan
from ts_handlers.verification import Judge

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
    kernel = int8_kernel(config.save_mode) if config.quantization else None
    fast, reason = cpu.fast_here(precision_name(config), kernel)
    report["cpu"] = {**cpu_support(config.dtype), "fast": fast, "reason": reason}
    report["cpu"].update(cpu.instruction_sets())
    if not fast:
        warning = (
            f"{reason}: the archive also carries the float32 graph, which the handler serves "
            "on CPUs like this one"
        )
        report["warning"] = warning
        print(f"WARNING: {warning}")
    if config.quantization is None:
        return convert_dtype(plan.model, config.dtype), report
    gate = gate_for(config, plan.output_kind)

    def evaluator(input_sets: Sequence[tuple[torch.Tensor, ...]]) -> Evaluate:
        expected = rows_compared(plan, plan.model, input_sets)

        def evaluate(candidate: nn.Module) -> dict[str, float]:
            actual = rows_compared(plan, candidate, input_sets)
            return compare(expected, actual, plan.output_kind)

        return evaluate

    calibration = plan.calibration_inputs
    ranking = calibration[::RANKING_STRIDE]
    print(
        f"choosing the int8 layers ({kernel}): each ranked alone on {len(ranking)} of "
        f"{len(calibration)} calibration batches, then the gate on all",
        flush=True,
    )
    try:
        model, recipe = quantize_dynamic_int8(
            plan.model,
            calibration,
            evaluator(calibration),
            gate,
            kernel,
            rank_evaluate=evaluator(ranking),
        )
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


# ---- choosing the layers to quantize (any quantizer: this one, ONNX Runtime's) ------------

# Which layers a candidate quantizes; the rest stay float32.
Candidate = frozenset[str]
EvaluateLayers = Callable[[Candidate], dict[str, float]]
# Significant digits a layer's deviation is ranked by: float noise from one CPU's kernels to
# another's (FMA or not, AVX2 or AVX-512 accumulation order) is far below the third digit, so
# the ranking, and with it the choice, is the same on every CPU; equal figures go by name.
RANK_DIGITS = 3


@dataclass(frozen=True)
class LayerChoice:
    """What :func:`choose_layers` decided, and the figures it decided on."""

    quantized: tuple[str, ...]
    # Kept in float32, most harmful first.
    kept: tuple[str, ...]
    # Every layer and its deviation when quantized alone, most harmful first.
    ranking: tuple[tuple[str, float], ...]
    # The gate's figures for the chosen candidate.
    figures: dict[str, float]
    evaluations: int


def deviation(figures: dict[str, float]) -> float:
    """How far a candidate's answers moved, on average (a smooth figure to rank layers by)."""
    return (1.0 - figures.get("mean_cosine", 1.0)) + figures.get("mean_score_diff", 0.0)


def rank_layers(layers: Sequence[str], evaluate: EvaluateLayers) -> list[tuple[str, float]]:
    """Each layer quantized alone, most harmful first: by deviation rounded to
    :data:`RANK_DIGITS` significant digits, then by name. Depends on accuracy only."""
    scored = [
        (name, float(f"{deviation(evaluate(frozenset([name]))):.{RANK_DIGITS}g}"))
        for name in layers
    ]
    return sorted(scored, key=lambda item: (-item[1], item[0]))


def choose_layers(
    layers: Sequence[str],
    evaluate: EvaluateLayers,
    gate: Gate,
    *,
    rank_with: EvaluateLayers | None = None,
) -> LayerChoice:
    """As many layers quantized as ``gate`` allows; the most harmful ones stay float32.

    ``evaluate(candidate)`` returns the gate's figures (``compare``) for the model with the
    ``candidate`` layers quantized; ``rank_with`` (default ``evaluate``) the same on a cheaper
    set of inputs, used only to rank. The number of leading layers of the ranking kept in
    float32 is found by bisection (the gate is assumed to pass more often the more layers stay
    float32), so a model of n layers costs n ranking runs and about log2(n) gate runs. Raises
    ValueError when even one quantized layer fails the gate.
    """
    layers = sorted(layers)
    if not layers:
        raise ValueError("there are no layers to quantize")
    ranking = rank_layers(layers, rank_with or evaluate)
    order = [name for name, _ in ranking]
    results: dict[int, dict[str, float]] = {}

    def passes(kept: int) -> bool:
        if kept not in results:
            results[kept] = evaluate(frozenset(order[kept:]))
        return not gate.failures(results[kept])

    low, high = -1, len(order) - 1  # low: known to fail (or none tried); high: to be checked
    if passes(0):
        high = 0
    else:
        low = 0
        while high - low > 1:
            middle = (low + high) // 2
            if passes(middle):
                high = middle
            else:
                low = middle
        if not passes(high):
            raise ValueError(
                "no layer can be quantized without failing the accuracy gate: "
                + "; ".join(gate.failures(results[high]))
            )
    return LayerChoice(
        quantized=tuple(sorted(order[high:])),
        kept=tuple(order[:high]),
        ranking=tuple(ranking),
        figures=results[high],
        evaluations=len(layers) + len(results),
    )


# ---- speed on the build CPU ------------------------------------------------------------------

# Seconds each graph is timed per case: a build step, bounded, never a test.
SPEED_SECONDS = 1.5


def speed_cases(plan: ExportPlan) -> dict[str, tuple[torch.Tensor, ...]]:
    """The inputs the build times: the largest batch of the verification shapes, at its
    fewest and at its most elements ("short" and "long" sentences for text)."""
    largest = max(len(inputs[0]) for inputs in plan.verify_inputs)
    batches = sorted(
        (inputs for inputs in plan.verify_inputs if len(inputs[0]) == largest),
        key=lambda inputs: inputs[0].numel(),
    )
    short, long = batches[0], batches[-1]
    if short[0].shape == long[0].shape:
        return {"batch": short}
    return {"short": short, "long": long}


def measure_speed(
    float32_graph: Callable[..., Any], reduced_graph: Callable[..., Any], plan: ExportPlan
) -> dict[str, Any]:
    """Rows per second of both exported graphs on this CPU, each case timed in alternation
    (so load from elsewhere hits both alike) for about :data:`SPEED_SECONDS` per graph, at
    least twice after a warm-up call; the median call counts."""
    cases: dict[str, Any] = {}
    with torch.inference_mode():
        for case, inputs in speed_cases(plan).items():
            times: dict[str, list[float]] = {"float32": [], "reduced": []}
            graphs = {"float32": float32_graph, "reduced": reduced_graph}
            for graph in graphs.values():
                graph(*inputs)  # warm-up: first-call optimisation, allocations
            deadline = time.perf_counter() + 2 * SPEED_SECONDS
            while len(times["float32"]) < 2 or (
                time.perf_counter() < deadline and len(times["float32"]) < 50
            ):
                for name, graph in graphs.items():
                    started = time.perf_counter()
                    graph(*inputs)
                    times[name].append(time.perf_counter() - started)
            rows = len(inputs[0])
            per_s = {name: rows / statistics.median(values) for name, values in times.items()}
            cases[case] = {
                "shape": list(inputs[0].shape),
                "float32_per_s": round(per_s["float32"], 2),
                "reduced_per_s": round(per_s["reduced"], 2),
                "ratio": round(per_s["reduced"] / per_s["float32"], 3),
            }
    return {"instruction_sets": cpu.instruction_sets(), "cases": cases}


def speed_summary(name: str, speed: dict[str, Any]) -> str:
    isa = speed["instruction_sets"]
    flags = " ".join(key for key, value in isa.items() if value is True)
    lines = [f"{name} against float32 on this CPU ({isa['cpu_capability']}; {flags}):"]
    for case, figures in speed["cases"].items():
        shape = "x".join(str(size) for size in figures["shape"])
        lines.append(
            f"  {case} {shape}: float32 {figures['float32_per_s']:.1f}/s, {name} "
            f"{figures['reduced_per_s']:.1f}/s: {figures['ratio']:.2f}x"
        )
    return "\n".join(lines)


# ---- dynamic int8 ----------------------------------------------------------------------------

Evaluate = Callable[[nn.Module], dict[str, float]]
# SmoothQuant's migration strength: how much of an activation channel's range moves into the
# weights. 0.7 measured best on MiniLM over calibration.txt (0.5: more neighbours flip; 0.85:
# the weights' own range starts to cost more than it saves).
SMOOTHING_ALPHA = 0.7
# The calibration batches the ranking runs on: every sixth, short to long (the gate runs on all).
RANKING_STRIDE = 6


def smoothed_weight(
    linear: nn.Linear, input_absmax: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SmoothQuant (Xiao et al., 2023): the weight with each input channel's outlier range
    moved into it, and the factors that divide the input down by as much."""
    weight = linear.weight.detach().float()
    smooth = input_absmax.clamp(min=1e-5) ** alpha
    smooth = (smooth / weight.abs().amax(dim=0).clamp(min=1e-5) ** (1 - alpha)).clamp(1e-5)
    return weight * smooth, 1.0 / smooth


class FbgemmInt8Linear(nn.Module):
    """``nn.Linear`` through fbgemm's int8 kernel with prepacked weights (AVX2 and AVX-512).

    Weights are int8 per output channel; activations are quantized at run time, per token in
    effect: fbgemm's dynamic kernel takes one scale per tensor, so each token (row) is first
    divided by its own largest |value|, and the output multiplied back (the layer is linear;
    the bias is added after). A batch's outlier tokens (BERT's [CLS], [SEP]) then cost the
    other tokens nothing; outlier *channels* are divided down by SmoothQuant's factors first.
    Activations use 7 bits (upstream's ``reduce_range``): AVX2's u8 x s8 multiply-add then
    never saturates, so every CPU computes the same integers.

    Measured on MiniLM, all 36 layers int8, calibration.txt: min cosine 0.994 (per tensor
    instead: 0.918; 7-bit weights with 8-bit activations: 0.986). TorchScript and LibTorch run it.
    """

    def __init__(self, linear: nn.Linear, input_absmax: torch.Tensor, alpha: float) -> None:
        super().__init__()
        weight, inverse_smooth = smoothed_weight(linear, input_absmax, alpha)
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        quantized = torch.quantize_per_channel(
            weight, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8
        )
        self.linear = torch.ao.nn.quantized.dynamic.Linear(
            linear.in_features, linear.out_features, dtype=torch.qint8
        )
        self.linear.set_weight_bias(quantized, None)
        self.register_buffer("inverse_smooth", inverse_smooth)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place after the first product: each new (tokens, out_features) tensor costs a pass
        # of fresh memory, which at long sentences took about a third of what int8 saves.
        x = x * self.inverse_smooth
        row_max = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-8)
        out = self.linear(x.div_(row_max)).mul_(row_max)
        if self.bias is not None:
            out = out.add_(self.bias)
        return out


class Int8Linear(nn.Module):
    """``nn.Linear`` as int8 x int8 -> int32 (``torch._int_mm``; fast with VNNI or AMX only).

    For AOTInductor, which compiles ``torch._int_mm`` but cannot capture fbgemm's packed
    weights. Weights are quantized per output channel; activations per token, at run time
    (dynamic), after SmoothQuant's smoothing. ``simulate`` runs the same integer arithmetic as
    a float32 matmul (exact below 2**24), which ranks layers fast on any CPU.
    """

    def __init__(
        self, linear: nn.Linear, input_absmax: torch.Tensor, alpha: float, simulate: bool = False
    ) -> None:
        super().__init__()
        weight, inverse_smooth = smoothed_weight(linear, input_absmax, alpha)
        weight_scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        quantized = (weight / weight_scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.simulate = simulate
        self.register_buffer("inverse_smooth", inverse_smooth)
        self.register_buffer("weight_t", quantized.t().contiguous())  # (in, out), as _int_mm takes
        self.register_buffer("weight_scale", weight_scale)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = (x * self.inverse_smooth).reshape(-1, x.shape[-1])
        scale = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
        quantized = (rows / scale).round().clamp(-127, 127)
        if self.simulate:
            products = quantized @ self.weight_t.float()
        else:
            products = torch._int_mm(quantized.to(torch.int8), self.weight_t).float()
        out = products * (scale * self.weight_scale)
        if self.bias is not None:
            out = out + self.bias
        shape = list(x.shape[:-1])  # spelled out for torch.jit.script
        shape.append(out.shape[-1])
        return out.reshape(shape)


KERNELS = {
    "fbgemm": "SmoothQuant (alpha {alpha:g}) + fbgemm quantized::linear_dynamic: int8 weights "
    "per output channel, prepacked; activations per token (rows scaled to one range), 7 bits",
    "int_mm": "SmoothQuant (alpha {alpha:g}) + torch._int_mm: int8 weights per output channel, "
    "int8 activations per token (dynamic)",
}


def int8_kernel(save_mode: str) -> str:
    """The int8 kernel a format serves: fbgemm's where the graph can hold its packed weights."""
    return "int_mm" if save_mode == "aot_inductor" else "fbgemm"


def quantize_dynamic_int8(
    model: nn.Module,
    calibration_inputs: Sequence[tuple[torch.Tensor, ...]],
    evaluate: Evaluate,
    gate: Gate,
    kernel: str = "fbgemm",
    rank_evaluate: Evaluate | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Every ``nn.Linear`` in int8 on ``kernel``, but those the gate needs in float32.

    One float32 pass over the calibration set records each layer's input range per channel
    (for smoothing); :func:`choose_layers` then picks the layers, ranking them with
    ``rank_evaluate`` (default ``evaluate``). The ``int_mm`` kernel is ranked and chosen on its
    float32 simulation (the build's gate then checks the real graph).
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown int8 kernel {kernel!r}; available: {', '.join(KERNELS)}")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    absmax = input_ranges(model, linears, calibration_inputs)
    linears = [name for name in linears if name in absmax]  # BERT's pooler never runs, say
    if not linears:
        raise ValueError("dynamic_int8 quantizes nn.Linear layers, and the model runs none")
    simulate = kernel == "int_mm"

    def candidate(names: Candidate, evaluator: Evaluate) -> dict[str, float]:
        return evaluator(_with_int8(model, sorted(names), absmax, kernel, simulate))

    choice = choose_layers(
        linears,
        lambda names: candidate(names, evaluate),
        gate,
        rank_with=lambda names: candidate(names, rank_evaluate or evaluate),
    )
    quantized = _with_int8(model, choice.quantized, absmax, kernel)
    recipe = {
        "method": KERNELS[kernel].format(alpha=SMOOTHING_ALPHA),
        "kernel": kernel,
        "quantized_layers": len(choice.quantized),
        "float32_layers": list(choice.kept),
        "ranking": [[name, figure] for name, figure in choice.ranking],
        "evaluations": choice.evaluations,
    }
    logger.info("dynamic_int8: %d of %d Linear layers int8", len(choice.quantized), len(linears))
    return quantized, recipe


def input_ranges(
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
    model: nn.Module,
    names: Sequence[str],
    absmax: dict[str, torch.Tensor],
    kernel: str,
    simulate: bool = False,
) -> nn.Module:
    quantized = copy.deepcopy(model).eval()
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = quantized.get_submodule(parent_name) if parent_name else quantized
        linear = getattr(parent, child)
        if kernel == "fbgemm":
            module: nn.Module = FbgemmInt8Linear(linear, absmax[name], SMOOTHING_ALPHA)
        else:
            module = Int8Linear(linear, absmax[name], SMOOTHING_ALPHA, simulate)
        setattr(parent, child, module)
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
