"""The export side of ``save_mode: "onnx"``: ``torch.onnx.export`` and ONNX Runtime's int8.

Only the build imports this module (it needs ``onnx`` and ``onnxscript`` besides
``onnxruntime``); a served archive needs :mod:`ts_handlers.onnx_format` alone, whose
``ONNXArtifact`` (the load side) :class:`ONNXFormat` extends.

The graph comes from the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, the one
PyTorch maintains): it captures with ``torch.export`` and takes the same dynamic batch and
sequence dimensions as AOTInductor does (``ExportPlan.dynamic_shapes``), so both formats
accept the same shapes, and the build verifies both the same way.

``quantization: "dynamic_int8"`` quantizes the graph with ONNX Runtime's ``quantize_dynamic``
(int8 weights per output channel; activations uint8 per tensor, quantized at run time), behind
the same accuracy gates as every reduced precision (precision.py). One scale per activation
tensor is what BERT-style models' few outlier channels ruin (naive, MiniLM loses a sixth of its
nearest neighbours), so the graph that is quantized is exported from a smoothed copy of the
model first (SmoothQuant, as precision.py's recipe: each Linear's input divided per channel by
its calibration range to the power alpha, the weights multiplied by the same, float32 answers
unchanged). Which layers stay float32 is
chosen as precision.py chooses them: rank the layers by the accuracy they cost, keep the
worst in float32 until the gate passes. The ranking is one float32 pass over the calibration
set that measures, for every Linear layer (a MatMul with a constant weight), how far ONNX
Runtime's int8 arithmetic moves that layer's own output (relative squared error): it depends
on the calibration set only, never on timing, so the choice is the same on every run and every
CPU. The gate itself is always checked on the real quantized graph run by ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from ts_handlers import cpu, precision
from ts_handlers.artifacts import METADATA_FILE, ExportError
from ts_handlers.config import ConfigError, OnnxRuntimeConfig
from ts_handlers.export import ExportFormat, ExportPlan
from ts_handlers.onnx_format import ONNXArtifact, ONNXModel, session_from_bytes

logger = logging.getLogger(__name__)

EXPORT_HINT = (
    "exporting to ONNX needs onnx and onnxscript besides onnxruntime: "
    "pip install 'ts-handlers[onnx]'"
)
# ONNX Runtime's own advice for x86 CPUs without VNNI (AVX2, AVX-512F): its u8 x s8 kernels
# there add pairs of products in 16 bits, which 8-bit weights can saturate; 7-bit weights
# ("reduce_range") cannot. The archive may be served on either kind of CPU, and its answers
# must be the ones the gate measured, so weights are 7-bit everywhere.
REDUCE_RANGE = True
# SmoothQuant's migration strength: 0.7, the value the torch int8 recipe measured best on MiniLM
# (docs/performance.md); kept here so the two recipes can move apart.
SMOOTHING_ALPHA = 0.7
INT8_METHOD = (
    f"SmoothQuant (alpha {SMOOTHING_ALPHA:g}), then ONNX Runtime quantize_dynamic: int8 weights "
    "per output channel (7-bit, reduce_range), uint8 activations per tensor at run time "
    "(MatMulInteger on MLAS)"
)


def _import_onnx() -> Any:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError:
        raise ExportError(EXPORT_HINT) from None
    return onnx


def input_names(model: torch.nn.Module, count: int) -> list[str]:
    """The forward's own parameter names (``input_ids``, ``attention_mask``), else input_<i>."""
    parameters = [
        parameter
        for parameter in inspect.signature(model.forward).parameters.values()
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(parameters) >= count:
        return [parameter.name for parameter in parameters[:count]]
    return [f"input_{index}" for index in range(count)]


def export_onnx(model: torch.nn.Module, plan: ExportPlan) -> bytes:
    """The serialized ONNX graph of ``model``, with the plan's dynamic dimensions."""
    _import_onnx()
    model = model.eval()
    dynamic = plan.dynamic_shapes or [{0: Dim("batch", min=1)} for _ in plan.example_inputs]
    messages = io.StringIO()
    # The exporter prints its progress, and warns that torchvision's ops cannot be registered
    # when torchvision is absent (it is not needed).
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(messages):
            program = torch.onnx.export(
                model,
                plan.example_inputs,
                dynamo=True,
                dynamic_shapes=tuple(dynamic),
                input_names=input_names(model, len(plan.example_inputs)),
                output_names=["output"],
                external_data=False,
                verbose=False,
            )
    except Exception as error:  # the exporter raises many types; the user needs one message
        lines = "\n".join(str(error).strip().splitlines()[:6])
        raise ExportError(
            f"torch.onnx could not export the model: {lines}\n"
            "Data-dependent Python control flow is the usual cause; save_mode 'torchscript' "
            "(export_method 'trace') records one path through it and may work."
        ) from error
    finally:
        registration.setLevel(previous)
    proto = program.model_proto
    if proto.ByteSize() >= 2**31:
        raise ExportError(
            "the ONNX graph is over protobuf's 2 GB limit for one file; serve this model with "
            "save_mode 'torchscript' or 'aot_inductor'"
        )
    return proto.SerializeToString()


def with_metadata(model_bytes: bytes, metadata_json: str) -> bytes:
    """The graph with our metadata as its ``ts_handlers.json`` metadata_props entry."""
    onnx = _import_onnx()
    proto = onnx.load_from_string(model_bytes)
    for entry in list(proto.metadata_props):
        if entry.key == METADATA_FILE:
            proto.metadata_props.remove(entry)
    proto.metadata_props.add(key=METADATA_FILE, value=metadata_json)
    return proto.SerializeToString()


# ---- dynamic int8 ----------------------------------------------------------------------------


def linear_layers(model_bytes: bytes) -> dict[str, str]:
    """MatMul node -> the module it came from, for every MatMul whose weight is a constant
    (the Linear layers; attention's activation x activation MatMuls stay float32)."""
    onnx = _import_onnx()
    graph = onnx.load_from_string(model_bytes).graph
    constants = {initializer.name for initializer in graph.initializer}
    layers = {}
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in constants:
            layers[node.name] = _module_name(node) or node.name
    return layers


def _module_name(node: Any) -> str:
    """The torch module path the dynamo exporter recorded for a node ("" if none)."""
    for entry in node.metadata_props:
        if entry.key == "pkg.torch.onnx.name_scopes":
            scopes = [scope.strip(" '\"") for scope in entry.value.strip("[]").split(",")]
            modules = [scope for scope in scopes[:-1] if scope]  # the last is the op itself
            return modules[-1] if modules else ""
    return ""


def rank_layers(
    model_bytes: bytes, layers: dict[str, str], plan: ExportPlan
) -> tuple[list[str], dict[str, float]]:
    """Layers by the relative squared error int8 brings to their own output, worst first.

    One float32 ONNX Runtime pass over the calibration set yields every layer's input; each
    layer's output is then computed in float32 and as ONNX Runtime's int8 kernels compute it
    (input uint8 per tensor, weight int8 per output channel), and the errors summed over the
    set. Ties keep graph order, so the ranking is a function of the calibration set alone.
    """
    onnx = _import_onnx()
    from onnx import numpy_helper

    proto = onnx.load_from_string(model_bytes)
    graph = proto.graph
    weights = {init.name: init for init in graph.initializer}
    nodes = {node.name: node for node in graph.node if node.name in layers}
    known_outputs = {output.name for output in graph.output}
    inputs = {}
    for name, node in nodes.items():
        inputs[name] = node.input[0]
        if node.input[0] not in known_outputs:
            graph.output.append(onnx.helper.make_empty_tensor_value_info(node.input[0]))
            known_outputs.add(node.input[0])
    # Basic optimisations only: nothing fuses away the values read here.
    settings = OnnxRuntimeConfig(graph_optimization_level="basic")
    session = session_from_bytes(proto.SerializeToString(), settings)
    feed_names = [value.name for value in session.get_inputs()]
    fetch = sorted(set(inputs.values()))
    weight = {
        name: torch.from_numpy(numpy_helper.to_array(weights[node.input[1]]).copy()).float()
        for name, node in nodes.items()
    }
    quantized_weight = {name: _int8_weight(value) for name, value in weight.items()}
    error = dict.fromkeys(nodes, 0.0)
    signal = dict.fromkeys(nodes, 0.0)
    for batch in plan.calibration_inputs:
        feed = {name: tensor.numpy() for name, tensor in zip(feed_names, batch, strict=True)}
        values = dict(zip(fetch, session.run(fetch, feed), strict=True))
        for name in nodes:
            x = torch.from_numpy(values[inputs[name]]).float()
            x = x.reshape(-1, x.shape[-1])
            exact = x @ weight[name]
            approximate = _uint8_activations(x) @ quantized_weight[name]
            error[name] += float((approximate - exact).pow(2).sum())
            signal[name] += float(exact.pow(2).sum())
    impact = {name: error[name] / max(signal[name], 1e-30) for name in nodes}
    order = list(layers)  # graph order breaks ties
    return sorted(order, key=lambda name: (-impact[name], order.index(name))), impact


def _int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as ONNX Runtime stores it, dequantized: symmetric per output channel
    (column), 7-bit with reduce_range ([-64, 64])."""
    limit = 64.0 if REDUCE_RANGE else 127.0
    scale = weight.abs().amax(dim=0).clamp(min=1e-12) / limit
    return (weight / scale).round().clamp(-limit, limit) * scale


def _uint8_activations(x: torch.Tensor) -> torch.Tensor:
    """DynamicQuantizeLinear: uint8 over the whole tensor's range (with 0), dequantized."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (high - low) / 255 or 1.0
    zero_point = min(max(round(-low / scale), 0), 255)
    return ((x / scale).round() + zero_point).clamp(0, 255).sub(zero_point) * scale


class SmoothedLinear(nn.Module):
    """``linear`` on ``x / s`` with weights ``W * s``: the same answer in float32, and an input
    whose channels have comparable ranges, so one int8 scale per tensor fits all of them."""

    def __init__(self, linear: nn.Linear, input_absmax: torch.Tensor, alpha: float) -> None:
        super().__init__()
        weight, inverse_smooth = precision.smoothed_weight(linear, input_absmax, alpha)
        self.register_buffer("inverse_smooth", inverse_smooth)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x * self.inverse_smooth, self.weight, self.bias)


