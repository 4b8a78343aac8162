"""``ts-handlers import OLD.mar``: an archive made for TorchServe's Hugging Face example handler
(``Transformer_handler_generalized.py``), rewritten as a verified archive of ours.

The old archive holds the example's handler file, its ``setup_config.json``, a serialized
model (a graph traced as the example traces it, or ``save_pretrained`` weights with
``config.json``), ``index_to_name.json`` and the tokenizer files. The import:

* reads the config as this project reads TorchServe's example file (config.py): numbers given
  as text, its switches that mean nothing here dropped; ``model_name`` (the example's download
  source) is not needed, the archive's own files are used;
* ``save_pretrained`` weights: exported to TorchScript by the build and verified against the
  eager checkpoint (what ``transformers.pipeline`` runs), or kept as ``pretrained`` when the old
  config asks for explanations (they need the eager model);
* a traced graph: loaded as a worker loads a hand-made archive (handmade.py), so its inputs,
  class count and padding policy are derived and its batches checked against each text alone;
  the same graph is saved with those facts recorded (``ts_handlers.json``);
* either way the labels file is checked against the model's class count, and the new archive is
  loaded and answers sample texts as the old archive's files answer them under our handler,
  within ``verify_atol``; otherwise nothing is written.

The report (``<name>.import.json`` beside the archive, and printed) says what was checked and
against what.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from ts_handlers.config import (
    SETUP_CONFIG_FILE,
    TORCHSERVE_IGNORED_KEYS,
    ConfigError,
    parse_config,
    read_config_file,
)
from ts_handlers.labels import LABELS_FILE

MANIFEST = Path("MAR-INF") / "MANIFEST.json"
# Texts the old and the new archive must answer alike.
SAMPLE_TEXTS = (
    "the movie was great",
    "i hated every minute of this awful boring film, and the popcorn was stale too",
    "tea",
    "service was slow but the food was really tasty; we will come back next week",
    "What a WONDERFUL surprise!!!",
)
# The example's spelling of its modes in older releases.
MODE_SPELLINGS = {"sequence classification": "sequence_classification"}


def import_archive(old_mar: Path, model_store: Path, name: str | None = None) -> dict[str, Any]:
    """Writes ``model_store/<name>.mar`` from ``old_mar``; returns the report."""
    from ts_handlers.sequence_classification import SequenceClassificationConfig

    name = name or old_mar.stem
    if not old_mar.is_file():
        raise ConfigError(f"{old_mar} is not a file")
    report: dict[str, Any] = {"name": name, "imported_from": {"archive": old_mar.name}}
    with tempfile.TemporaryDirectory(prefix="ts-handlers-import-") as staging_name:
        staging = Path(staging_name)
        old = staging / "old"
        try:
            with zipfile.ZipFile(old_mar) as archive:
                archive.extractall(old)  # extractall keeps every member inside ``old``
        except zipfile.BadZipFile:
            raise ConfigError(f"{old_mar} is not a .mar (zip) archive") from None
        manifest = json.loads((old / MANIFEST).read_text()) if (old / MANIFEST).is_file() else {}
        model = manifest.get("model", {})
        serialized = str(model.get("serializedFile") or "")
        raw = read_config_file(old / SETUP_CONFIG_FILE)
        if not isinstance(raw, dict):
            raise ConfigError(f"{old_mar}'s {SETUP_CONFIG_FILE} is not a JSON object")
        raw, changes = translate(raw)
        config = parse_config(
            SequenceClassificationConfig, raw, f"{old_mar.name}:{SETUP_CONFIG_FILE}"
        )
        report["imported_from"].update(
            handler=model.get("handler"),
            serialized_file=serialized,
            replaced_by="ts_handlers.sequence_classification:handle",
            config_changes=changes,
        )
        # The old archive's files under our handler: the reference the new archive must match.
        (old / SETUP_CONFIG_FILE).write_text(json.dumps(config.to_dict()))
        reference = _load_handler(old, {"model": {**model, "serializedFile": serialized}})
        report["derived"] = _public(reference.export_metadata)
        expected = _answers(reference)
        mar_path = model_store / f"{name}.mar"
        if config.save_mode == "pretrained":
            new_config, note = _pretrained_config(config)
            report["path"] = note
            _build(old, new_config, staging, model_store, name, manifest)
        else:
            report["path"] = (
                "the traced graph, kept as it is; its inputs, class count and padding policy "
                "derived and its batches checked against each text alone (no eager model in "
                "the archive)"
            )
            _repackage_graph(old, serialized, reference, staging, mar_path, name, manifest)
        check = _compare(mar_path, staging / "new", expected, config.verify_atol)
        report["checks"] = {
            "labels": f"{LABELS_FILE} checked against the model's {reference.num_classes()} classes"
            if (old / LABELS_FILE).is_file()
            else "the checkpoint's own labels",
            "answers": check,
        }
        if not check["passed"]:
            mar_path.unlink(missing_ok=True)
            raise ConfigError(
                f"the new archive answers {check['texts']} sample texts differently from the old "
                f"archive's files (largest score difference {check['max_abs_diff']:.3g}, over "
                f"verify_atol {config.verify_atol:g}); nothing written"
            )
    report["archive"] = str(mar_path)
    (model_store / f"{name}.import.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def translate(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The example's setup_config.json as ours: (the config, one line per change made)."""
    raw = dict(raw)
    changes = []
    mode = raw.get("mode")
    if isinstance(mode, str) and mode in MODE_SPELLINGS:
        raw["mode"] = MODE_SPELLINGS[mode]
        changes.append(f"mode {mode!r} -> {raw['mode']!r}")
    if raw.get("mode") != "sequence_classification":
        raise ConfigError(
            f"mode {raw.get('mode')!r}: import reads TorchServe example archives of mode "
            "sequence_classification (for token classification, question answering and "
            "text generation build the archive with ts-handlers init and build)"
        )
    if raw.pop("model_name", None):
        changes.append("model_name dropped: the example downloads it; the archive holds the files")
    for key in TORCHSERVE_IGNORED_KEYS:
        if key in raw:
            changes.append(f"{key} dropped: {TORCHSERVE_IGNORED_KEYS[key]}")
            del raw[key]
    if raw.get("captum_explanation") and raw.get("save_mode") != "pretrained":
        raw["captum_explanation"] = False
        changes.append("captum_explanation off: explanations need save_mode 'pretrained'")
    return raw, changes


