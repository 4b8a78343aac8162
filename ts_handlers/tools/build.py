"""Build a TorchServe archive from ``archiver_configs/<name>/``.

    python -m ts_handlers.tools.build archiver_configs/mnist    # -> model_store/mnist.mar
    python -m ts_handlers.tools.build --all                     # every archiver_configs/ folder
    python -m ts_handlers.tools.build archiver_configs/mnist --self-contained --name mnist_sc

A folder holds ``setup_config.json`` (what to export and how to serve it), ``model-config.yaml``
(TorchServe's batching and worker settings) and optionally ``index_to_name.json``. The build
loads the eager checkpoint, exports it, verifies the export against eager on several input
shapes, and only then writes the archive, with the resolved config and the verification figures
inside. A failed verification writes nothing and exits non-zero.

By default the archive names its handler by module path
(``ts_handlers.image_classification:handle``), so the TorchServe environment must have
``ts_handlers`` installed (plugin mode). ``--self-contained`` embeds the package's runtime (not
``ts_handlers.tools`` nor ``ts_handlers.exporters``) in the archive so a stock TorchServe
serves it too.

``--list-tasks`` prints the tasks this install can build: the built-in ones and those other
packages register (``ts_handlers.tasks``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ts_handlers import cpu, precision
from ts_handlers.artifacts import FLOAT32_PREFIX
from ts_handlers.config import SETUP_CONFIG_FILE, ConfigError, HandlerConfig
from ts_handlers.export import ExportError, ExportPlan, format_for
from ts_handlers.labels import LABELS_FILE, read_labels
from ts_handlers.tasks import load_task_config, tasks
from ts_handlers.verification import verify

logger = logging.getLogger("ts_handlers.tools.build")

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # ts_handlers/
MODEL_CONFIG_FILE = "model-config.yaml"
REPORT_FILE = "export_report.json"
ENTRY_MODULE = "ts_handlers_entry"
# Keys naming files or folders; a relative one is read from the config folder, wherever the
# build runs from.
PATH_KEYS = ("model_name", "serialized_file", "model_file", "calibration_file")


def build_archive(
    config_dir: Path,
    model_store: Path,
    *,
    name: str | None = None,
    self_contained: bool = False,
    force: bool = False,
) -> Path | None:
    """Exports, verifies and archives one model; returns the .mar path (None if up to date)."""
    name = name or config_dir.name
    task, config = load_task_config(config_dir / SETUP_CONFIG_FILE)
    # The archive keeps the config as written; the export reads the files it names.
    export_config, hub_model = resolve_hub_model(config, config_dir)
    export_config = resolve_paths(export_config, config_dir)
    mar_path = model_store / f"{name}.mar"
    if not force and _up_to_date(mar_path, config_dir, export_config):
        print(f"[{name}] up to date: {mar_path}")
        return None

    started = time.perf_counter()
    print(f"[{name}] loading the model ({task.mode})", flush=True)
    plan = task.prepare_export(export_config)
    # Wall-clock seconds per stage, kept in the report (docs/performance.md compares formats).
    seconds = {"load": time.perf_counter() - started}
    # Refused before anything is exported or written: a wrong labels file fails every request.
    read_labels(config_dir / LABELS_FILE, plan.num_classes)
    with tempfile.TemporaryDirectory(prefix=f"ts-handlers-{name}-") as staging_name:
        staging = Path(staging_name)
        files = staging / "files"
        files.mkdir()
        report: dict[str, Any] = {"name": name, "mode": task.mode, "save_mode": config.save_mode}
        if hub_model is not None:
            report["model_source"] = hub_model.report()
        serialized = None
        if config.save_mode != "pretrained":
            print(f"[{name}] exporting ({config.save_mode}) and verifying", flush=True)
            serialized, verification = _export(export_config, plan, files, seconds)
            report["verification"] = verification
        resolved = {**config.to_dict(), **plan.resolved}
        report.update(metadata=plan.metadata, resolved=plan.resolved, seconds=seconds)
        (files / SETUP_CONFIG_FILE).write_text(json.dumps(resolved, indent=2))
        (files / REPORT_FILE).write_text(json.dumps(report, indent=2))
        for source in [config_dir / LABELS_FILE, *plan.extra_files]:
            if source.is_file():
                shutil.copy2(source, files / source.name)
        extra_dirs = [source for source in plan.extra_files if source.is_dir()]
        print(f"[{name}] packaging", flush=True)
        handler = task.entry_point
        if self_contained:
            handler = _embed_package(files, task.entry_point)
        _package(
            name,
            handler=handler,
            serialized=serialized,
            files=files,
            extra_dirs=extra_dirs,
            model_config=config_dir / MODEL_CONFIG_FILE,
            staging=staging,
            mar_path=mar_path,
        )
    size_mb = mar_path.stat().st_size / 1e6
    print(f"[{name}] wrote {mar_path} ({size_mb:.1f} MB) in {time.perf_counter() - started:.1f}s")
    return mar_path


def resolve_hub_model(config: HandlerConfig, config_dir: Path) -> tuple[HandlerConfig, Any]:
    """A ``model_name`` that is a Hugging Face Hub id, resolved to its cached snapshot folder
    (tools/hub.py); (the config, the HubModel or None)."""
    from ts_handlers.tools import hub

    if not hub.looks_like_hub_id(config.model_name, config_dir):
        return config, None
    hub_model = hub.resolve(config.model_name)
    print(f"model_name {hub_model.repo_id}: revision {hub_model.revision}", flush=True)
    return config.replace(model_name=str(hub_model.folder)), hub_model


def resolve_paths(config: HandlerConfig, config_dir: Path) -> HandlerConfig:
    """The config with every relative path key made relative to ``config_dir``."""
    resolved = {
        key: str((config_dir / value).resolve())
        for key in PATH_KEYS
        if (value := getattr(config, key)) and not Path(value).is_absolute()
    }
    return config.replace(**resolved)


def _export(
    config: HandlerConfig, plan: ExportPlan, files: Path, seconds: dict[str, float]
) -> tuple[Path, dict[str, Any]]:
    """Exports and verifies; records the export and verification seconds in ``seconds``."""
    export_format = format_for(config.save_mode, freeze=config.freeze)
    reduced = precision.is_reduced(config)
    precision_report: dict[str, Any] = {}
    if plan.exported is not None:
        if config.save_mode != "torchscript":
            raise ConfigError(
                f"save_mode {config.save_mode!r} exports an eager model, and a TorchScript "
                "serialized_file has none: use save_mode 'torchscript', or give model_file + "
                "model_class + a state_dict"
            )
        if reduced:
            raise ConfigError(
                f"{precision.precision_name(config)} converts the eager model, and a TorchScript "
                "serialized_file has none: convert before scripting, or give model_file + "
                "model_class + a state_dict"
            )
        # The user's own graph: nothing to export, and no eager model to compare it with.
        exported, against = plan.exported, "itself, one input at a time (no eager model)"
        reference = plan.reference
    elif plan.model is not None:
        model = plan.model
        started = time.perf_counter()
        # A format with its own quantizer (ONNX Runtime) exports and reduces in one step.
        own = export_format.export_reduced(model, plan, config) if reduced else None
        if own is not None:
            exported, precision_report = own
            seconds["export_and_reduce_precision"] = time.perf_counter() - started
        else:
            if reduced:
                model, precision_report = precision.reduce_precision(config, plan)
                seconds["reduce_precision"] = time.perf_counter() - started
            started = time.perf_counter()
            exported = export_format.export(model, plan, config.export_method)
            seconds["export"] = time.perf_counter() - started
        against, reference = "eager", plan.reference or plan.model
    else:
        raise ExportError(f"save_mode {config.save_mode!r} needs an eager model to export")
    assert reference is not None
    started = time.perf_counter()
    judge = criterion = None
    if reduced:
        gate = precision.gate_for(config, plan.output_kind)
        criterion = f"{precision.precision_name(config)} accuracy gate against float32"
        judge = precision.shape_judge(plan, gate)
        against = f"float32 {against}"
        calibration = precision.calibration_figures(reference, exported, plan)
        failures = gate.failures(calibration)
        precision_report.update(gate=asdict(gate), calibration=calibration)
        print(precision.summary(config, precision_report, failures))
        if failures:
            raise ExportError(
                f"the {precision.precision_name(config)} export fails its accuracy gate on "
                f"{plan.calibration_source}: {'; '.join(failures)}"
            )
    report = verify(
        reference, exported, plan.verify_inputs, config.verify_atol, against, judge, criterion
    )
    print(report.summary())
    verification: dict[str, Any] = {
        "eager_reference": plan.exported is None,
        "dynamic_shapes": report.to_dict(),
    }
    if precision_report:
        verification["precision"] = precision_report
    if not report.passed:
        if not plan.fixed_shape_inputs:
            raise ExportError(f"exported model differs from {against}:\n{report.summary()}")
        print("the export does not hold at every shape; checking fixed-shape (padded) inputs")
        fixed_reference = plan.fixed_shape_reference or reference
        fixed = verify(
            fixed_reference,
            exported,
            plan.fixed_shape_inputs,
            config.verify_atol,
            against,
            judge,
            criterion,
        )
        print(fixed.summary())
        verification["fixed_shape"] = fixed.to_dict()
        if not fixed.passed:
            raise ExportError(f"exported model differs from {against}:\n{fixed.summary()}")
        plan.resolved["pad_to_max_length"] = True
    elif plan.fixed_shape_inputs:
        # Every shape verified: pad per batch, unless the config itself asks for max_length.
        plan.resolved.setdefault("pad_to_max_length", getattr(config, "pad_to_max_length", False))
    seconds["verify"] = time.perf_counter() - started
    metadata = {"verification": verification, **plan.metadata, **plan.resolved}
    if reduced:
        fixed = "fixed_shape" in verification
        metadata["precision"] = _float32_fallback(
            config, plan, exported, export_format, files, precision_report, seconds, fixed
        )
    path = files / export_format.file_name
    export_format.save(exported, path, metadata)
    return path, verification


def _float32_fallback(
    config: HandlerConfig,
    plan: ExportPlan,
    exported: Any,
    export_format: Any,
    files: Path,
    precision_report: dict[str, Any],
    seconds: dict[str, float],
    fixed_shape: bool,
) -> dict[str, Any]:
    """Exports, verifies and saves the float32 graph a reduced archive also carries, and times
    both graphs on this CPU: the handler serves the float32 one where the reduced one is not
    fast (ts_handlers/cpu.py)."""
    assert plan.model is not None
    started = time.perf_counter()
    inputs = plan.fixed_shape_inputs if fixed_shape else plan.verify_inputs
    reference = (plan.fixed_shape_reference if fixed_shape else None) or plan.reference
    # A TorchScript trace first: seconds where AOTInductor compiles for minutes, and as fast in
    # float32 (docs/performance.md); the archive's own format where the trace does not hold.
    candidates = [(export_format, config.export_method)]
    if export_format.name != "torchscript":
        candidates.insert(0, (format_for("torchscript", freeze=config.freeze), "trace"))
    failures = []
    for fallback_format, method in candidates:
        print(f"exporting the float32 fallback ({fallback_format.name})", flush=True)
        try:
            float32_graph = fallback_format.export(plan.model, plan, method)
        except ExportError as error:
            failures.append(f"{fallback_format.name}: {error}")
            continue
        report = verify(reference or plan.model, float32_graph, inputs, config.verify_atol)
        if report.passed:
            break
        failures.append(f"{fallback_format.name}:\n{report.summary()}")
    else:
        raise ExportError("no float32 fallback verifies against eager:\n" + "\n".join(failures))
    precision_report["float32_fallback"] = {
        "format": fallback_format.name,
        "max_abs_diff": report.max_abs_diff,
    }
    file_name = FLOAT32_PREFIX + fallback_format.file_name
    fallback_format.save(float32_graph, files / file_name, {**plan.metadata, **plan.resolved})
    seconds["float32_fallback"] = time.perf_counter() - started
    started = time.perf_counter()
    name = precision.precision_name(config)
    speed = precision.measure_speed(float32_graph, exported, plan)
    seconds["speed"] = time.perf_counter() - started
    precision_report["speed"] = speed
    print(precision.speed_summary(name, speed))
    slower = [
        case for case, figures in speed["cases"].items() if figures["ratio"] < cpu.MIN_SPEEDUP
    ]
    if slower:
        warning = (
            f"{name} ran under {cpu.MIN_SPEEDUP:g}x float32 on this CPU ({', '.join(slower)}): "
            "the handler serves the float32 graph on CPUs with these instruction sets"
        )
        precision_report.setdefault("warnings", []).append(warning)
        print(f"WARNING: {warning}")
    return {
        "name": name,
        "kernel": precision_report.get("recipe", {}).get("kernel"),
        "float32_file": file_name,
        "speed": speed,
    }


def _embed_package(files: Path, handler: str) -> str:
    """Copies ts_handlers into the archive and writes an entry module that imports from it."""
    shutil.copytree(
        PACKAGE_DIR,
        files / "package" / "ts_handlers",
        # The runtime only: the tooling (build, server, client, demo models) and the tasks'
        # export code stay out.
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "tools", "exporters"),
    )
    module, function = handler.split(":")
    entry = files / f"{ENTRY_MODULE}.py"
    entry.write_text(
        '"""Entry point of a self-contained archive: the embedded ts_handlers serves it."""\n'
        f"from {module} import {function}  # noqa: F401\n"
    )
    return str(entry)


def _package(
    name: str,
    *,
    handler: str,
    serialized: Path | None,
    files: Path,
    extra_dirs: Iterable[Path],
    model_config: Path,
    staging: Path,
    mar_path: Path,
) -> None:
    """Writes the .mar with torch-model-archiver's own packager, then moves it into place."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import package_model
    from model_archiver.model_packaging_utils import ModelExportUtils

    extra = [
        str(path)
        for path in sorted(files.iterdir())
        if path.is_file() and path not in (serialized, Path(handler))
    ]
    # A folder given to the archiver has its *contents* copied to the archive root.
    extra += [str(path) for path in extra_dirs]
    if (files / "package").is_dir():
        extra.append(str(files / "package"))
    out_dir = staging / "out"
    out_dir.mkdir()
    archiver_config = ModelArchiverConfig(
        model_name=name,
        handler=handler,
        version="1.0",
        serialized_file=str(serialized) if serialized else None,
        extra_files=",".join(extra),
        export_path=str(out_dir),
        force=True,
        config_file=str(model_config) if model_config.is_file() else None,
    )
    manifest = ModelExportUtils.generate_manifest_json(archiver_config)
    if ":" in handler:
        # Plugin mode: the manifest names an installed module, so there is no file to copy.
        archiver_config = replace(archiver_config, handler=None)
    # The archiver stages files in <tempdir>/<name> and deletes that folder first; keep it inside
    # our own staging folder so it can never touch a user's /tmp/<name>.
    previous_tempdir = tempfile.tempdir
    tempfile.tempdir = str(staging)
    try:
        package_model(archiver_config, manifest)
    finally:
        tempfile.tempdir = previous_tempdir
    mar_path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(out_dir / f"{name}.mar", mar_path)


