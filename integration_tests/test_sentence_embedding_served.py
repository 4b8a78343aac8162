"""minilm.mar, minilm_aoti.mar and minilm_onnx.mar on real TorchServe: parity with
sentence-transformers, batching, and refusals.

The reference is the same folder the archive was exported from, loaded by sentence-transformers
in this process. ``encode(normalize_embeddings=False)`` on that folder still runs its Normalize
module, so the unnormalised reference is the folder's Transformer and Pooling modules alone.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serving import MODEL_STORE, ROOT, described, require

CHECKPOINT = ROOT / "build/checkpoints/minilm"
MIN_COSINE = 0.9999
MAX_LENGTH = 256  # archiver_configs/minilm/setup_config.json

# What the generator draws words from; kept as text so the lists stay compact.
ENGLISH = (
    "the quick brown fox jumps over lazy dog serving models embeddings search query document "
    "vector similarity latency throughput batch token sentence language neural network cloud "
    "weather coffee morning river mountain library museum station ticket price market music"
)
NON_ASCII = (
    "café naïve Zürich straße 東京 Москва Ελλάδα مرحبا 🙂 résumé São jalapeño façade niño Ångström"
)
WORDS = ENGLISH.split()
UNICODE_WORDS = NON_ASCII.split()
PUNCTUATION = [",", ".", "!", "?", ";", ":", "...", "—", ")", "'s", '"']


def make_sentences(count: int = 120, seed: int = 7) -> list[str]:
    """Sentences of 1 to 300 words mixing case, punctuation and non-Latin scripts."""
    rng = random.Random(seed)
    lengths = [1, 2, 300, 299] + [
        int(round(np.exp(rng.uniform(0, np.log(300))))) for _ in range(count - 4)
    ]
    sentences = []
    for length in lengths:
        words = []
        for _ in range(length):
            word = rng.choice(UNICODE_WORDS) if rng.random() < 0.15 else rng.choice(WORDS)
            word = rng.choice([str.lower, str.upper, str.title, str.lower])(word)
            if rng.random() < 0.2:
                word += rng.choice(PUNCTUATION)
            words.append(word)
        sentences.append(" ".join(words))
    return sentences


SENTENCES = make_sentences()


# The same MiniLM exported three ways: TorchScript, torch.export + AOTInductor, and torch.onnx
# run by ONNX Runtime.
@pytest.fixture(scope="module", params=["minilm", "minilm_aoti", "minilm_onnx"])
def model(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def url(torchserve, model) -> str:
    require(MODEL_STORE / f"{model}.mar")
    return f"{torchserve.inference_url}/predictions/{model}"


@pytest.fixture(scope="module")
def references() -> dict[bool, np.ndarray]:
    """normalize -> sentence-transformers' embeddings of SENTENCES."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(require(CHECKPOINT)), device="cpu")
    assert model.max_seq_length == MAX_LENGTH
    without_normalize = SentenceTransformer(modules=[model[0], model[1]], device="cpu")
    return {
        True: model.encode(SENTENCES, normalize_embeddings=True),
        False: without_normalize.encode(SENTENCES, normalize_embeddings=False),
    }


def cosines(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    dots = (actual * expected).sum(axis=1)
    return dots / (np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1))


def post_all(inference, url: str, payloads: list, workers: int = 8) -> list:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda body: inference.post(url, json=body, timeout=120), payloads))