def _pretrained_config(config: Any) -> tuple[Any, str]:
    if config.captum_explanation:
        return config, (
            "save_pretrained weights kept as save_mode 'pretrained' (captum_explanation needs "
            "the eager model); tokenizer and explanation checked by the build"
        )
    return config.replace(save_mode="torchscript"), (
        "save_pretrained weights exported to TorchScript by the build and verified against the "
        "eager checkpoint (what transformers.pipeline runs)"
    )


def _build(
    old: Path, config: Any, staging: Path, store: Path, name: str, manifest: dict[str, Any]
) -> None:
    from ts_handlers.tools.build import build_archive

    config_dir = staging / "config"
    checkpoint = config_dir / "checkpoint"
    # The checkpoint's files only: the build copies every file of a pretrained folder.
    ignore = shutil.ignore_patterns("MAR-INF", "*.py", SETUP_CONFIG_FILE, LABELS_FILE, "*.yaml")
    shutil.copytree(old, checkpoint, ignore=ignore)
    setup = {key: value for key, value in config.to_dict().items() if key != "model_name"}
    setup["model_name"] = "checkpoint"
    (config_dir / SETUP_CONFIG_FILE).write_text(json.dumps(setup, indent=2))
    if (old / LABELS_FILE).is_file():
        shutil.copy(old / LABELS_FILE, config_dir / LABELS_FILE)
    _write_model_config(old, manifest, config_dir / "model-config.yaml")
    build_archive(config_dir, store, name=name, force=True)