def smoothed(model: nn.Module, plan: ExportPlan, alpha: float) -> nn.Module:
    """A copy of ``model`` with every Linear that runs on the calibration set smoothed."""
    import copy

    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    absmax = precision.input_ranges(model, linears, plan.calibration_inputs)
    copied = copy.deepcopy(model).eval()
    for name in linears:
        if name not in absmax:  # never runs (BERT's pooler, say): nothing to smooth
            continue
        parent_name, _, child = name.rpartition(".")
        parent = copied.get_submodule(parent_name) if parent_name else copied
        setattr(parent, child, SmoothedLinear(getattr(parent, child), absmax[name], alpha))
    return copied


def quantize_int8(
    model_bytes: bytes, plan: ExportPlan, config: Any, settings: OnnxRuntimeConfig
) -> tuple[bytes, dict[str, Any]]:
    """The graph with every Linear int8 but those the accuracy gate needs in float32.

    ``model_bytes`` is the export of :func:`smoothed` model for an int8 archive."""
    if not plan.calibration_inputs:
        raise ConfigError(
            "dynamic_int8 needs calibration_file: real inputs the accuracy gates run on "
            "(text: one per line; images: a folder of image files)"
        )
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise ExportError(EXPORT_HINT) from None
    layers = linear_layers(model_bytes)
    if not layers:
        raise ExportError("dynamic_int8: the ONNX graph has no MatMul with a constant weight")
    assert plan.model is not None
    gate = precision.gate_for(config, plan.output_kind)
    expected = precision.rows_compared(plan, plan.model, plan.calibration_inputs)
    ranking, impact = rank_layers(model_bytes, layers, plan)
    worst = ", ".join(f"{layers[name]} {impact[name]:.2e}" for name in ranking[:3])
    print(
        f"dynamic_int8 (onnx): {len(layers)} layers ranked by own int8 error; worst: {worst}",
        flush=True,
    )

    with tempfile.TemporaryDirectory(prefix="ts-handlers-onnx-int8-") as folder:
        source = Path(folder) / "float32.onnx"
        source.write_bytes(model_bytes)
        tried: dict[int, tuple[bytes, dict[str, float]]] = {}

        def keeping(count: int) -> tuple[bytes, dict[str, float]]:
            """The graph with the ``count`` worst layers in float32, and its gate figures."""
            if count not in tried:
                target = Path(folder) / f"int8_{count}.onnx"
                with _quiet_quantizer():
                    quantize_dynamic(
                        source,
                        target,
                        op_types_to_quantize=["MatMul"],
                        nodes_to_quantize=list(layers),
                        nodes_to_exclude=ranking[:count],
                        per_channel=True,
                        reduce_range=REDUCE_RANGE,
                        weight_type=QuantType.QInt8,
                    )
                quantized = target.read_bytes()
                model = ONNXModel(session_from_bytes(quantized, settings))
                actual = precision.rows_compared(plan, model, plan.calibration_inputs)
                figures = precision.compare(expected, actual, plan.output_kind)
                tried[count] = quantized, figures
                failures = gate.failures(figures)
                print(
                    f"  {count} layers kept in float32: "
                    + (f"FAILED: {'; '.join(failures)}" if failures else "passes the gate"),
                    flush=True,
                )
            return tried[count]

        count = _fewest_kept(len(layers), lambda n: not gate.failures(keeping(n)[1]))
        if count is None:
            raise ExportError(
                "dynamic_int8: no Linear layer can be quantized without failing the accuracy "
                f"gate: {'; '.join(gate.failures(keeping(len(layers) - 1)[1]))}"
            )
        quantized, _ = keeping(count)
    kept = ranking[:count]
    recipe = {
        "method": INT8_METHOD,
        "kernel": cpu.ONNXRUNTIME_MLAS,
        "quantized_layers": len(layers) - count,
        "float32_layers": [layers[name] for name in kept],
        "layer_choice": "ranked by each layer's own int8 output error over the calibration "
        "set; the worst kept in float32 until the gate passed",
        "impact": {layers[name]: round(impact[name], 8) for name in ranking},
        "candidates_tried": sorted(tried),
    }
    logger.info("dynamic_int8 (onnx): %d of %d layers int8", len(layers) - count, len(layers))
    report = {
        "dtype": config.dtype,
        "quantization": config.quantization,
        "cpu": precision.cpu_support("float32"),
        "recipe": recipe,
    }
    return quantized, report


