"""The export step, behind one small interface.

An :class:`ExportFormat` turns an eager module into a servable artifact, saves it with metadata
and loads it back. Handlers only ever call :func:`load_artifact`, so a format is a class here and
nothing in the handlers. Three exist:

* ``torchscript``: ``torch.jit.trace`` or ``script``, frozen, saved as ``model.pt`` (LibTorch
  loads it too, see docs/without-python.md);
* ``aot_inductor``: ``torch.export.export`` with dynamic batch (and sequence) dimensions,
  compiled ahead of time by AOTInductor and packaged as ``model.pt2``. TorchServe 0.12's own
  loader does not read that package; our handlers do.
* ``onnx``: ``torch.onnx.export`` with the same dynamic dimensions, saved as ``model.onnx`` and
  run by ONNX Runtime (``ts_handlers/onnx_format.py``; the ``[onnx]`` extra).

Every export is checked by :func:`verify` against the eager model on several input shapes; the
build refuses to write an archive whose exported model disagrees.
"""

from __future__ import annotations

import json
import logging
import tempfile
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch.export import Dim

from ts_handlers.errors import first_lines

logger = logging.getLogger(__name__)

METADATA_FILE = "ts_handlers.json"  # name inside TorchScript's _extra_files
# A reduced-precision archive also carries its float32 graph, under this prefix (cpu.py).
FLOAT32_PREFIX = "float32_"


Reference = Callable[..., torch.Tensor]
# Judges one verification case: (expected, actual, inputs) -> (figures, passed). The default
# compares within verify_atol; reduced precision judges with its accuracy gate.
Judge = Callable[
    [torch.Tensor, torch.Tensor, Sequence[torch.Tensor]], tuple[dict[str, float], bool]
]


@dataclass
class ExportPlan:
    """What a task hands the generic build: a model and the inputs to check its export on.

    Either ``model`` is the eager module (exported here, and verified against), or
    ``exported`` is a graph the user already has (their own TorchScript file): there is no eager
    model then, and ``reference`` runs that graph one input at a time, so verification checks
    that batching (and padding) does not change any answer.
    """

    model: torch.nn.Module | None
    example_inputs: tuple[torch.Tensor, ...] = ()
    verify_inputs: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    # Fixed-shape inputs tried when the export does not hold at other shapes (a trace that baked
    # in the sequence length, say); passing them means "pad every input to this shape".
    fixed_shape_inputs: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    exported: torch.nn.Module | None = None
    # What verification compares against: the eager model unless set.
    reference: Reference | None = None
    fixed_shape_reference: Reference | None = None
    # Classes the model outputs (classifiers); the build checks the labels file against it.
    num_classes: int | None = None
    # Files or folders copied into the archive beside the model (tokenizer, eager checkpoint).
    extra_files: list[Path] = field(default_factory=list)
    # Values the export decided, written back into the archived setup_config.json.
    resolved: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    # For reduced precision (precision.py): what the output is ("embedding" or "classifier"),
    # the rows the accuracy gates compare (scores per text, image or token; None: the output
    # itself) and the calibration set, as model inputs batched as the handler batches them.
    output_kind: Literal["embedding", "classifier"] = "classifier"
    gate_rows: Callable[..., torch.Tensor] | None = None
    calibration_inputs: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    # Where calibration_inputs came from, for the report.
    calibration_source: str = ""
    # For torch.export: the dimensions of each example input that vary at serving time. None:
    # dimension 0 of every input is the batch. Text tasks add the sequence dimension.
    dynamic_shapes: list[dict[int, Dim]] | None = None


class ExportError(RuntimeError):
    """The exported model cannot be trusted; nothing is written."""


class ExportFormat(ABC):
    name: ClassVar[str]
    # Fixed per format: the handler never has to guess which file holds the model.
    file_name: ClassVar[str]

    @abstractmethod
    def export(self, model: torch.nn.Module, plan: ExportPlan, method: str) -> torch.nn.Module:
        """The exported model, callable like the eager one (verification runs it)."""

    @abstractmethod
    def save(self, exported: torch.nn.Module, path: Path, metadata: dict[str, Any]) -> None: ...

    @abstractmethod
    def load(self, path: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]: ...

    def configure(self, config: Any) -> None:  # noqa: B027 (optional: most formats need none)
        """Takes the serving settings this format reads from the archive's config (none here)."""

    def export_reduced(
        self, model: torch.nn.Module, plan: ExportPlan, config: Any
    ) -> tuple[torch.nn.Module, dict[str, Any]] | None:
        """A reduced-precision export done by the format itself on its own graph (ONNX Runtime
        quantizes the ONNX graph), with the precision report; None: the build converts the
        eager model (precision.py) and exports that with :meth:`export`."""
        return None