def _repackage_graph(
    old: Path,
    serialized: str,
    handler: Any,
    staging: Path,
    mar_path: Path,
    name: str,
    manifest: dict[str, Any],
) -> None:
    """The graph re-saved with what the load derived, packaged with our handler."""
    import torch

    from ts_handlers.export import TorchScriptFormat
    from ts_handlers.exporters.text import tokenizer_files
    from ts_handlers.tasks import task_for
    from ts_handlers.tools.build import REPORT_FILE, _package

    files = staging / "files"
    files.mkdir()
    export_format = TorchScriptFormat()
    graph = torch.jit.load(str(old / serialized), map_location="cpu")
    metadata = {
        **handler.export_metadata,
        "verification": {
            "eager_reference": False,
            "reference": "the graph itself, one text at a time (the archive has no eager model)",
            "load_checks": handler.export_metadata.get("load_checks"),
        },
    }
    export_format.save(graph, files / export_format.file_name, metadata)
    (files / SETUP_CONFIG_FILE).write_text(json.dumps(handler.config.to_dict(), indent=2))
    report = {"name": name, "mode": handler.config.mode, "save_mode": "torchscript", **metadata}
    (files / REPORT_FILE).write_text(json.dumps(_public(report), indent=2))
    for source in [old / LABELS_FILE, *tokenizer_files(old)]:
        if source.is_file():
            shutil.copy2(source, files / source.name)
    model_config = staging / "model-config.yaml"
    _write_model_config(old, manifest, model_config)
    _package(
        name,
        handler=task_for("sequence_classification").entry_point,
        serialized=files / export_format.file_name,
        files=files,
        extra_dirs=[],
        model_config=model_config,
        staging=staging,
        mar_path=mar_path,
    )


def _write_model_config(old: Path, manifest: dict[str, Any], path: Path) -> None:
    """The old archive's model-config.yaml (torch-model-archiver --config-file), else ours."""
    from ts_handlers.tools.cli import MODEL_CONFIG_TEXT

    given = manifest.get("model", {}).get("configFile")
    source = old / given if given else None
    if source is not None and source.is_file():
        shutil.copy(source, path)
    else:
        path.write_text(MODEL_CONFIG_TEXT)


def _load_handler(model_dir: Path, manifest: dict[str, Any]) -> Any:
    from ts.context import Context

    from ts_handlers.sequence_classification import SequenceClassificationHandler

    handler = SequenceClassificationHandler()
    name = manifest["model"].get("modelName", "model")
    handler.initialize(Context(name, str(model_dir), manifest, 8, None, "0.12.0"))
    return handler


def _answers(handler: Any) -> list[Any]:
    """Scores per sample text, by class index, as the handler serves them."""
    import torch

    from ts_handlers.sequence_classification import apply_function

    items = [handler.tokenize(text, index) for index, text in enumerate(SAMPLE_TEXTS)]
    with torch.inference_mode():
        logits = handler.forward(items)
    return [apply_function(row.float(), handler.function) for row in logits]


def _compare(mar_path: Path, folder: Path, expected: list[Any], atol: float) -> dict[str, Any]:
    with zipfile.ZipFile(mar_path) as archive:
        archive.extractall(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    actual = _answers(_load_handler(folder, manifest))
    diff = max(float((a - e).abs().max()) for a, e in zip(actual, expected, strict=True))
    return {
        "against": "the old archive's files served by ts_handlers",
        "texts": len(SAMPLE_TEXTS),
        "max_abs_diff": diff,
        "atol": atol,
        "passed": diff <= atol,
    }


def _public(value: Any) -> Any:
    """JSON-able: tuples as lists, anything else as its text."""
    return json.loads(json.dumps(value, default=str))


def summary(report: dict[str, Any]) -> str:
    source = report["imported_from"]
    lines = [
        f"imported {source['archive']} (handler {source.get('handler')}, serialized file "
        f"{source.get('serialized_file')}) -> {report['archive']}",
        f"  model:   {report['path']}",
    ]
    lines += [f"  config:  {change}" for change in source.get("config_changes", [])]
    derived = report.get("derived", {})
    if derived.get("inputs"):
        lines.append(
            f"  graph:   inputs {', '.join(derived['inputs'])}; {derived.get('num_classes')} "
            f"classes; pad_to_max_length {derived.get('pad_to_max_length')}"
        )
    checks = report["checks"]
    answers = checks["answers"]
    lines.append(f"  labels:  {checks['labels']}")
    lines.append(
        f"  answers: {answers['texts']} sample texts against {answers['against']}: largest "
        f"difference {answers['max_abs_diff']:.2e} (atol {answers['atol']:g}) "
        + ("PASSED" if answers["passed"] else "FAILED")
    )
    return "\n".join(lines)
