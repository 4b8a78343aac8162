"""Our MiniLM archives against the servers users would otherwise pick, loaded the same way.

    make bench-peers          # sets up .venv-peers once, then runs this
    python benchmarks/peers.py [--seconds 6] [--concurrency 1 4 16 32] [--systems ...]

Each system serves the same sentence-transformers folder (``build/checkpoints/minilm``), alone on
the machine, and is loaded by the same native load generator (``hey``), one sentence per
request, at each concurrency, with a short (about 10 tokens) and a long (about 120 tokens)
sentence:

- ours: ``minilm.mar`` (float32), ``minilm_bf16.mar`` and ``minilm_int8.mar`` on TorchServe,
  the same three compiled by AOTInductor (``minilm_aoti*.mar``), and the ONNX Runtime
  archives, float32 and int8 (``minilm_onnx.mar``, ``minilm_onnx_int8.mar``);
- LitServe: ``SentenceTransformer.encode`` inside, dynamic batching (16, 5 ms), float32 and
  bfloat16;
- Infinity: its torch engine, batch 16, float32, bfloat16 and int8.

The peers run from their own environment (``.venv-peers``, scripts/setup_peers.sh), so their
pins never touch ours. The no-server ceilings are measured in the same run, in this process at
batch 16, tokenizing included: ``encode`` (float32 and bfloat16), and the anchor, **ONNX
Runtime** running the ``torch.onnx`` graph of the same checkpoint (the ``model.onnx`` inside
``minilm_onnx.mar``) with its full graph optimisations, in float32 and in int8 as a user
would quantize it (``quantize_dynamic``, per channel, every MatMul). The CPU's instruction sets
are printed first; the table gives req/s, p50 and p99, every system's ratio to ONNX Runtime
float32 in-process, and each of our archives' ratio to ``encode`` and to the best peer at the
same precision; the results are
written to ``benchmarks/results/peers.json`` and drawn in ``benchmarks/results/peers.png``. Each
server's answers for ``datasets/calibration.txt`` are also compared with float32 ``encode``
(min cosine, nearest-neighbour agreement: the build's gate figures), so a peer's speed is shown
with what its precision costs. Every cell also counts the CPU time each process spent per
request (for ours TorchServe's Java frontend and the Python worker; ``hey``; in process, per
sentence): with the load generator on the same few cores, that sum bounds the rate, and it
shows where a server's time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embeddings import make_sentences  # noqa: E402 (the sibling benchmark's sentence maker)

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "build" / "checkpoints" / "minilm"
MODEL_STORE = ROOT / "model_store"
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
RESULTS = ROOT / "benchmarks" / "results"
CALIBRATION = ROOT / "datasets" / "calibration.txt"
WORKLOADS = {"short": 10, "long": 120}  # target tokens per sentence, [CLS]/[SEP] included
ENCODE_BATCH = 16
# Our archives: system name -> (archive, precision).
ARCHIVES = {
    "ours-fp32": ("minilm", "float32"),
    "ours-bf16": ("minilm_bf16", "bfloat16"),
    "ours-int8": ("minilm_int8", "int8"),
    # The same model and precisions, compiled by torch.export + AOTInductor.
    "ours-aoti-fp32": ("minilm_aoti", "float32"),
    "ours-aoti-bf16": ("minilm_aoti_bf16", "bfloat16"),
    "ours-aoti-int8": ("minilm_aoti_int8", "int8"),
    # torch.onnx's graph run by ONNX Runtime inside our handler.
    "ours-onnx-fp32": ("minilm_onnx", "float32"),
    "ours-onnx-int8": ("minilm_onnx_int8", "int8"),
}
PEERS = {
    "litserve-fp32": ("litserve", "float32"),
    "litserve-bf16": ("litserve", "bfloat16"),
    "infinity-fp32": ("infinity", "float32"),
    "infinity-bf16": ("infinity", "bfloat16"),
    "infinity-int8": ("infinity", "int8"),
}
ENCODES = {"encode-fp32": "float32", "encode-bf16": "bfloat16"}
# ONNX Runtime in this process: the anchor every system is compared with (ort-fp32).
ORT_IN_PROCESS = {"ort-fp32": "float32", "ort-int8": "int8"}
ANCHOR = "ort-fp32"
IN_PROCESS = (*ENCODES, *ORT_IN_PROCESS)


@dataclass
class Cell:
    system: str
    precision: str
    workload: str
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    # Where the CPU went, in ms per request (per sentence in process): each server process by
    # program, and the load generator. Their sum bounds the rate at cores x 1000 / sum.
    cpu_ms_per_request: dict[str, float] | None = None


def instruction_sets() -> dict[str, bool]:
    """The vector instruction sets that decide which precision is fast on this CPU."""
    checks = {
        "AVX2": torch.cpu._is_avx2_supported,
        "AVX-512": torch.cpu._is_avx512_supported,
        "AVX512_BF16": torch.cpu._is_avx512_bf16_supported,
        "VNNI": torch.cpu._is_vnni_supported,
        "AMX": torch.cpu._is_amx_tile_supported,
    }
    return {name: bool(check()) for name, check in checks.items()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- the load generator -----------------------------------------------------------------------


def hey(
    url: str, body: dict[str, Any], concurrency: int, seconds: float, headers: dict[str, str]
) -> tuple[float, float, float, int, int, float]:
    """Runs hey; returns (req/s, p50 ms, p99 ms, responses, non-200 responses, the CPU
    seconds hey itself spent)."""
    command = ["hey", "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST"]
    command += ["-T", "application/json", "-d", json.dumps(body)]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = subprocess.run(
        [*command, url], capture_output=True, text=True, check=True, timeout=seconds + 120
    ).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]

    def quantile(q: int) -> float:
        found = re.search(rf"{q}% in ([\d.]+) secs", output)
        return float(found.group(1)) * 1000 if found else float("nan")

    statuses = {int(code): int(n) for code, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", output)}
    errors = sum(n for code, n in statuses.items() if code != 200)
    # Requests that got no answer at all (refused, timed out) are listed as "[count]\tPost ...".
    _, _, failures = output.partition("Error distribution:")
    errors += sum(int(n) for n in re.findall(r"\[(\d+)\]\s+\S", failures))
    return rate, quantile(50), quantile(99), sum(statuses.values()), errors, cpu


def server_cpu_seconds(root_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) a server's live processes have spent, by program name:
    for ours ``java`` (TorchServe's frontend) and ``python`` (the launcher and the worker)."""
    import psutil

    root = psutil.Process(root_pid)
    spent: dict[str, float] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            name, times = process.name(), process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        program = "python" if name.startswith("python") else name
        spent[program] = spent.get(program, 0.0) + times.user + times.system
    return spent


