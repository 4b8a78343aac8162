"""A worker serving an archive imports no export-time code.

Each task's archive (built once per session by the shared fixtures), a text archive in each
other format (AOTInductor, ONNX), and an archive made by hand (whose checks at load run the
build's verification), is served in a fresh interpreter as TorchServe's worker serves it: the
manifest's ``module:handle`` imported, called once with ``data=None`` to initialise, then with
one batch. Afterwards no export, precision-ranking, calibration or tooling module may be
loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness import unpack_archive, write_text_config

from ts_handlers.tools.build import build_archive

# Export-time modules: the formats' export side (ts_handlers.export; a worker reads its model
# through ts_handlers.artifacts), each task's export (ts_handlers.exporters.*), reduced
# precision and its calibration, the ONNX exporter, and the tools (build driver, command line,
# server, client).
EXPORT_TIME = (
    "ts_handlers.export",
    "ts_handlers.exporters",
    "ts_handlers.precision",
    "ts_handlers.onnx_export",
    "ts_handlers.tools",
    "sentence_transformers",
    "captum",
)

WORKER = """
import importlib, json, sys
from pathlib import Path
from ts.context import Context, RequestProcessor

model_dir, content_type, body = Path(sys.argv[1]), sys.argv[2], sys.stdin.buffer.read()
manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
module, _, name = manifest["model"]["handler"].partition(":")
handle = getattr(importlib.import_module(module), name)
context = Context(manifest["model"]["modelName"], str(model_dir), manifest, 8, None, "0.12.0")
handle(None, context)
context.request_processor = [RequestProcessor({"body": {"content-type": content_type}})]
answers = handle([{"body": body}], context)
status = context.get_response_status(0)[0]
loaded = sorted(m for m in sys.modules if m.startswith(tuple(sys.argv[3].split(","))))
print(json.dumps({"module": module, "status": status, "answers": len(answers), "loaded": loaded}))
"""


def serve_once(model_dir: Path, body: bytes, content_type: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(model_dir), content_type, ",".join(EXPORT_TIME)],
        input=body,
        capture_output=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def png_digit() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "task", ["image", "sequence_classification", "sentence_embedding", "token_classification"]
)
def test_a_worker_imports_no_export_time_module(
    task, tiny_vision_archive, tiny_text_archives, embedder, recogniser, tmp_path
):
    if task == "image":
        model_dir = tmp_path / "image"
        unpack_archive(tiny_vision_archive, model_dir)
        body, content_type = png_digit(), "image/png"
    elif task == "sequence_classification":
        model_dir = tmp_path / "text"
        unpack_archive(tiny_text_archives["torchscript"], model_dir)
        body = json.dumps({"inputs": ["a fine day", "rain"]}).encode()
        content_type = "application/json"
    else:
        handler = embedder if task == "sentence_embedding" else recogniser
        model_dir = Path(handler.model_dir)
        body, content_type = b"the movie was great", "text/plain"
    result = serve_once(model_dir, body, content_type)
    assert result["module"].startswith("ts_handlers.")
    assert result["status"] == 200 and result["answers"] == 1
    assert result["loaded"] == []


def test_a_worker_checking_an_archive_made_by_hand_imports_no_export_time_module(tmp_path):
    import torch
    from harness import RGB_SETUP, UserCNN

    model_dir = tmp_path / "handmade"
    (model_dir / "MAR-INF").mkdir(parents=True)
    torch.manual_seed(0)
    torch.jit.script(UserCNN().eval()).save(str(model_dir / "my_cnn.pt"))
    (model_dir / "setup_config.json").write_text(json.dumps(RGB_SETUP))
    manifest = {
        "model": {
            "modelName": "cnn",
            "serializedFile": "my_cnn.pt",
            "handler": "ts_handlers.image_classification:handle",
        }
    }
    (model_dir / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
    result = serve_once(model_dir, png_digit(), "image/png")
    assert result["status"] == 200 and result["answers"] == 1
    assert result["loaded"] == []


@pytest.mark.parametrize("save_mode", ["aot_inductor", "onnx"])
def test_a_worker_serving_another_format_imports_no_export_time_module(
    save_mode, tiny_text_checkpoint, tmp_path
):
    config_dir = write_text_config(
        tmp_path / f"tiny_text_{save_mode}", tiny_text_checkpoint, save_mode=save_mode
    )
    mar_path = build_archive(config_dir, tmp_path / "store", force=True)
    assert mar_path is not None
    model_dir = tmp_path / "model"
    unpack_archive(mar_path, model_dir)
    body = json.dumps({"inputs": ["a fine day", "rain"]}).encode()
    result = serve_once(model_dir, body, "application/json")
    assert result["status"] == 200 and result["answers"] == 1
    assert result["loaded"] == []
