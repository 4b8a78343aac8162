"""Builds and runs ``cpp/model_runner``: an archive's ``model.pt`` served by LibTorch, no Python.

Tooling, not runtime: nothing a TorchServe worker imports uses it. It exists to show (and test,
``integration_tests/test_libtorch.py``) that a C++ service gets the answers the handler gets;
docs/without-python.md explains what such a service must do around the model.

The runner is built with cmake against the LibTorch inside the installed torch wheel, into
``build/model_runner/``, once: a later call reuses the binary while it is newer than every source
file and was built for the same torch. ::

    python -m ts_handlers.tools.libtorch            # build (or reuse), print the binary's path
    python -m ts_handlers.tools.libtorch --force    # rebuild from scratch

Inputs go to the runner, and outputs come back, as ``torch.save`` files (a tuple of tensors):
LibTorch reads and writes that format itself (``torch::pickle_load`` / ``torch::pickle_save``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("ts_handlers.tools.libtorch")

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIR = ROOT / "cpp/model_runner"
BUILD_DIR = ROOT / "build/model_runner"
EXECUTABLE = "ts_model_runner"
# What the binary was built for, beside it: a different torch (version, place, ABI) means a
# rebuild even when no source changed, since the binary links that wheel's libtorch.so.
STAMP_FILE = "ts_model_runner.build.json"
SOURCE_SUFFIXES = (".cpp", ".h", ".hpp", ".txt", ".cmake")
BUILD_TYPE = "Release"
# The machines this project runs on have 2 cores; the runner is one translation unit anyway.
JOBS = 2
# Seconds one model run may take (the models here take well under one).
RUN_TIMEOUT = 300


class RunnerError(RuntimeError):
    """The runner could not be built, or it failed on a model."""


@dataclass
class RunnerResult:
    """What one run of the runner printed and wrote."""

    outputs: tuple[torch.Tensor, ...]
    # The archive's metadata as the C++ side read it from model.pt's _extra_files.
    metadata: dict[str, Any]
    # Every "key: value" line of its stdout, in order (input, output, forward_ms, ...).
    lines: list[tuple[str, str]] = field(default_factory=list)

    def values(self, key: str) -> list[str]:
        return [value for name, value in self.lines if name == key]


def torch_build_facts() -> dict[str, Any]:
    """The facts about the installed torch that the binary depends on."""
    import torch.utils

    return {
        "torch_version": torch.__version__,
        "cmake_prefix_path": str(torch.utils.cmake_prefix_path),
        "cxx11_abi": int(torch.compiled_with_cxx11_abi()),
        "build_type": BUILD_TYPE,
    }


def source_files(source_dir: Path) -> list[Path]:
    return sorted(
        path for path in source_dir.rglob("*") if path.is_file() and path.suffix in SOURCE_SUFFIXES
    )


def stale_reason(source_dir: Path, build_dir: Path) -> str | None:
    """Why the binary in ``build_dir`` must be (re)built; None when it is up to date."""
    executable = build_dir / EXECUTABLE
    if not executable.is_file():
        return f"no {executable}"
    built_for = _built_for(build_dir)
    if built_for is None:
        return f"no readable {STAMP_FILE}"
    facts = torch_build_facts()
    changed = [key for key in facts if built_for.get(key) != facts[key]]
    if changed:
        return "built for another torch: " + ", ".join(
            f"{key} {built_for.get(key)!r} -> {facts[key]!r}" for key in changed
        )
    built = executable.stat().st_mtime
    newer = [path.name for path in source_files(source_dir) if path.stat().st_mtime > built]
    if newer:
        return f"sources changed since the build: {', '.join(newer)}"
    return None


def _built_for(build_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((build_dir / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_runner(
    source_dir: Path = SOURCE_DIR,
    build_dir: Path = BUILD_DIR,
    *,
    force: bool = False,
    jobs: int = JOBS,
) -> Path:
    """The runner's executable, built with cmake if it is missing or out of date."""
    executable = build_dir / EXECUTABLE
    reason = "--force" if force else stale_reason(source_dir, build_dir)
    if reason is None:
        logger.info("%s is up to date; reusing it", executable)
        return executable
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RunnerError(
            "building the LibTorch runner needs cmake and a C++17 compiler: "
            "apt-get install cmake g++ (or pip install cmake)"
        )
    facts = torch_build_facts()
    built_for = _built_for(build_dir)
    # A rebuild for another torch (or a forced one) starts clean: CMakeCache.txt remembers the
    # old wheel's Torch_DIR, and objects compiled against its headers must not be reused. A
    # source change alone is left to cmake's own dependency tracking.
    clean = force or (built_for is not None and built_for != facts)
    stamp = build_dir / STAMP_FILE
    stamp.unlink(missing_ok=True)  # removed until this build succeeds
    if clean:
        (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
    logger.info("building %s (%s), torch %s", executable, reason, facts["torch_version"])
    started = time.perf_counter()
    _cmake(
        cmake,
        "-S",
        str(source_dir),
        "-B",
        str(build_dir),
        f"-DCMAKE_BUILD_TYPE={BUILD_TYPE}",
        f"-DCMAKE_PREFIX_PATH={facts['cmake_prefix_path']}",
        f"-DTORCH_CXX11_ABI={facts['cxx11_abi']}",
    )
    configured = time.perf_counter()
    build = [cmake, "--build", str(build_dir), "-j", str(jobs)]
    _cmake(*build, *(["--clean-first"] if clean else []))
    finished = time.perf_counter()
    stamp.write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "built %s in %.1f s (configure %.1f s, compile and link %.1f s)",
        executable,
        finished - started,
        configured - started,
        finished - configured,
    )
    return executable