# ---- the systems ------------------------------------------------------------------------------


@dataclass
class Accuracy:
    """A system's embeddings of the calibration texts against float32 ``encode``."""

    system: str
    min_cosine: float
    mean_cosine: float
    neighbour_agreement: float


@dataclass
class Endpoint:
    url: str
    headers: dict[str, str]
    body_key: str  # the JSON field the sentence goes in
    as_list: bool = False  # Infinity takes {"input": [text]}
    extra: dict[str, Any] | None = None
    pid: int | None = None  # the server's root process, whose tree's CPU time is counted

    def body(self, sentence: str) -> dict[str, Any]:
        return {self.body_key: [sentence] if self.as_list else sentence, **(self.extra or {})}

    def embed(self, sentence: str) -> list[float]:
        response = requests.post(self.url, json=self.body(sentence), headers=self.headers)
        response.raise_for_status()
        answer = response.json()
        if isinstance(answer, dict) and "data" in answer:  # Infinity: OpenAI's shape
            return answer["data"][0]["embedding"]
        if isinstance(answer, dict):  # LitServe
            return answer["embedding"]
        return answer[0]  # ours: a list of vectors


def accuracy(system: str, endpoint: Endpoint, texts: list[str], reference: Any) -> Accuracy:
    """What the system's answers cost in accuracy: the build's own gate figures."""
    from concurrent.futures import ThreadPoolExecutor

    from ts_handlers.precision import compare

    with ThreadPoolExecutor(max_workers=8) as pool:
        served = torch.tensor(list(pool.map(endpoint.embed, texts)))
    figures = compare(torch.as_tensor(reference), served, "embedding")
    found = Accuracy(
        system, figures["min_cosine"], figures["mean_cosine"], figures["neighbour_agreement"]
    )
    print(
        f"  {system:14} accuracy over {len(texts)} calibration texts: min cosine "
        f"{found.min_cosine:.6f}, nearest-neighbour agreement {found.neighbour_agreement:.3f}"
    )
    return found


