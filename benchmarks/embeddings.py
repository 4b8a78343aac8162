"""Sentence-embedding throughput and latency through real TorchServe, with two baselines.

    python benchmarks/embeddings.py [--seconds 4] [--concurrency 1 4 16]

For short (about 10 tokens) and long (about 120 tokens) sentences, at each concurrency, clients
send one sentence per request to ``minilm.mar`` (length-sorted, per-group padding) and, on the
same server, to the same model built with every input padded to 128 tokens, as TorchServe's
example handler does. Both are compared with ``SentenceTransformer.encode`` in this process at a
batch size equal to the concurrency (the no-server ceiling: no HTTP, no queueing). Everything is
measured in one run on one machine; the results are printed and written as JSON to
``benchmarks/results/embeddings.json``. Each cell runs for a fixed time and request count, so the
whole run stays within a few minutes.

The client threads, TorchServe's frontend and its worker share the machine's cores, as they
would on a single-host deployment. CPU used by *other* processes during a cell is measured from
``/proc`` and reported, because on a small shared machine it can swamp the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "archiver_configs" / "minilm"
MODEL_STORE = ROOT / "model_store"
CHECKPOINT = ROOT / "build" / "checkpoints" / "minilm"
RESULTS = ROOT / "benchmarks" / "results" / "embeddings.json"
OURS, PADDED, ENCODE = "minilm", "minilm_padded128", "encode"
PADDED_LENGTH = 128
WORKLOADS = {"short": 10, "long": 120}  # name -> target tokens per sentence, [CLS]/[SEP] included
# Share of the machine's CPU other processes may take before a cell is flagged as disturbed.
BUSY_THRESHOLD = 0.10
WORDS = (
    "the a model server request latency batch token sentence vector search query document "
    "index ranking weather morning coffee river mountain library station market music travel "
    "quickly slowly carefully measured results improved because every user asked about prices "
    "and reviews of the new phone camera battery screen while others compared hotels flights"
)
VOCABULARY = WORDS.split()


@dataclass
class Cell:
    """One (system, workload, concurrency) measurement."""

    system: str
    workload: str
    concurrency: int
    sentences: int
    seconds: float
    sentences_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    # Share of all cores that processes outside this benchmark used during the cell.
    other_cpu_share: float


# ---- CPU accounting ---------------------------------------------------------------------------


class CpuMeter:
    """Busy CPU time of the whole machine and of this benchmark's own processes (/proc)."""

    def __init__(self) -> None:
        self.server_session: int | None = None  # TorchServe runs in its own session
        self.available = Path("/proc/stat").is_file()

    def sample(self) -> tuple[float, float]:
        """(machine busy seconds, this benchmark's seconds) since boot."""
        if not self.available:
            return 0.0, 0.0
        ticks = os.sysconf("SC_CLK_TCK")
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        busy = sum(fields[:8]) - fields[3] - fields[4]  # everything but idle and iowait
        ours = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # the process ended
            fields_after_name = stat.rsplit(")", 1)[1].split()
            session, utime, stime = (int(fields_after_name[i]) for i in (3, 11, 12))
            if int(entry.name) == os.getpid() or session == self.server_session:
                ours += utime + stime
        return busy / ticks, ours / ticks

    def other_share(self, before: tuple[float, float], elapsed: float) -> float:
        if not self.available or elapsed <= 0:
            return 0.0
        busy, ours = self.sample()
        other = (busy - before[0]) - (ours - before[1])
        return max(0.0, other / (elapsed * (os.cpu_count() or 1)))


# ---- measurements -----------------------------------------------------------------------------


def make_sentences(tokenizer: Any, target_tokens: int, count: int, seed: int) -> list[str]:
    """Distinct sentences of ``target_tokens`` tokens (or one more, where a word splits)."""
    rng = random.Random(seed)
    sentences = []
    while len(sentences) < count:
        words: list[str] = []
        while len(tokenizer(" ".join(words))["input_ids"]) < target_tokens:
            words.append(rng.choice(VOCABULARY))
        sentences.append(" ".join(words))
    return sentences


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def measure(
    meter: CpuMeter,
    system: str,
    workload: str,
    concurrency: int,
    run: Callable[[], tuple[list[float], float, int]],
    sentences_per_call: int = 1,
) -> Cell:
    before = meter.sample()
    latencies, elapsed, errors = run()
    sentences = len(latencies) * sentences_per_call
    result = Cell(
        system=system,
        workload=workload,
        concurrency=concurrency,
        sentences=sentences,
        seconds=round(elapsed, 3),
        sentences_per_s=sentences / elapsed,
        p50_ms=statistics.median(latencies) * 1000 if latencies else float("nan"),
        p99_ms=percentile(latencies, 99) * 1000 if latencies else float("nan"),
        errors=errors,
        other_cpu_share=meter.other_share(before, elapsed),
    )
    notes = [f"{errors} errors"] if errors else []
    if result.other_cpu_share > BUSY_THRESHOLD:
        notes.append(f"other processes used {result.other_cpu_share:.0%} of the CPU")
    print(
        f"  {system:<17} {workload:<5} c={concurrency:<3} {result.sentences_per_s:8.1f} "
        f"sentences/s  p50 {result.p50_ms:7.1f} ms  p99 {result.p99_ms:7.1f} ms  "
        + "; ".join(notes)
    )
    return result