def _fewest_kept(total: int, passes: Callable[[int], bool]) -> int | None:
    """The fewest worst-ranked layers to keep in float32 for the gate to pass (< total).

    Keeping a layer in float32 removes its error, so passing is (nearly) monotonic in the
    count: the counts 0, 1, 2, 4, ... are tried until one passes, then the gap is halved
    down to the smallest passing count. A handful of quantized graphs instead of one per
    layer; the count returned always passed.
    """
    if passes(0):
        return 0
    low, high = 0, 1  # low fails
    while not passes(high):
        low = high
        if high == total - 1:
            return None
        high = min(high * 2, total - 1)
    while high - low > 1:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle
    return high


@contextlib.contextmanager
def _quiet_quantizer() -> Any:
    """quantize_dynamic logs a pre-processing hint on every call, through the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class ONNXFormat(ONNXArtifact, ExportFormat):
    """``torch.onnx.export`` (the dynamo exporter) with dynamic batch and sequence axes.

    ``quantization: "dynamic_int8"`` is done by ONNX Runtime's own quantizer on the exported
    graph (:meth:`export_reduced`), so its int8 kernels (MLAS) run it; ``freeze`` does not
    apply: an ONNX graph holds its weights as constants already.
    """

    def __init__(self, freeze: bool = True, settings: OnnxRuntimeConfig | None = None) -> None:
        super().__init__(settings)

    def export(self, model: torch.nn.Module, plan: ExportPlan, method: str) -> torch.nn.Module:
        model_bytes = export_onnx(model, plan)
        return ONNXModel(session_from_bytes(model_bytes, self.settings), model_bytes)

    def export_reduced(
        self, model: torch.nn.Module, plan: ExportPlan, config: Any
    ) -> tuple[torch.nn.Module, dict[str, Any]]:
        if config.dtype != "float32" or config.quantization != "dynamic_int8":
            raise ExportError(
                "save_mode 'onnx' reduces precision only with quantization 'dynamic_int8' "
                f"(ONNX Runtime's own); got dtype {config.dtype!r}"
            )
        if not plan.calibration_inputs:
            raise ConfigError(
                "dynamic_int8 needs calibration_file: real inputs the accuracy gates run on "
                "(text: one per line; images: a folder of image files)"
            )
        model_bytes, report = quantize_int8(
            export_onnx(smoothed(model, plan, SMOOTHING_ALPHA), plan), plan, config, self.settings
        )
        return ONNXModel(session_from_bytes(model_bytes, self.settings), model_bytes), report

    def save(self, exported: torch.nn.Module, path: Path, metadata: dict[str, Any]) -> None:
        if not isinstance(exported, ONNXModel) or exported.model_bytes is None:
            raise ExportError("onnx saves only a model it exported itself")
        path.write_bytes(with_metadata(exported.model_bytes, json.dumps(metadata)))