def chunks(items: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    while start < len(items):
        size = sizes[len(out) % len(sizes)]
        out.append(items[start : start + size])
        start += size
    return out


def test_sentence_corpus_covers_the_range():
    word_counts = [len(sentence.split()) for sentence in SENTENCES]
    assert len(SENTENCES) >= 100
    assert min(word_counts) == 1 and max(word_counts) == 300
    assert any(not sentence.isascii() for sentence in SENTENCES)
    assert any(sentence != sentence.lower() for sentence in SENTENCES)


@pytest.mark.parametrize("normalize", [True, False])
def test_served_embeddings_match_sentence_transformers(inference, url, references, normalize):
    # Requests of varied sizes, sent concurrently, so TorchServe batches several of them.
    groups = chunks(SENTENCES, [1, 7, 3, 16, 2])
    responses = post_all(inference, url, [{"inputs": g, "normalize": normalize} for g in groups])
    assert all(response.status_code == 200 for response in responses), [
        response.text for response in responses if response.status_code != 200
    ][:3]
    served = np.array([vector for response in responses for vector in response.json()])
    expected = references[normalize]
    assert served.shape == expected.shape == (len(SENTENCES), 384)
    similarity = cosines(served, expected)
    norm_ratio = np.linalg.norm(served, axis=1) / np.linalg.norm(expected, axis=1)
    print(
        f"normalize={normalize}: min cosine {similarity.min():.9f} "
        f"(1 - min = {1 - similarity.min():.1e}) over {len(SENTENCES)} "
        f"sentences, norm ratio {norm_ratio.min():.6f}..{norm_ratio.max():.6f}"
    )
    assert similarity.min() >= MIN_COSINE
    assert np.abs(norm_ratio - 1).max() < 1e-4
    if not normalize:
        assert np.linalg.norm(served, axis=1).min() > 1.5  # really unnormalised for this model


def test_one_request_with_many_sentences(inference, url, references):
    response = inference.post(url, json={"inputs": SENTENCES}, timeout=300)
    assert response.status_code == 200, response.text
    assert int(response.headers["X-Batch-Size"]) >= len(SENTENCES)
    served = np.array(response.json())
    assert cosines(served, references[True]).min() >= MIN_COSINE  # default: the model normalises


def test_many_concurrent_single_sentence_requests(torchserve, inference, model, url, references):
    described = torchserve.client().describe(model)
    assert described["batchSize"] >= 8
    indices = list(range(0, len(SENTENCES), 2))[:48]
    responses = post_all(inference, url, [{"inputs": SENTENCES[i]} for i in indices], workers=16)
    assert [response.status_code for response in responses] == [200] * len(indices)
    served = np.array([response.json()[0] for response in responses])
    assert cosines(served, references[True][indices]).min() >= MIN_COSINE
    batch_sizes = [int(response.headers["X-Batch-Size"]) for response in responses]
    print(f"sentences per handler batch: {sorted(batch_sizes)}")
    assert max(batch_sizes) > 1  # TorchServe merged concurrent requests
    assert max(batch_sizes) <= described["batchSize"]


def test_plain_text_and_single_string_answer_one_vector(inference, url, references):
    as_text = inference.post(
        url, data=SENTENCES[5].encode(), headers={"Content-Type": "text/plain"}, timeout=60
    )
    as_json = inference.post(url, json={"inputs": SENTENCES[5]}, timeout=60)
    for response in (as_text, as_json):
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body) == 1 and len(body[0]) == 384
        assert cosines(np.array(body), references[True][5:6])[0] >= MIN_COSINE


def test_over_long_input_without_truncation_is_413(torchserve, inference, model, url):
    long_text = max(SENTENCES, key=len)
    pid = torchserve.client().describe(model)["workers"][0]["pid"]
    response = inference.post(
        url, json={"inputs": ["short one", long_text], "truncate": False}, timeout=60
    )
    assert response.status_code == 413, response.text
    error = response.json()
    assert error["code"] == 413
    assert "inputs[1]" in error["message"] and f"at most {MAX_LENGTH}" in error["message"]
    truncated = inference.post(url, json={"inputs": long_text, "truncate": True}, timeout=60)
    assert truncated.status_code == 200
    assert torchserve.client().describe(model)["workers"][0]["pid"] == pid


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"inputs": []}, 400),
        ({"inputs": [1]}, 400),
        ({"text": "x"}, 400),
        ({"inputs": "x", "normalize": "y"}, 400),
    ],
)
def test_bad_requests_get_4xx_json(inference, url, body, status):
    response = inference.post(url, json=body, timeout=60)
    assert response.status_code == status, response.text
    assert response.json()["code"] == status and response.json()["message"]


def test_describe_says_what_runs_the_model(torchserve, model):
    answer = described(torchserve, model)
    save_mode = {"minilm": "torchscript", "minilm_aoti": "aot_inductor", "minilm_onnx": "onnx"}
    assert answer["config"]["save_mode"] == save_mode[model]
    runtime = answer["export"].get("runtime")
    if model == "minilm_onnx":
        assert runtime["name"] == "onnxruntime" and runtime["providers"] == ["CPUExecutionProvider"]
        assert runtime["graph_optimization_level"] == "ORT_ENABLE_ALL"
        assert answer["config"]["onnxruntime"]["graph_optimization_level"] == "all"
    else:
        assert runtime is None and "onnxruntime" not in answer["config"]