class TorchScriptFormat(ExportFormat):
    name = "torchscript"
    file_name = "model.pt"

    def __init__(self, freeze: bool = True) -> None:
        self.freeze = freeze

    def export(self, model: torch.nn.Module, plan: ExportPlan, method: str) -> torch.nn.Module:
        if method not in ("trace", "script"):
            raise ExportError(f"unknown torchscript method {method!r}; use trace or script")
        model = model.eval()
        try:
            with torch.no_grad():
                if method == "script":
                    exported = torch.jit.script(model)
                else:
                    exported = torch.jit.trace(model, plan.example_inputs, strict=False)
            if self.freeze:
                exported = torch.jit.freeze(exported.eval())
        except Exception as error:  # TorchScript raises many types; the user needs one message
            hint = " (try export_method 'trace')" if method == "script" else ""
            raise ExportError(f"torch.jit.{method} failed{hint}: {error}") from error
        return exported

    def save(self, exported: torch.nn.Module, path: Path, metadata: dict[str, Any]) -> None:
        torch.jit.save(exported, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})

    def load(self, path: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
        extra_files = {METADATA_FILE: ""}
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra_files)
        metadata = json.loads(extra_files[METADATA_FILE] or "{}")
        return module.eval(), metadata


class AOTInductorModel(torch.nn.Module):
    """A compiled AOTInductor package, callable like the eager model.

    Holds the files AOTInductor generated so that :meth:`AOTInductorFormat.save` packages them
    again with the metadata, without compiling twice.
    """

    def __init__(self, runner: Callable[..., Any], aoti_files: list[Any] | None = None) -> None:
        super().__init__()
        self.runner = runner
        self.aoti_files = aoti_files

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.runner(*inputs)


