"""Reading an archive's serialized model, in any format: what a worker loads, and nothing more.

A format's load side is an :class:`ArtifactFormat`; handlers only ever call
:func:`load_artifact`, which picks the format by the serialized file's name (fixed per format)
or, for a file of another name (an archive made by hand), by its contents. Three exist:

* ``torchscript``: ``model.pt``, read by ``torch.jit.load`` (LibTorch reads it too);
* ``aot_inductor``: ``model.pt2``, an AOTInductor package, refused on a CPU that lacks the
  instruction sets it was compiled for;
* ``onnx``: ``model.onnx``, an ONNX Runtime session (``ts_handlers/onnx_format.py``).

The export side of each format (trace, script, compile, save, verify) is in
:mod:`ts_handlers.export`, which imports this module; this one imports nothing of the build.
"""

from __future__ import annotations

import json
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

METADATA_FILE = "ts_handlers.json"  # name inside TorchScript's _extra_files
# A reduced-precision archive also carries its float32 graph, under this prefix (cpu.py).
FLOAT32_PREFIX = "float32_"


class ExportError(RuntimeError):
    """An exported model that cannot be trusted (nothing is written) or cannot be loaded."""


class ArtifactFormat(ABC):
    """The load side of a format: its fixed file name and how a worker reads that file."""

    name: ClassVar[str]
    # Fixed per format: the handler never has to guess which file holds the model.
    file_name: ClassVar[str]

    def configure(self, config: Any) -> None:  # noqa: B027 (optional: most formats need none)
        """Takes the serving settings this format reads from the archive's config (none here)."""

    @abstractmethod
    def load(self, path: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]: ...


class TorchScriptArtifact(ArtifactFormat):
    name = "torchscript"
    file_name = "model.pt"

    def load(self, path: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
        extra_files = {METADATA_FILE: ""}
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra_files)
        metadata = json.loads(extra_files[METADATA_FILE] or "{}")
        return module.eval(), metadata


class AOTInductorModel(torch.nn.Module):
    """A compiled AOTInductor package, callable like the eager model.

    Holds the files AOTInductor generated so that ``AOTInductorFormat.save`` (export.py)
    packages them again with the metadata, without compiling twice.
    """

    def __init__(self, runner: Callable[..., Any], aoti_files: list[Any] | None = None) -> None:
        super().__init__()
        self.runner = runner
        self.aoti_files = aoti_files

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.runner(*inputs)


class AOTInductorArtifact(ArtifactFormat):
    """An AOTInductor ``.pt2`` package; our metadata is in its ``extra/`` folder."""

    name = "aot_inductor"
    file_name = "model.pt2"

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


def _onnx_artifact() -> ArtifactFormat:
    # Imported when asked for: the module imports this one.
    from ts_handlers.onnx_format import ONNXArtifact

    return ONNXArtifact()


# Each format's load side, built bare; load_artifact hands it the archive's config.
LOADERS: dict[str, Callable[[], ArtifactFormat]] = {
    "torchscript": TorchScriptArtifact,
    "aot_inductor": AOTInductorArtifact,
    "onnx": _onnx_artifact,
}


def load_artifact(
    model_dir: Path, serialized_file: str, device: torch.device, config: Any = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Loads the serialized model of an archive with the format its file name belongs to;
    ``config``, the archive's parsed config, carries the format's serving settings."""
    for factory in LOADERS.values():
        artifact = factory()
        if serialized_file in (artifact.file_name, FLOAT32_PREFIX + artifact.file_name):
            if config is not None:
                artifact.configure(config)
            return artifact.load(model_dir / serialized_file, device)
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
    if kind in LOADERS:
        return LOADERS[kind]().load(path, device)
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