def load_test(
    url: str,
    headers: dict[str, str],
    sentences: list[str],
    concurrency: int,
    seconds: float,
    max_requests: int,
) -> tuple[list[float], float, int]:
    """``concurrency`` clients send one sentence per request, back to back, until the time or
    the request count runs out; returns the latencies, the elapsed time and the error count."""
    latencies: list[float] = []
    errors = [0]
    issued = [0]
    lock = threading.Lock()
    start_line = threading.Barrier(concurrency + 1)
    deadline = [0.0]

    def client(worker: int) -> None:
        with requests.Session() as session:
            session.headers.update(headers)
            start_line.wait()
            position = worker
            while time.perf_counter() < deadline[0]:
                with lock:
                    if issued[0] >= max_requests:
                        return
                    issued[0] += 1
                body = {"inputs": sentences[position % len(sentences)]}
                position += concurrency
                started = time.perf_counter()
                response = session.post(url, json=body, timeout=60)
                took = time.perf_counter() - started
                with lock:
                    if response.status_code == 200:
                        latencies.append(took)
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    deadline[0] = started + seconds
    start_line.wait()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - started, errors[0]


def build_padded_archive(store: Path) -> Path:
    """minilm's own setup_config.json, with every input padded to 128 tokens."""
    from ts_handlers.tools.build import build_archive

    config_dir = store.parent / PADDED
    config_dir.mkdir()
    setup = json.loads((CONFIG_DIR / "setup_config.json").read_text())
    setup.update(max_length=PADDED_LENGTH, pad_to_max_length=True)
    (config_dir / "setup_config.json").write_text(json.dumps(setup, indent=2))
    shutil.copy2(CONFIG_DIR / "model-config.yaml", config_dir / "model-config.yaml")
    mar_path = build_archive(config_dir, store, name=PADDED, force=True)
    assert mar_path is not None
    with zipfile.ZipFile(mar_path) as archive:
        archived = json.loads(archive.read("setup_config.json"))
    if not archived["pad_to_max_length"] or archived["max_length"] != PADDED_LENGTH:
        sys.exit(f"{mar_path} does not pad every input to {PADDED_LENGTH}: {archived}")
    return mar_path


def bench_served(
    meter: CpuMeter,
    workloads: dict[str, list[str]],
    concurrencies: list[int],
    seconds: float,
    max_requests: int,
    threads: int | None = None,
) -> list[Cell]:
    from ts_handlers.tools.server import LocalTorchServe

    cells = []
    with tempfile.TemporaryDirectory(prefix="ts-handlers-bench-") as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        print(f"building {PADDED}.mar (every input padded to {PADDED_LENGTH} tokens)...")
        build_padded_archive(store)
        shutil.copy2(MODEL_STORE / f"{OURS}.mar", store / f"{OURS}.mar")
        print("starting TorchServe...")
        # torch reads OMP_NUM_THREADS when the worker starts: the same thread count as encode.
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
        with LocalTorchServe(store, [f"{OURS}.mar", f"{PADDED}.mar"], env=env) as server:
            assert server.process is not None
            meter.server_session = server.process.pid
            headers = server.auth_headers("inference")
            for model in (OURS, PADDED):
                url = f"{server.inference_url}/predictions/{model}"
                for workload, sentences in workloads.items():
                    # Warm-up: TorchScript's profiling executor optimises on its first runs.
                    load_test(url, headers, sentences, 4, 30.0, 32)
                    for concurrency in concurrencies:
                        cells.append(
                            measure(
                                meter,
                                model,
                                workload,
                                concurrency,
                                lambda u=url, s=sentences, c=concurrency: load_test(
                                    u, headers, s, c, seconds, max_requests
                                ),
                            )
                        )
    return cells


def bench_encode(
    meter: CpuMeter,
    model: Any,
    workloads: dict[str, list[str]],
    concurrencies: list[int],
    seconds: float,
) -> list[Cell]:
    """``encode`` on ``concurrency`` sentences at a time: what one server batch would hold."""

    def run(sentences: list[str], size: int) -> tuple[list[float], float, int]:
        latencies = []
        started = time.perf_counter()
        position = 0
        while time.perf_counter() - started < seconds:
            batch = [sentences[(position + i) % len(sentences)] for i in range(size)]
            position += size
            call = time.perf_counter()
            model.encode(batch, batch_size=size, normalize_embeddings=True)
            latencies.append(time.perf_counter() - call)
        return latencies, time.perf_counter() - started, 0

    cells = []
    for workload, sentences in workloads.items():
        model.encode(sentences[:32], batch_size=16)  # warm-up
        for concurrency in concurrencies:
            cells.append(
                measure(
                    meter,
                    ENCODE,
                    workload,
                    concurrency,
                    lambda s=sentences, c=concurrency: run(s, c),
                    sentences_per_call=concurrency,
                )
            )
    return cells


