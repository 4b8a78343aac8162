"""The export side of the formats, behind one small interface.

An :class:`ExportFormat` turns an eager module into a servable artifact and saves it with
metadata; its load side (what a worker runs) is the :class:`~ts_handlers.artifacts.ArtifactFormat`
it extends, in :mod:`ts_handlers.artifacts`, which handlers reach through
:func:`~ts_handlers.artifacts.load_artifact`. This module imports that one, never the other way,
so a worker serving an archive loads none of the export code. Three formats exist:

* ``torchscript``: ``torch.jit.trace`` or ``script``, frozen, saved as ``model.pt`` (LibTorch
  loads it too, see docs/without-python.md);
* ``aot_inductor``: ``torch.export.export`` with dynamic batch (and sequence) dimensions,
  compiled ahead of time by AOTInductor and packaged as ``model.pt2``. TorchServe 0.12's own
  loader does not read that package; our handlers do.
* ``onnx``: ``torch.onnx.export`` with the same dynamic dimensions, saved as ``model.onnx`` and
  run by ONNX Runtime (``ts_handlers/onnx_export.py`` exports, ``onnx_format.py`` serves; the
  ``[onnx]`` extra).

Every export is checked by :func:`ts_handlers.verification.verify` against the eager model on
several input shapes; the build refuses to write an archive whose exported model disagrees.
"""

from __future__ import annotations

import json
import tempfile
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.export import Dim

from ts_handlers.artifacts import (
    METADATA_FILE,
    AOTInductorArtifact,
    AOTInductorModel,
    ArtifactFormat,
    ExportError,
    TorchScriptArtifact,
)
from ts_handlers.errors import first_lines
from ts_handlers.verification import Reference


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


class ExportFormat(ArtifactFormat):
    """A format's export side, on top of its load side (:mod:`ts_handlers.artifacts`)."""

    @abstractmethod
    def export(self, model: torch.nn.Module, plan: ExportPlan, method: str) -> torch.nn.Module:
        """The exported model, callable like the eager one (verification runs it)."""

    @abstractmethod
    def save(self, exported: torch.nn.Module, path: Path, metadata: dict[str, Any]) -> None: ...

    def export_reduced(
        self, model: torch.nn.Module, plan: ExportPlan, config: Any
    ) -> tuple[torch.nn.Module, dict[str, Any]] | None:
        """A reduced-precision export done by the format itself on its own graph (ONNX Runtime
        quantizes the ONNX graph), with the precision report; None: the build converts the
        eager model (precision.py) and exports that with :meth:`export`."""
        return None


class TorchScriptFormat(TorchScriptArtifact, ExportFormat):
    """``torch.jit.trace`` or ``script``, frozen unless told not to, saved as ``model.pt``."""

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


class AOTInductorFormat(AOTInductorArtifact, ExportFormat):
    """``torch.export`` + AOTInductor: one ``.pt2`` package holding a compiled shared library.

    The names are upstream's: ``torch.export.export`` captures the graph with symbolic batch
    and sequence sizes, ``torch._inductor`` compiles it for this machine's device and CPU
    instruction set, and the PT2 archive format packages it. Our metadata goes in the package's
    ``extra/`` folder, as ``torch.export.save`` puts a user's extra files.
    """

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


def _onnx_format(**options: Any) -> ExportFormat:
    # Imported when asked for: the module imports this one.
    from ts_handlers.onnx_export import ONNXFormat

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