@contextmanager
def torchserve(archive: str) -> Iterator[Endpoint]:
    from ts_handlers.tools.server import LocalTorchServe

    with tempfile.TemporaryDirectory(prefix="ts-handlers-peers-") as tmp:
        store = Path(tmp)
        shutil.copy2(MODEL_STORE / f"{archive}.mar", store / f"{archive}.mar")
        with LocalTorchServe(store, [f"{archive}.mar"]) as server:
            assert server.process is not None
            yield Endpoint(
                f"{server.inference_url}/predictions/{archive}",
                server.auth_headers("inference"),
                "inputs",
                pid=server.process.pid,
            )


@contextmanager
def peer_process(kind: str, precision: str, port: int) -> Iterator[Endpoint]:
    if kind == "litserve":
        script = ROOT / "benchmarks" / "peer_servers" / "litserve_encode.py"
        command = [str(PEERS_PYTHON), str(script), str(CHECKPOINT), str(port), precision]
        endpoint = Endpoint(f"http://127.0.0.1:{port}/predict", {}, "input")
        ready = f"http://127.0.0.1:{port}/health"
    else:
        infinity = PEERS_PYTHON.parent / "infinity_emb"
        command = [str(infinity), "v2", "--model-id", str(CHECKPOINT), "--engine", "torch"]
        command += ["--batch-size", "16", "--dtype", precision, "--device", "cpu"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--no-model-warmup"]
        endpoint = Endpoint(
            f"http://127.0.0.1:{port}/embeddings",
            {},
            "input",
            as_list=True,
            extra={"model": str(CHECKPOINT)},
        )
        ready = f"http://127.0.0.1:{port}/health"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            _wait_until_ready(process, ready, log, kind)
            endpoint.pid = process.pid
            yield endpoint
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def _wait_until_ready(process: subprocess.Popen[bytes], url: str, log: Any, kind: str) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{kind} exited:\n{log.read().decode()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{kind} did not become ready in 180 s")


def free_port() -> int:
    from ts_handlers.tools.server import free_port as loopback_port

    return loopback_port("127.0.0.1")


def bench_system(
    name: str,
    precision: str,
    endpoint: Endpoint,
    sentences: dict[str, str],
    concurrencies: list[int],
    seconds: float,
) -> list[Cell]:
    cells = []
    for workload, sentence in sentences.items():
        body = endpoint.body(sentence)
        check = requests.post(endpoint.url, json=body, headers=endpoint.headers, timeout=60)
        check.raise_for_status()
        # Warm-up at every batch size the cells will see: TorchScript's profiling executor
        # optimises a graph on its first runs.
        hey(endpoint.url, body, max(concurrencies), 4, endpoint.headers)
        for concurrency in concurrencies:
            before = server_cpu_seconds(endpoint.pid) if endpoint.pid else {}
            rate, p50, p99, count, errors, hey_cpu = hey(
                endpoint.url, body, concurrency, seconds, endpoint.headers
            )
            after = server_cpu_seconds(endpoint.pid) if endpoint.pid else {}
            spent = {program: after[program] - before.get(program, 0.0) for program in after}
            spent["hey"] = hey_cpu
            cpu = {name: round(1000 * value / max(count, 1), 3) for name, value in spent.items()}
            cell = Cell(name, precision, workload, concurrency, rate, p50, p99, count, errors, cpu)
            print(
                f"  {name:14} {workload:5} c={concurrency:<3} {rate:8.1f} req/s  "
                f"p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  errors {errors}  CPU ms/request "
                + ", ".join(f"{program} {ms:.2f}" for program, ms in cpu.items()),
                flush=True,
            )
            cells.append(cell)
    return cells


def encode_reference(texts: list[str]) -> Any:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(CHECKPOINT), device="cpu")
    return model.encode(texts, batch_size=32, normalize_embeddings=True)


def bench_encode(precision: str, sentences: dict[str, str], seconds: float) -> list[Cell]:
    """``encode`` in this process at batch 16: sentences per second, no server."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(
        str(CHECKPOINT), device="cpu", model_kwargs={"torch_dtype": getattr(torch, precision)}
    )
    name = f"encode-{'fp32' if precision == 'float32' else 'bf16'}"

    def encode(batch: list[str]) -> Any:
        return model.encode(batch, batch_size=ENCODE_BATCH, normalize_embeddings=True)

    return [
        _in_process_cell(name, precision, workload, encode, sentence, seconds)
        for workload, sentence in sentences.items()
    ]


def ort_graph(precision: str, folder: Path) -> Path:
    """The torch.onnx graph of the checkpoint (from minilm_onnx.mar), float32 or int8 as a user
    would quantize it: every MatMul, weights per channel, no accuracy gate."""
    import zipfile

    with zipfile.ZipFile(MODEL_STORE / "minilm_onnx.mar") as archive:
        graph = folder / "model.onnx"
        graph.write_bytes(archive.read("model.onnx"))
    if precision == "float32":
        return graph
    from onnxruntime.quantization import quantize_dynamic

    quantized = folder / "model_int8.onnx"
    quantize_dynamic(graph, quantized, op_types_to_quantize=["MatMul"], per_channel=True)
    return quantized


class OrtEncoder:
    """ONNX Runtime in this process: tokenize, run the pooled graph, L2-normalise."""

    def __init__(self, graph: Path) -> None:
        import onnxruntime

        from ts_handlers.text import load_tokenizer

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(
            str(graph), options, providers=["CPUExecutionProvider"]
        )
        self.tokenizer = load_tokenizer(CHECKPOINT)

    def encode(self, texts: list[str]) -> Any:
        import numpy as np

        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=256, return_tensors="np"
        )
        feed = {
            "input_ids": batch["input_ids"].astype(np.int64),
            "attention_mask": batch["attention_mask"].astype(np.int64),
        }
        vectors = self.session.run(None, feed)[0]
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def bench_ort(
    name: str, sentences: dict[str, str], seconds: float, texts: list[str], reference: Any
) -> tuple[list[Cell], Accuracy]:
    """ONNX Runtime in this process at batch 16: sentences per second, and its accuracy."""
    import numpy as np

    from ts_handlers.precision import compare

    precision = ORT_IN_PROCESS[name]
    with tempfile.TemporaryDirectory(prefix="ts-handlers-ort-") as folder:
        encoder = OrtEncoder(ort_graph(precision, Path(folder)))
    served = np.concatenate(
        [encoder.encode(texts[i : i + ENCODE_BATCH]) for i in range(0, len(texts), ENCODE_BATCH)]
    )
    figures = compare(torch.as_tensor(reference), torch.as_tensor(served), "embedding")
    found = Accuracy(
        name, figures["min_cosine"], figures["mean_cosine"], figures["neighbour_agreement"]
    )
    print(
        f"  {name:14} accuracy over {len(texts)} calibration texts: min cosine "
        f"{found.min_cosine:.6f}, nearest-neighbour agreement {found.neighbour_agreement:.3f}"
    )
    cells = [
        _in_process_cell(name, precision, workload, encoder.encode, sentence, seconds)
        for workload, sentence in sentences.items()
    ]
    return cells, found


def _in_process_cell(
    name: str, precision: str, workload: str, encode: Any, sentence: str, seconds: float
) -> Cell:
    batch = [sentence] * ENCODE_BATCH
    for _ in range(3):
        encode(batch)
    latencies = []
    started, cpu_started = time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        call = time.perf_counter()
        encode(batch)
        latencies.append((time.perf_counter() - call) * 1000)
    elapsed = time.perf_counter() - started
    cpu_ms = 1000 * (time.process_time() - cpu_started) / (len(latencies) * ENCODE_BATCH)
    latencies.sort()
    cell = Cell(
        name,
        precision,
        workload,
        ENCODE_BATCH,
        len(latencies) * ENCODE_BATCH / elapsed,
        latencies[len(latencies) // 2],
        latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        len(latencies) * ENCODE_BATCH,
        0,
        {"this process": round(cpu_ms, 3)},
    )
    print(
        f"  {name:14} {workload:5} batch {ENCODE_BATCH} {cell.requests_per_s:8.1f} sent/s  "
        f"CPU {cpu_ms:.2f} ms/sentence"
    )
    return cell


# ---- report -----------------------------------------------------------------------------------


def anchor_ratios(cells: list[Cell]) -> list[dict[str, Any]]:
    """Every system's cells against ONNX Runtime float32 in-process, same workload."""
    anchor = {c.workload: c.requests_per_s for c in cells if c.system == ANCHOR}
    return [
        {
            "system": cell.system,
            "workload": cell.workload,
            "concurrency": cell.concurrency,
            f"vs_{ANCHOR}": _ratio(cell.requests_per_s, anchor.get(cell.workload)),
        }
        for cell in cells
        if cell.system != ANCHOR
    ]


def anchor_table(rows: list[dict[str, Any]]) -> str:
    """Ratios to ONNX Runtime float32 in-process: one row per system, one column per c."""
    concurrencies = sorted({row["concurrency"] for row in rows})
    by_key = {(r["system"], r["workload"], r["concurrency"]): r[f"vs_{ANCHOR}"] for r in rows}
    lines = [f"\nratio to {ANCHOR} (ONNX Runtime float32 in this process, batch 16)"]
    for workload in WORKLOADS:
        lines.append(f"{workload:16}" + "".join(f"{f'c={c}':>9}" for c in concurrencies))
        for system in dict.fromkeys(r["system"] for r in rows):
            values = [by_key.get((system, workload, c)) for c in concurrencies]
            if all(value is None for value in values):
                continue
            lines.append(f"  {system:14}" + "".join(f"{_show(v):>9}" for v in values))
    return "\n".join(lines)


def ratios(cells: list[Cell]) -> list[dict[str, Any]]:
    """Each of our cells against encode (same and float32 precision) and the best peer."""
    encode = {(c.precision, c.workload): c.requests_per_s for c in cells if "encode" in c.system}
    rows = []
    for cell in cells:
        if not cell.system.startswith("ours"):
            continue
        # encode has no int8 of its own: an int8 archive is compared with its float32.
        same = cell.precision if cell.precision != "int8" else "float32"
        peers = [
            c.requests_per_s
            for c in cells
            if c.system.split("-")[0] in ("litserve", "infinity")
            and c.precision == cell.precision
            and c.workload == cell.workload
            and c.concurrency == cell.concurrency
        ]
        row = {
            "system": cell.system,
            "workload": cell.workload,
            "concurrency": cell.concurrency,
            "vs_encode_fp32": _ratio(cell.requests_per_s, encode.get(("float32", cell.workload))),
            "vs_encode_same_precision": _ratio(
                cell.requests_per_s, encode.get((same, cell.workload))
            ),
            "vs_best_peer_same_precision": _ratio(cell.requests_per_s, max(peers, default=None)),
        }
        for peer in cells:
            if (
                peer.system.split("-")[0] in ("litserve", "infinity")
                and peer.workload == cell.workload
                and peer.concurrency == cell.concurrency
            ):
                row[f"vs_{peer.system}"] = _ratio(cell.requests_per_s, peer.requests_per_s)
        rows.append(row)
    return rows


def _ratio(ours: float, other: float | None) -> float | None:
    return round(ours / other, 2) if other else None


def table(cells: list[Cell], rows: list[dict[str, Any]]) -> str:
    systems = list(dict.fromkeys(c.system for c in cells if c.system not in IN_PROCESS))
    concurrencies = sorted({c.concurrency for c in cells if c.system not in IN_PROCESS})
    by_key = {(c.system, c.workload, c.concurrency): c for c in cells}
    lines = []
    for workload in WORKLOADS:
        lines.append(f"\n{workload} sentence, req/s (p50 / p99 ms)")
        lines.append(f"{'system':16}" + "".join(f"{f'c={c}':>26}" for c in concurrencies))
        for system in systems:
            row = f"{system:16}"
            for concurrency in concurrencies:
                cell = by_key.get((system, workload, concurrency))
                text = (
                    f"{cell.requests_per_s:7.1f} ({cell.p50_ms:5.1f}/{cell.p99_ms:6.1f})"
                    if cell
                    else "-"
                )
                row += f"{text:>26}"
            lines.append(row)
        for cell in cells:
            if cell.system in IN_PROCESS and cell.workload == workload:
                lines.append(f"{cell.system:16}{cell.requests_per_s:7.1f} sentences/s at batch 16")
    lines.append(cpu_table(cells))
    lines.append("\nratios (ours / other, same workload and concurrency)")
    lines.append(
        f"{'system':16}{'workload':>9}{'conc':>6}{'vs encode fp32':>16}{'vs encode same':>16}"
        f"{'vs best peer':>14}"
    )
    for row in rows:
        lines.append(
            f"{row['system']:16}{row['workload']:>9}{row['concurrency']:>6}"
            f"{_show(row['vs_encode_fp32']):>16}{_show(row['vs_encode_same_precision']):>16}"
            f"{_show(row['vs_best_peer_same_precision']):>14}"
        )
    return "\n".join(lines)


def cpu_table(cells: list[Cell]) -> str:
    """Where each request's CPU went at c=16 (or the highest concurrency run): the bound a
    system's rate meets on this machine is cores x 1000 / the sum."""
    served = [c.concurrency for c in cells if c.system not in IN_PROCESS]
    concurrency = 16 if 16 in served else max(served, default=ENCODE_BATCH)
    lines = [
        f"\nCPU ms per request at c={concurrency} (in process: per sentence at batch "
        f"{ENCODE_BATCH}); {os.cpu_count()} cores bound the rate at "
        f"{os.cpu_count()} x 1000 / total"
    ]
    for cell in cells:
        if cell.cpu_ms_per_request is None:
            continue
        if cell.system not in IN_PROCESS and cell.concurrency != concurrency:
            continue
        parts = ", ".join(f"{name} {ms:.2f}" for name, ms in cell.cpu_ms_per_request.items())
        total = sum(cell.cpu_ms_per_request.values())
        lines.append(f"  {cell.system:16}{cell.workload:>6}  total {total:6.2f}  ({parts})")
    return "\n".join(lines)


def _show(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def chart(cells: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(WORKLOADS), figsize=(13, 5), sharey=False)
    for axis, workload in zip(axes, WORKLOADS, strict=True):
        systems = dict.fromkeys(c.system for c in cells if c.system not in IN_PROCESS)
        for system in systems:
            points = sorted(
                (c.concurrency, c.requests_per_s)
                for c in cells
                if c.system == system and c.workload == workload
            )
            style = "-o" if system.startswith("ours") else "--s"
            axis.plot(*zip(*points, strict=True), style, label=system)
        for cell in cells:
            if cell.system in IN_PROCESS and cell.workload == workload:
                axis.axhline(cell.requests_per_s, linestyle=":", color="grey")
                axis.annotate(
                    f"{cell.system} (batch 16)",
                    (1, cell.requests_per_s),
                    fontsize=8,
                    color="grey",
                    va="bottom",
                )
        axis.set_xscale("log", base=2)
        concurrencies = sorted({c.concurrency for c in cells if c.system not in IN_PROCESS})
        axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axis.set_xlabel("concurrent clients (one sentence per request)")
        axis.set_ylabel("requests per second")
        axis.set_title(f"all-MiniLM-L6-v2, {workload} sentence ({WORKLOADS[workload]} tokens)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    capability = torch.backends.cpu.get_cpu_capability()
    figure.suptitle(f"{platform.machine()} ({capability}), {os.cpu_count()} cores; hey, one run")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument(
        "--systems",
        nargs="+",
        default=[*ORT_IN_PROCESS, *ARCHIVES, *PEERS, *ENCODES],
        choices=[*ORT_IN_PROCESS, *ARCHIVES, *PEERS, *ENCODES],
    )
    args = parser.parse_args(argv)
    isa = instruction_sets()
    print(
        f"CPU: {cpu_name()}, {os.cpu_count()} cores; torch capability "
        f"{torch.backends.cpu.get_cpu_capability()}; "
        + ", ".join(f"{name} {'yes' if found else 'no'}" for name, found in isa.items()),
        flush=True,
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if shutil.which("hey") is None:
        parser.error("hey is not installed: run `make bench-peers` (scripts/setup_peers.sh)")
    wanted_peers = [s for s in args.systems if s in PEERS]
    if wanted_peers and not PEERS_PYTHON.is_file():
        parser.error(f"{PEERS_PYTHON} is missing: run `make bench-peers`")

    from ts_handlers.text import load_tokenizer

    tokenizer = load_tokenizer(CHECKPOINT)
    sentences = {
        workload: make_sentences(tokenizer, tokens, 1, seed=7)[0]
        for workload, tokens in WORKLOADS.items()
    }
    from ts_handlers.exporters.text import read_calibration_texts

    texts = read_calibration_texts(CALIBRATION)
    reference = encode_reference(texts)
    cells: list[Cell] = []
    accuracies: list[Accuracy] = []
    for system in args.systems:
        print(f"{system}:", flush=True)
        if system in ENCODES:
            cells += bench_encode(ENCODES[system], sentences, args.seconds)
            continue
        if system in ORT_IN_PROCESS:
            found_cells, found = bench_ort(system, sentences, args.seconds, texts, reference)
            cells += found_cells
            accuracies.append(found)
            continue
        if system in ARCHIVES:
            archive, precision = ARCHIVES[system]
            server = torchserve(archive)
        else:
            kind, precision = PEERS[system]
            server = peer_process(kind, precision, free_port())
        with server as endpoint:
            accuracies.append(accuracy(system, endpoint, texts, reference))
            cells += bench_system(
                system, precision, endpoint, sentences, args.concurrency, args.seconds
            )
    rows = ratios(cells)
    anchored = anchor_ratios(cells)
    print(table(cells, rows))
    if any(cell.system == ANCHOR for cell in cells):
        print(anchor_table(anchored))
    print("\naccuracy against float32 encode over the calibration texts")
    for found in accuracies:
        print(
            f"  {found.system:16} min cosine {found.min_cosine:.6f}  mean {found.mean_cosine:.6f}"
            f"  nearest-neighbour agreement {found.neighbour_agreement:.3f}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "peers.json").write_text(
        json.dumps(
            {
                "machine": {
                    "cpu": cpu_name(),
                    "cores": os.cpu_count(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "instruction_sets": isa,
                    "torch": torch.__version__,
                },
                "seconds_per_cell": args.seconds,
                "sentences": sentences,
                "tokens": {w: len(tokenizer(s)["input_ids"]) for w, s in sentences.items()},
                "cells": [asdict(cell) for cell in cells],
                "accuracy_vs_encode_fp32": [asdict(found) for found in accuracies],
                "ratios": rows,
                f"ratios_vs_{ANCHOR}": anchored,
            },
            indent=2,
        )
    )
    chart(cells, RESULTS / "peers.png")
    print(f"\nwrote {RESULTS / 'peers.json'} and {RESULTS / 'peers.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
