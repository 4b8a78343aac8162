"""TorchScript against torch.export + AOTInductor and torch.onnx + ONNX Runtime, for every model
built more than one way.

    make bench-formats
    python benchmarks/formats.py [--pairs mnist sentiment ...] [--repeats 3]

For each model's archives in ``model_store/`` (``<name>.mar``, TorchScript,
``<name>_aoti.mar``, AOTInductor, and ``<name>_onnx.mar``, ONNX Runtime, where one exists) it
reports:

- the build's own seconds, read from each archive's ``export_report.json``: loading the eager
  model, exporting (for AOTInductor: torch.export plus the C++ compile; for ONNX int8: the
  export and the search for the layers kept in float32), verifying against eager;
- the archive's size and its serialized model's size;
- worker load time on real TorchServe: registering the archive with one worker and waiting until
  it is ready (``synchronous=true``), the median of ``--repeats`` registrations;
- the first answer after the load and the median of the next ten, for one request: TorchScript's
  profiling executor optimises a graph during its first runs, AOTInductor compiled ahead of time.

Throughput is measured by ``benchmarks/peers.py`` (the ``ours-aoti-*`` systems), under the same
load as the peers. Results are printed and written to ``benchmarks/results/formats.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

from ts_handlers.tools.server import LocalTorchServe

ROOT = Path(__file__).resolve().parents[1]
MODEL_STORE = ROOT / "model_store"
RESULTS = ROOT / "benchmarks" / "results"
# Archive base name -> the files of its two formats' serialized models.
PAIRS = ["mnist", "sentiment", "minilm", "ner", "minilm_bf16", "minilm_int8"]
# The AOTInductor archive of a pair: <base>_aoti, with the precision suffix kept last.
AOTI_NAMES = {"minilm_bf16": "minilm_aoti_bf16", "minilm_int8": "minilm_aoti_int8"}
# The ONNX archive: <base>_onnx likewise; ONNX Runtime has no bfloat16 archive.
ONNX_NAMES: dict[str, str | None] = {"minilm_bf16": None, "minilm_int8": "minilm_onnx_int8"}
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."


def aoti_name(base: str) -> str:
    return AOTI_NAMES.get(base, f"{base}_aoti")


def onnx_name(base: str) -> str | None:
    return ONNX_NAMES.get(base, f"{base}_onnx")


def request_for(archive: str) -> dict[str, Any]:
    """One typical request for the archive's task."""
    if archive.startswith("mnist"):
        buffer = io.BytesIO()
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), mode="L").save(
            buffer, "PNG"
        )
        return {"data": buffer.getvalue(), "headers": {"Content-Type": "image/png"}}
    return {"json": {"inputs": SENTENCE}}


def archive_figures(archive: str) -> dict[str, Any]:
    mar = MODEL_STORE / f"{archive}.mar"
    with zipfile.ZipFile(mar) as packed:
        report = json.loads(packed.read("export_report.json"))
        manifest = json.loads(packed.read("MAR-INF/MANIFEST.json"))
        serialized = manifest["model"]["serializedFile"]
        model_bytes = packed.getinfo(serialized).file_size
    return {
        "archive": archive,
        "save_mode": report["save_mode"],
        "build_seconds": {k: round(v, 1) for k, v in report.get("seconds", {}).items()},
        "archive_mb": round(mar.stat().st_size / 1e6, 1),
        "model_file": serialized,
        "model_mb": round(model_bytes / 1e6, 1),
    }


def load_figures(server: LocalTorchServe, archive: str, repeats: int) -> dict[str, Any]:
    client = server.client(timeout=600)
    url = f"{server.inference_url}/predictions/{archive}"
    headers = server.auth_headers("inference")
    loads, firsts, steady = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        client.register(f"{archive}.mar", initial_workers=1, timeout=600)
        loads.append(time.perf_counter() - started)
        latencies = []
        for _ in range(11):
            request = request_for(archive)
            request["headers"] = {**request.get("headers", {}), **headers}
            started = time.perf_counter()
            response = requests.post(url, timeout=120, **request)
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
        firsts.append(latencies[0])
        steady.append(statistics.median(latencies[1:]))
        client.unregister(archive)
    return {
        "load_s": round(statistics.median(loads), 2),
        "first_answer_s": round(statistics.median(firsts), 3),
        "next_answers_ms": round(statistics.median(steady) * 1000, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=PAIRS, choices=PAIRS)
    parser.add_argument("--repeats", type=int, default=3, help="registrations per archive")
    args = parser.parse_args(argv)
    archives = [
        name for base in args.pairs for name in (base, aoti_name(base), onnx_name(base)) if name
    ]
    missing = [name for name in archives if not (MODEL_STORE / f"{name}.mar").is_file()]
    if missing:
        parser.error(f"missing from model_store/: {', '.join(missing)} (run `make bench-formats`)")
    rows = []
    with LocalTorchServe(MODEL_STORE, enable_model_api=True) as server:
        for archive in archives:
            row = {**archive_figures(archive), **load_figures(server, archive, args.repeats)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(
        f"\n{'archive':20}{'format':>14}{'export s':>10}{'verify s':>10}{'.mar MB':>9}"
        f"{'load s':>8}{'1st answer s':>14}{'next ms':>9}"
    )
    for row in rows:
        seconds = row["build_seconds"]
        export = seconds.get("export", seconds.get("export_and_reduce_precision", 0))
        print(
            f"{row['archive']:20}{row['save_mode']:>14}{export:>10.1f}"
            f"{seconds.get('verify', 0):>10.1f}{row['archive_mb']:>9.1f}{row['load_s']:>8.2f}"
            f"{row['first_answer_s']:>14.3f}{row['next_answers_ms']:>9.1f}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "formats.json").write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {RESULTS / 'formats.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
