"""Hostile request bodies on real TorchServe: answer, time and worker memory per class.

    python benchmarks/hostile_bodies.py [--only SUBSTRING] [--skip SUBSTRING] [--label after]

Starts one LocalTorchServe serving mnist.mar and sentiment.mar and sends each body of
``integration_tests/hostile.py`` (each under max_request_size, each built to make parsing or
decoding cost far more than its size) together with a good request to the same model, so both
can share a batch. For each it prints the status and the start of the answer, the seconds to
the answer, the good neighbour's status, the worker's peak resident-memory growth (sampled
every 10 ms from /proc) and whether the worker died. The table of docs/limits.md
("Hostile bodies") comes from here; run it with another checkout first on PYTHONPATH for the
before column (the worker inherits PYTHONPATH).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "integration_tests"))
from hostile import GOOD, cases  # noqa: E402

from ts_handlers.tools.server import LocalTorchServe  # noqa: E402

MODELS = ("mnist", "sentiment")
TIMEOUT_S = 120
# The frontend's WorkerThread logs, per batch, the time from handing the batch to the worker
# (encoding the message, the worker reading it, the handler, the answer) to the worker's reply.
BACKEND_TIME = re.compile(rb"Backend response time: (\d+)")


def backend_ms(server: LocalTorchServe, since: int) -> tuple[int, int]:
    """The longest "Backend response time" the frontend logged past byte ``since`` of its log,
    and the log's size now."""
    path = server.workdir / "logs" / "ts_log.log"
    try:
        with open(path, "rb") as log:
            log.seek(since)
            text = log.read()
    except OSError:
        return -1, since
    times = [int(value) for value in BACKEND_TIME.findall(text)]
    return max(times, default=-1), since + len(text)


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def worker_pid(server: LocalTorchServe, model: str, wait_s: float = 180) -> int:
    """The model's READY worker, waiting for one after a death."""
    deadline = time.monotonic() + wait_s
    while True:
        workers = server.client().describe(model)["workers"]
        ready = [entry["pid"] for entry in workers if entry["status"] == "READY"]
        if ready or time.monotonic() > deadline:
            return ready[0] if ready else -1
        time.sleep(0.5)


def parent_pid(pid: int) -> int:
    """The worker's parent: the frontend's Java process, which starts every worker."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def measure(server: LocalTorchServe, session: requests.Session, case) -> dict:
    pid = worker_pid(server, case.model)
    frontend = parent_pid(pid)
    _, log_offset = backend_ms(server, 0)
    baseline, frontend_baseline = rss_kib(pid), rss_kib(frontend)
    peak = [baseline, frontend_baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib(pid))
            peak[1] = max(peak[1], rss_kib(frontend))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    url = f"{server.inference_url}/predictions/{case.model}"
    good_headers, good_body = GOOD[case.model]

    def post(body: bytes, headers: dict[str, str]) -> tuple[int, str, float]:
        started = time.monotonic()
        try:
            answer = session.post(url, data=body, headers=headers, timeout=TIMEOUT_S)
            return answer.status_code, answer.text, time.monotonic() - started
        except requests.RequestException as error:
            return -1, type(error).__name__, time.monotonic() - started

    with ThreadPoolExecutor(2) as pool:
        hostile = pool.submit(post, case.body, case.headers)
        time.sleep(0.005)
        good = pool.submit(post, good_body, good_headers)
        (status, text, elapsed), (good_status, _, _) = hostile.result(), good.result()
    done.set()
    sampler.join()
    after = worker_pid(server, case.model)
    time.sleep(0.2)  # the log line is written as the reply arrives
    backend, _ = backend_ms(server, log_offset)
    return {
        "case": case.name,
        "bytes": len(case.body),
        "status": status,
        "answer": " ".join(text.split())[:70],
        "seconds": elapsed,
        "good": good_status,
        "rss_mb": (peak[0] - baseline) / 1024,
        # The JVM keeps a heap it grew, so a later case may show less than it needs.
        "frontend_rss_mb": (peak[1] - frontend_baseline) / 1024,
        "backend_s": backend / 1000 if backend >= 0 else float("nan"),
        "died": after != pid,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", default="", help="run only the cases whose name holds this (a|b: either)"
    )
    parser.add_argument("--skip", default="", help="leave out the cases whose name holds this")
    parser.add_argument("--label", default="", help="a word printed with the table")
    args = parser.parse_args()
    selected = [
        case
        for case in cases()
        if any(part in case.name.lower() for part in args.only.lower().split("|"))
        and not (args.skip and args.skip.lower() in case.name.lower())
    ]
    import ts_handlers

    print(
        f"{args.label}: ts_handlers from {Path(ts_handlers.__file__).parent}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    store = ROOT / "model_store"
    with LocalTorchServe(store, [f"{model}.mar" for model in MODELS]) as server:
        session = requests.Session()
        session.headers.update(server.auth_headers())
        print(
            "| request | bytes | answer | s | of which the worker's batch | neighbour "
            "| worker RSS growth | frontend RSS growth | worker died |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for case in selected:
            row = measure(server, session, case)
            print(
                f"| {row['case']} | {row['bytes']:,} | {row['status']} `{row['answer']}` | "
                f"{row['seconds']:.2f} | {row['backend_s']:.2f} | {row['good']} | "
                f"{row['rss_mb']:+.0f} MB | {row['frontend_rss_mb']:+.0f} MB | "
                f"{'yes' if row['died'] else 'no'} |",
                flush=True,
            )
        print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