def _up_to_date(mar_path: Path, config_dir: Path, config: HandlerConfig) -> bool:
    if not mar_path.is_file():
        return False
    inputs = [config_dir, PACKAGE_DIR]
    inputs += [Path(v) for key in PATH_KEYS if (v := getattr(config, key)) and Path(v).exists()]
    newest = max(
        (path.stat().st_mtime for root in inputs for path in [root, *root.rglob("*")]),
        default=0.0,
    )
    return mar_path.stat().st_mtime > newest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config_dirs", nargs="*", type=Path, help="archiver_configs/<name> folders")
    parser.add_argument("--all", action="store_true", help="build every archiver_configs/* folder")
    parser.add_argument("--configs-root", type=Path, default=Path("archiver_configs"))
    parser.add_argument("--model-store", type=Path, default=Path("model_store"))
    parser.add_argument("--name", help="archive name (default: the folder name)")
    parser.add_argument("--self-contained", action="store_true", help="embed ts_handlers")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument(
        "--list-tasks", action="store_true", help="list the tasks (modes) this install can build"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.list_tasks:
        for mode, task in tasks().items():
            print(f"{mode:28} {task.entry_point}")
        return 0
    config_dirs = list(args.config_dirs)
    if args.all:
        config_dirs += sorted(
            p for p in args.configs_root.iterdir() if (p / SETUP_CONFIG_FILE).is_file()
        )
    if not config_dirs:
        parser.error("name at least one archiver_configs/<name> folder, or --all")
    if args.name and len(config_dirs) > 1:
        parser.error("--name applies to a single folder")
    for config_dir in config_dirs:
        try:
            build_archive(
                config_dir,
                args.model_store,
                name=args.name,
                self_contained=args.self_contained,
                force=args.force,
            )
        except (ConfigError, ExportError) as error:
            print(
                f"[{config_dir.name}] build failed, no archive written:\n{error}", file=sys.stderr
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
