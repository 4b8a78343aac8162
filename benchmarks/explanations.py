"""Explanation cost and its effect on predictions, through real TorchServe (sentiment_eager.mar).

    python benchmarks/explanations.py [--seconds 20] [--explainers 8] [--predictors 2]

Measures, on one server and one worker:

1. the worst explanation requests the limits allow (one text of ``max_length`` tokens; the most
   texts a request may hold, as long as fit the token-step budget), and a full batch of
   ``batchSize`` worst requests sent together (one runs, the rest get 429 + Retry-After);
2. prediction latency (p50/p99/max) with ``--predictors`` clients looping for ``--seconds``,
   alone and then while ``--explainers`` clients loop on 128-token explanations (honouring
   Retry-After), with the status counts of both.

Prints the figures and writes them to ``benchmarks/results/explanations.json``. CPU used by
processes outside the benchmark is reported per phase: on a small shared machine it moves the
figures a lot. Every phase is bounded in time and request count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embeddings import CpuMeter, percentile  # noqa: E402

from ts_handlers.tools.server import LocalTorchServe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_STORE = ROOT / "model_store"
MODEL = "sentiment_eager"
RESULTS = ROOT / "benchmarks" / "results" / "explanations.json"
TEXT = {"Content-Type": "text/plain"}
LONG_TEXT = "The hotel was lovely but the service was painfully slow and the food was cold. " * 30
PREDICTION_TEXTS = [
    "I loved this film",
    "The battery died after two days.",
    "It was fine I guess, nothing special, but not bad either.",
    "The staff were friendly and breakfast was delicious.",
]
MAX_REQUESTS = 5000  # per client and phase


def timed_post(session: requests.Session, url: str, **kwargs: Any) -> tuple[int, float, Any]:
    started = time.perf_counter()
    response = session.post(url, timeout=300, **kwargs)
    return response.status_code, time.perf_counter() - started, response


def worst_requests(session: requests.Session, base: str, config: dict[str, Any]) -> dict:
    url = f"{base}/explanations/{MODEL}"
    steps, budget = config["explanation_steps"], config["max_explanation_token_steps"]
    # As many texts as a request may hold, each as long as the budget allows.
    texts = config["max_explanation_texts"]
    per_text = budget // steps // texts
    words = " ".join(["good"] * max(1, per_text - 2))  # [CLS] + one token per word + [SEP]
    results: dict[str, Any] = {}
    for name, kwargs in (
        ("one text of max_length tokens", {"data": LONG_TEXT.encode(), "headers": TEXT}),
        (f"{texts} texts of {per_text} tokens", {"json": {"inputs": [words] * texts}}),
    ):
        runs = [timed_post(session, url, **kwargs) for _ in range(2)]
        assert all(status == 200 for status, _, _ in runs), runs[0][2].text
        results[name] = round(max(seconds for _, seconds, _ in runs), 2)
        print(f"worst request, {name}: {results[name]:.2f} s")
    return results


def full_batch(session: requests.Session, base: str, batch_size: int) -> dict[str, Any]:
    url = f"{base}/explanations/{MODEL}"
    with ThreadPoolExecutor(batch_size) as pool:
        started = time.perf_counter()
        runs = list(
            pool.map(
                lambda _: timed_post(session, url, data=LONG_TEXT.encode(), headers=TEXT),
                range(batch_size),
            )
        )
        elapsed = time.perf_counter() - started
    statuses = Counter(status for status, _, _ in runs)
    retry_after = sorted({r.headers.get("Retry-After") for s, _, r in runs if s == 429})
    print(f"full batch of {batch_size}: {elapsed:.2f} s, {dict(statuses)}, retry {retry_after}")
    return {"seconds": round(elapsed, 2), "statuses": dict(statuses), "retry_after": retry_after}


def load_phase(
    session: requests.Session,
    base: str,
    seconds: float,
    predictors: int,
    explainers: int,
    meter: CpuMeter,
) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    stop = threading.Event()
    latencies: list[float] = []
    predictions: Counter[int] = Counter()
    explanations: Counter[int] = Counter()
    explanation_seconds: list[float] = []
    lock = threading.Lock()

    def predict(worker: int) -> None:
        for count in range(MAX_REQUESTS):
            if time.monotonic() > deadline:
                return
            text = PREDICTION_TEXTS[(worker + count) % len(PREDICTION_TEXTS)]
            status, elapsed, _ = timed_post(
                session, f"{base}/predictions/{MODEL}", data=text.encode(), headers=TEXT
            )
            with lock:
                predictions[status] += 1
                latencies.append(elapsed)

    def explain(_: int) -> None:
        for _count in range(MAX_REQUESTS):
            if stop.is_set():
                return
            status, elapsed, response = timed_post(
                session, f"{base}/explanations/{MODEL}", data=LONG_TEXT.encode(), headers=TEXT
            )
            with lock:
                explanations[status] += 1
                if status == 200:
                    explanation_seconds.append(elapsed)
            if status == 429:
                stop.wait(int(response.headers.get("Retry-After", "1")))

    before = meter.sample()
    started = time.perf_counter()
    with ThreadPoolExecutor(predictors + explainers) as pool:
        explaining = [pool.submit(explain, i) for i in range(explainers)]
        if explainers:
            time.sleep(2)  # the explainers fill the queue first
        predicting = [pool.submit(predict, i) for i in range(predictors)]
        for future in predicting:
            future.result()
        stop.set()
        for future in explaining:
            future.result()
    elapsed = time.perf_counter() - started
    result = {
        "predictions": len(latencies),
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "prediction_statuses": dict(predictions),
        "explanation_statuses": dict(explanations),
        "explanation_p50_s": round(percentile(explanation_seconds, 50), 2)
        if explanation_seconds
        else None,
        "other_cpu_share": round(meter.other_share(before, elapsed), 2),
    }
    print(f"{explainers} explainers, {predictors} predictors: {json.dumps(result)}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="time per load phase")
    parser.add_argument("--explainers", type=int, default=8)
    parser.add_argument("--predictors", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    meter = CpuMeter()
    with LocalTorchServe(MODEL_STORE, [f"{MODEL}.mar"]) as server:
        meter.server_session = server.process.pid if server.process else None
        session = requests.Session()
        session.headers.update(server.auth_headers())
        base = server.inference_url
        described = server.client().describe(MODEL)
        customized = requests.get(
            f"{server.management_url}/models/{MODEL}?customized=true",
            headers=server.auth_headers("management"),
            timeout=60,
        ).json()[0]["customizedMetadata"]
        config = customized["config"]
        print(
            f"{MODEL}: batchSize {described['batchSize']}, responseTimeout "
            f"{described.get('responseTimeout')}, explanation_steps {config['explanation_steps']}"
            f", max_explanation_token_steps {config['max_explanation_token_steps']}"
        )
        timed_post(session, f"{base}/predictions/{MODEL}", data=b"warm up", headers=TEXT)
        results = {
            "cpu_count": os.cpu_count(),
            "batch_size": described["batchSize"],
            "response_timeout_s": described.get("responseTimeout"),
            "config": {key: value for key, value in config.items() if "explanation" in key},
            "worst_request_s": worst_requests(session, base, config),
            "full_batch": full_batch(session, base, described["batchSize"]),
            "predictions_alone": load_phase(session, base, args.seconds, args.predictors, 0, meter),
            "predictions_with_explanations": load_phase(
                session, base, args.seconds, args.predictors, args.explainers, meter
            ),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