# ---- report -----------------------------------------------------------------------------------


def table(cells: list[Cell], tokens: dict[str, float]) -> str:
    by_key = {(c.system, c.workload, c.concurrency): c for c in cells}
    header = (
        f"{'workload':<15}{'conc':>5} | {'ours sent/s':>11} {'p50':>6} {'p99':>6} | "
        f"{'pad128 sent/s':>13} {'p50':>6} {'p99':>6} | {'encode sent/s':>13} {'p50':>6} "
        f"{'p99':>6} | {'vs pad128':>9} {'vs encode':>9} | {'other CPU':>9}"
    )
    lines = [header, "-" * len(header)]
    for workload in WORKLOADS:
        label = f"{workload} ({tokens[workload]:.0f} tok)"
        for concurrency in sorted({c.concurrency for c in cells if c.workload == workload}):
            ours, padded, encode = (
                by_key[(system, workload, concurrency)] for system in (OURS, PADDED, ENCODE)
            )
            other = max(ours.other_cpu_share, padded.other_cpu_share, encode.other_cpu_share)
            lines.append(
                f"{label:<15}{concurrency:>5} | {ours.sentences_per_s:>11.1f} "
                f"{ours.p50_ms:>6.1f} {ours.p99_ms:>6.1f} | {padded.sentences_per_s:>13.1f} "
                f"{padded.p50_ms:>6.1f} {padded.p99_ms:>6.1f} | {encode.sentences_per_s:>13.1f} "
                f"{encode.p50_ms:>6.1f} {encode.p99_ms:>6.1f} | "
                f"{ours.sentences_per_s / padded.sentences_per_s:>8.2f}x "
                f"{ours.sentences_per_s / encode.sentences_per_s:>8.2f}x | "
                f"{other:>8.0%}{' !' if other > BUSY_THRESHOLD else ''}"
            )
    lines += [
        "sent/s: sentences per second; p50/p99: latency in ms of one request (encode: one call "
        "of `conc` sentences);",
        "vs: ours / baseline throughput; other CPU: largest share of the machine other "
        f"processes used in that row's cells (! above {BUSY_THRESHOLD:.0%}: figures disturbed)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per cell")
    parser.add_argument("--max-requests", type=int, default=2000, help="request cap per cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--sentences", type=int, default=256, help="distinct sentences per set")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads for encode and for the TorchServe worker (default: torch's own)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for path in (MODEL_STORE / f"{OURS}.mar", CHECKPOINT / "modules.json"):
        if not path.is_file():
            sys.exit(f"{path.relative_to(ROOT)} is missing; run `make archives` first")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()
    meter = CpuMeter()
    model = SentenceTransformer(str(CHECKPOINT), device="cpu")
    workloads = {
        name: make_sentences(model.tokenizer, target, args.sentences, seed=index)
        for index, (name, target) in enumerate(WORKLOADS.items())
    }
    tokens = {
        name: statistics.mean(len(model.tokenizer(s)["input_ids"]) for s in sentences)
        for name, sentences in workloads.items()
    }
    print(f"sentences: {', '.join(f'{n} ≈ {t:.1f} tokens' for n, t in tokens.items())}")
    print(f"SentenceTransformer.encode in process ({torch.get_num_threads()} torch threads):")
    cells = bench_encode(meter, model, workloads, args.concurrency, args.seconds)
    del model  # the served workers need the memory and cores, not this copy
    cells += bench_served(
        meter, workloads, args.concurrency, args.seconds, args.max_requests, args.threads
    )
    report = table(cells, tokens)
    print()
    print(report)
    disturbed = [c for c in cells if c.other_cpu_share > BUSY_THRESHOLD]
    if disturbed:
        print(
            f"\nWARNING: other processes took over {BUSY_THRESHOLD:.0%} of the CPU in "
            f"{len(disturbed)} of {len(cells)} cells; rerun on a quiet machine to compare."
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": {
                    "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "load_average_before": load_before,
                    "load_average_after": os.getloadavg(),
                },
                "settings": {**vars(args), "out": str(args.out), "padded_length": PADDED_LENGTH},
                "mean_tokens": tokens,
                "cells": [asdict(c) for c in cells],
                "disturbed_cells": len(disturbed),
                "table": report.splitlines(),
                "total_seconds": round(time.perf_counter() - started, 1),
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.out} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
