"""`make demo`: serve every archive in model_store/ on a real TorchServe and talk to it.

Starts TorchServe on free loopback ports (token authorization on), sends real HTTP requests to
each model, prints the answers, and stops the server whatever happens.
"""

from __future__ import annotations

import io
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from ts_handlers.tools.server import LocalTorchServe

ROOT = Path(__file__).resolve().parent.parent
MODEL_STORE = ROOT / "model_store"

SENTENCES = [
    "The hotel staff were wonderful and checked us in early.",
    "My order arrived broken and nobody answered my emails.",
    "Honestly, not bad at all for the price!",
    "The crème brûlée was stale and the waiter ignored us 😒",
]


def rule(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 72 - len(title)))


def demo_mnist(session: requests.Session, url: str) -> None:
    data = np.load(ROOT / "build/checkpoints/digits/heldout.npz")
    images, labels = data["images"][:8], data["labels"][:8]
    print("held-out handwritten digits (scikit-learn), sent as PNG bytes:")
    for image, label in zip(images, labels, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, "PNG")
        answer = session.post(f"{url}/predictions/mnist", data=buffer.getvalue(), timeout=30).json()
        top = ", ".join(f"{item['label']} ({item['score']:.3f})" for item in answer)
        mark = "ok" if answer[0]["label"] == str(label) else "WRONG"
        print(f"  true {label}: {top}  {mark}")
    bad = session.post(f"{url}/predictions/mnist", data=b"definitely not a PNG", timeout=30)
    print(f"a request that is not an image -> HTTP {bad.status_code} {bad.text}")


def demo_sentiment(session: requests.Session, url: str) -> None:
    for model in ("sentiment", "sentiment_eager"):
        answer = session.post(
            f"{url}/predictions/{model}", json={"inputs": SENTENCES, "top_k": 1}, timeout=60
        ).json()
        print(f"{model}:")
        for sentence, labels in zip(SENTENCES, answer, strict=True):
            print(f"  {labels[0]['label']:>8} {labels[0]['score']:.3f}  {sentence}")
    explained = session.post(
        f"{url}/explanations/sentiment_eager", json={"inputs": SENTENCES[2]}, timeout=120
    ).json()
    words = "  ".join(
        f"{token}:{score:+.2f}"
        for token, score in zip(explained["tokens"], explained["attributions"], strict=True)
    )
    print(f"explanation of {explained['label']!r} for {SENTENCES[2]!r}:\n  {words}")


def demo_minilm(session: requests.Session, url: str) -> None:
    sentences = [
        "A man is playing a guitar.",
        "Someone strums an acoustic guitar on stage.",
        "The stock market fell sharply today.",
    ]
    response = session.post(f"{url}/predictions/minilm", json={"inputs": sentences}, timeout=60)
    embeddings = np.array(response.json())
    print(f"{len(embeddings)} embeddings of dimension {embeddings.shape[1]} (normalised)")
    for i in range(len(sentences)):
        for j in range(i + 1, len(sentences)):
            cosine = float(embeddings[i] @ embeddings[j])
            print(f"  cos = {cosine:+.3f}  {sentences[i]!r} vs {sentences[j]!r}")
    assert all(math.isclose(float(np.linalg.norm(row)), 1.0, rel_tol=1e-4) for row in embeddings)


def demo_ner(session: requests.Session, url: str) -> None:
    sentences = [
        "Angela Merkel met Emmanuel Macron in Paris before flying back to Berlin.",
        "Satya Nadella said Microsoft will open an office in Nairobi with the World Bank.",
    ]
    answer = session.post(f"{url}/predictions/ner", json={"inputs": sentences}, timeout=60).json()
    for sentence, entities in zip(sentences, answer, strict=True):
        print(sentence)
        for entity in entities:
            print(f"  {entity['entity_group']:>3} {entity['score']:.3f}  {entity['word']!r}")


def demo_reranker(session: requests.Session, url: str) -> None:
    query = "news about Unilever"
    texts = [
        "The conference in Kyoto was organised by Unilever.",
        "Angela Merkel met Emmanuel Macron in Paris before flying back to Berlin.",
        "Unilever opened a research centre in Nairobi last spring.",
        "The mayor of Hanoi opened the new bridge.",
    ]
    # <version> is the archive's (ts-handlers build writes 1.0); TorchServe hands "rerank",
    # the rest of the URL, to the handler.
    answer = session.post(
        f"{url}/predictions/reranker/1.0/rerank",
        json={"query": query, "texts": texts, "return_text": True},
        timeout=60,
    ).json()
    print(f"POST /predictions/reranker/1.0/rerank  query {query!r} (TEI's /rerank body):")
    for item in answer:
        print(f"  {item['score']:.3f}  [{item['index']}] {item['text']}")
    pairs = session.post(
        f"{url}/predictions/reranker",
        json={"inputs": [{"text": query, "text_pair": text} for text in texts[:2]]},
        timeout=60,
    ).json()
    print("the same model on text pairs ({'text': ..., 'text_pair': ...}):")
    for text, labels in zip(texts, pairs, strict=False):
        print(f"  {labels[0]['score']:.3f}  {text}")


DEMOS: dict[str, Callable[[requests.Session, str], None]] = {
    "mnist.mar": demo_mnist,
    "sentiment.mar": demo_sentiment,
    "minilm.mar": demo_minilm,
    "ner.mar": demo_ner,
    "reranker.mar": demo_reranker,
}


def main() -> int:
    archives = sorted(path.name for path in MODEL_STORE.glob("*.mar"))
    if not archives:
        print("model_store/ has no archives; run `make archives` first", file=sys.stderr)
        return 1
    rule("starting TorchServe on 127.0.0.1 (token authorization on, model API off)")
    started = time.perf_counter()
    with LocalTorchServe(MODEL_STORE, archives) as server:
        print(f"serving {', '.join(archives)} in {time.perf_counter() - started:.1f}s")
        print(f"inference API {server.inference_url}, management API {server.management_url}")
        session = requests.Session()
        session.headers.update(server.auth_headers("inference"))
        for archive, demo in DEMOS.items():
            if archive in archives:
                rule(archive)
                demo(session, server.inference_url)
        rule("stopping TorchServe")
    print("stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