class AOTInductorFormat(ExportFormat):
    """``torch.export`` + AOTInductor: one ``.pt2`` package holding a compiled shared library.

    The names are upstream's: ``torch.export.export`` captures the graph with symbolic batch
    and sequence sizes, ``torch._inductor`` compiles it for this machine's device and CPU
    instruction set, and the PT2 archive format packages it. Our metadata goes in the package's
    ``extra/`` folder, as ``torch.export.save`` puts a user's extra files.
    """

    name = "aot_inductor"
    file_name = "model.pt2"

    def __init__(self, freeze: bool = True) -> None:
        # Inductor's freezing folds the weights into the graph as constants, so CPU matmuls
        # use prepacked (oneDNN) weights: the counterpart of torch.jit.freeze.
        self.freeze = freeze

    def export(self, model: torch.nn.Module, plan: ExportPlan, method: str) -> torch.nn.Module:
        from torch.export.pt2_archive._package import package_pt2

        model = model.eval()
        dynamic = plan.dynamic_shapes or [{0: Dim("batch", min=1)} for _ in plan.example_inputs]
        try:
            with torch.no_grad():
                program = torch.export.export(
                    model, plan.example_inputs, dynamic_shapes=tuple(dynamic), strict=False
                )
        except Exception as error:  # torch.export raises many types; the user needs one message
            raise ExportError(
                f"torch.export could not capture the model: {first_lines(error, 6)}\n"
                "Data-dependent Python control flow is the usual cause; save_mode 'torchscript' "
                "(export_method 'trace') records one path through it and may work."
            ) from error
        try:
            aoti_files = torch._inductor.aot_compile(
                program.module(),
                plan.example_inputs,
                options={"aot_inductor.package": True, "freezing": self.freeze},
            )
        except Exception as error:
            raise ExportError(
                f"AOTInductor could not compile the exported model: {first_lines(error, 6)}\n"
                "save_mode 'torchscript' may work."
            ) from error
        with tempfile.TemporaryDirectory(prefix="ts-handlers-aoti-") as folder:
            package = Path(folder) / self.file_name
            package_pt2(package, aoti_files=aoti_files)
            runner, _ = self.load(package, torch.device("cpu"))
        return AOTInductorModel(runner, aoti_files)

    def save(self, exported: torch.nn.Module, path: Path, metadata: dict[str, Any]) -> None:
        from torch.export.pt2_archive._package import package_pt2

        if not isinstance(exported, AOTInductorModel) or exported.aoti_files is None:
            raise ExportError("aot_inductor saves only a model it exported itself")
        package_pt2(
            path, aoti_files=exported.aoti_files, extra_files={METADATA_FILE: json.dumps(metadata)}
        )

    def load(self, path: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
        from torch.export.pt2_archive._package import load_pt2

        if device.type != "cpu":
            raise ExportError(
                f"this {self.file_name} was compiled for CPU and cannot run on {device}; build "
                "the archive on a machine with that device"
            )
        contents = load_pt2(path)
        if "model" not in contents.aoti_runners:
            raise ExportError(f"{path.name} holds no AOTInductor model")
        runner = contents.aoti_runners["model"]
        _check_cpu_isa(path, runner.get_metadata().get("AOTI_CPU_ISA", ""))
        metadata = json.loads(contents.extra_files.get(METADATA_FILE) or "{}")
        return AOTInductorModel(runner).eval(), metadata


# The instruction sets AOTInductor names in a package (AOTI_CPU_ISA, e.g. "AVX512 AVX512_VNNI")
# and how to ask this CPU for each without a compiler (Inductor's own check compiles a probe,
# and a serving image may have no compiler).
_CPU_ISA_CHECKS: dict[str, Callable[[], bool]] = {
    "AVX2": lambda: torch.cpu._is_avx2_supported(),
    "AVX512": lambda: torch.cpu._is_avx512_supported(),
    "AVX512_VNNI": lambda: torch.cpu._is_vnni_supported(),
    "AVX512_BF16": lambda: torch.cpu._is_avx512_bf16_supported(),
    "AMX_TILE": lambda: torch.cpu._is_amx_tile_supported(),
}


def _check_cpu_isa(path: Path, package_isa: str) -> None:
    """Refuses, at load, a package whose kernels use instructions this CPU lacks: running it
    would kill the worker with SIGILL on the first request instead."""
    missing = [
        name
        for name in package_isa.upper().split()
        if name in _CPU_ISA_CHECKS and not _CPU_ISA_CHECKS[name]()
    ]
    if missing:
        raise ExportError(
            f"{path.name} was compiled for {package_isa} and this CPU lacks {', '.join(missing)}: "
            "rebuild the archive on a machine with this CPU, or use save_mode 'torchscript'"
        )


def _onnx_format(**options: Any) -> ExportFormat:
    # Imported when asked for: the module imports this one.
    from ts_handlers.onnx_format import ONNXFormat

    return ONNXFormat(**options)


FORMATS: dict[str, Callable[..., ExportFormat]] = {
    "torchscript": TorchScriptFormat,
    "aot_inductor": AOTInductorFormat,
    "onnx": _onnx_format,
}


def format_for(save_mode: str, **options: Any) -> ExportFormat:
    try:
        return FORMATS[save_mode](**options)
    except KeyError:
        raise ExportError(
            f"save_mode {save_mode!r} has no exporter; available: {', '.join(FORMATS)}"
        ) from None


def load_artifact(
    model_dir: Path, serialized_file: str, device: torch.device, config: Any = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Loads the serialized model of an archive with the format its file name belongs to;
    ``config``, the archive's parsed config, carries the format's serving settings."""
    for factory in FORMATS.values():
        export_format = factory()
        if serialized_file in (export_format.file_name, FLOAT32_PREFIX + export_format.file_name):
            if config is not None:
                export_format.configure(config)
            return export_format.load(model_dir / serialized_file, device)
    # An archive made by hand (torch-model-archiver --serialized-file traced_model.pt): the
    # manifest names the file, whatever its name; its contents say which format reads it.
    return load_serialized_file(model_dir / serialized_file, device)


def serialized_format(path: Path) -> str:
    """The format of a serialized model file by its contents: ``torchscript`` (a zip holding
    ``code/``), ``aot_inductor`` (a PT2 package), ``state_dict`` (``torch.save`` output or
    safetensors), or ``unknown``."""
    if path.suffix == ".safetensors":
        return "state_dict"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "unknown" if path.suffix not in (".bin", ".pth", ".pt") else "state_dict"
    if any("/code/" in name for name in names) and any(
        name.endswith("constants.pkl") for name in names
    ):
        return "torchscript"
    if any("aotinductor" in name for name in names) or any(
        name.endswith("archive_format") for name in names
    ):
        return "aot_inductor"
    if any(name.endswith("data.pkl") for name in names):
        return "state_dict"
    return "unknown"


def load_serialized_file(
    path: Path, device: torch.device
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Loads a serialized model of any file name by what it holds; a file no format reads is
    refused with what to do instead."""
    if not path.is_file():
        raise ExportError(f"the archive has no {path.name} (the manifest's serializedFile)")
    kind = serialized_format(path)
    if kind in FORMATS:
        return FORMATS[kind]().load(path, device)
    if kind == "state_dict":
        raise ExportError(
            f"{path.name} holds weights (a state_dict), not a graph: for a Hugging Face "
            "checkpoint set save_mode 'pretrained' in setup_config.json and add config.json (and "
            "the tokenizer files) with --extra-files; for another model, build the archive with "
            "ts-handlers build (serialized_file + model_file + model_class)"
        )
    raise ExportError(
        f"{path.name} is neither a TorchScript file nor an AOTInductor package; save the model "
        "with torch.jit.trace/script + torch.jit.save, or use save_mode 'pretrained' for a "
        "Hugging Face checkpoint"
    )


def one_at_a_time(model: Callable[..., torch.Tensor]) -> Reference:
    """A reference that runs each row of a batch alone (for graphs with no eager model)."""

    def reference(*inputs: torch.Tensor) -> torch.Tensor:
        rows = [model(*(tensor[i : i + 1] for tensor in inputs)) for i in range(len(inputs[0]))]
        return torch.cat(rows)

    return reference


@dataclass
class VerificationReport:
    # What a case must meet: "atol 0.0001", or a reduced precision's gate.
    criterion: str
    # What the exported outputs were compared with: "eager" or "one input at a time".
    reference: str = "eager"
    cases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max((case["max_abs_diff"] for case in self.cases), default=0.0)

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(case["passed"] for case in self.cases)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_abs_diff": self.max_abs_diff, "passed": self.passed}

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [f"verification against {self.reference} ({self.criterion}): {verdict}"]
        for case in self.cases:
            shape = "x".join(str(size) for size in case["shape"])
            status = "ok" if case["passed"] else "MISMATCH"
            detail = case.get("error") or ", ".join(
                f"{name} {value:.2e}" if name == "max_abs_diff" else f"{name} {value:.6g}"
                for name, value in case["figures"].items()
            )
            lines.append(f"  input {shape:>12}: {detail}  {status}")
        return "\n".join(lines)


def verify(
    eager: Callable[..., torch.Tensor],
    exported: Callable[..., torch.Tensor],
    input_sets: Iterable[Sequence[torch.Tensor]],
    atol: float,
    reference: str = "eager",
    judge: Judge | None = None,
    criterion: str = "",
) -> VerificationReport:
    """Runs both models on every input set and records the largest absolute difference.

    Each case passes within ``atol``, or by ``judge`` when one is given (reduced precision).
    A non-finite output fails its case: NaN compares unequal to everything, and an infinity in
    both would otherwise pass as a difference of NaN.
    """
    report = VerificationReport(criterion=criterion or f"atol {atol:g}", reference=reference)
    with torch.inference_mode():
        for inputs in input_sets:
            case: dict[str, Any] = {"shape": list(inputs[0].shape)}
            try:
                expected = eager(*inputs)
                actual = exported(*inputs)
                if expected.shape != actual.shape:
                    raise ExportError(
                        f"shape {tuple(actual.shape)} differs from eager {tuple(expected.shape)}"
                    )
                if not bool(torch.isfinite(actual).all()):
                    raise ExportError("the exported model returned NaN or infinite values")
                diff = (expected.float() - actual.float()).abs().max().item()
                figures, passed = {"max_abs_diff": diff}, diff <= atol
                if judge is not None:
                    judged, passed = judge(expected, actual, inputs)
                    figures.update(judged)
                case.update(max_abs_diff=diff, figures=figures, passed=passed)
            except Exception as error:  # a trace that cannot run at this shape is a failed case
                case.update(max_abs_diff=float("inf"), passed=False, error=str(error)[:200])
            report.cases.append(case)
    return report