def _cmake(*command: str) -> None:
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        output = (completed.stdout + completed.stderr).strip()
        raise RunnerError(f"{' '.join(command[:2])} ... failed:\n{output[-4000:]}")


def run_runner(
    runner: Path, model_pt: Path, inputs: Sequence[torch.Tensor], timeout: float = RUN_TIMEOUT
) -> RunnerResult:
    """Runs ``model_pt`` on ``inputs`` (the forward's arguments, in order) in the C++ runner."""
    with tempfile.TemporaryDirectory(prefix="ts_model_runner_") as folder:
        inputs_file = Path(folder) / "inputs.pt"
        outputs_file = Path(folder) / "outputs.pt"
        # A tuple: the runner takes a tuple or a list, and a tuple is what it writes back.
        torch.save(tuple(tensor.detach().cpu() for tensor in inputs), inputs_file)
        completed = subprocess.run(
            [str(runner), str(model_pt), str(inputs_file), str(outputs_file)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if completed.returncode != 0:
            raise RunnerError(
                f"{runner.name} failed (exit {completed.returncode}) on {model_pt}:\n"
                f"{completed.stderr.strip()[-4000:]}"
            )
        # weights_only (torch.load's default) is enough: the runner writes plain tensors.
        outputs = torch.load(outputs_file, weights_only=True)
    lines = [
        (key, value)
        for key, _, value in (line.partition(": ") for line in completed.stdout.splitlines())
    ]
    metadata = [value for key, value in lines if key == "metadata"]
    return RunnerResult(
        outputs=tuple(outputs),
        metadata=json.loads(metadata[0]) if metadata else {},
        lines=lines,
    )


def run_model(runner: Path, model_pt: Path, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The one output tensor of ``model_pt`` run on ``inputs`` by the C++ runner."""
    outputs = run_runner(runner, model_pt, inputs).outputs
    if len(outputs) != 1:
        raise RunnerError(f"{model_pt} returned {len(outputs)} tensors; use run_runner")
    return outputs[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--build-dir", type=Path, default=BUILD_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(build_runner(build_dir=args.build_dir, force=args.force))
    except RunnerError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
