"""OpenAI's embeddings API on real TorchServe, with the official ``openai`` client.

The client's base_url is ``/predictions/minilm/<version>/v1``: TorchServe hands the rest of
the URL (``v1/embeddings``) to the handler as ``url_path``, and the client's ``Bearer`` key is
TorchServe's inference token. The oracle is sentence-transformers' ``encode`` on the folder the
archive was built from, and its tokenizer for the token counts.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serving import MODEL_STORE, ROOT, require

openai = pytest.importorskip("openai")  # a test dependency (setup.cfg dev extra)

CHECKPOINT = ROOT / "build/checkpoints/minilm"
MODEL = "minilm"
DIMENSION = 384
MIN_COSINE = 0.9999
TEXTS = [
    "The cat sat on the mat.",
    "Le chat est assis sur le tapis.",
    "Serving models with TorchServe, café naïve 東京 🙂",
    " ".join(["long input that goes past the model's 256 tokens"] * 40),
]


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(require(CHECKPOINT)), device="cpu")


@pytest.fixture(scope="module")
def version(torchserve) -> str:
    require(MODEL_STORE / f"{MODEL}.mar")
    return torchserve.client().describe(MODEL)["modelVersion"]


@pytest.fixture(scope="module")
def client(torchserve, version):
    return openai.OpenAI(
        base_url=f"{torchserve.inference_url}/predictions/{MODEL}/{version}/v1",
        api_key=torchserve.keys["inference"],
        max_retries=0,
        timeout=120,
    )


def cosines(actual, expected) -> np.ndarray:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    dots = (actual * expected).sum(axis=1)
    return dots / (np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1))


def token_count(reference, texts: list[str]) -> int:
    """The tokens the model runs: after truncation to 256, [CLS] and [SEP] included."""
    return int(reference.tokenize(texts)["attention_mask"].sum())


def test_openai_client_embeds_as_encode(client, reference):
    # The client asks for base64 unless told otherwise, and decodes it to floats itself.
    default = client.embeddings.create(model=MODEL, input=TEXTS)
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    expected = reference.encode(TEXTS, normalize_embeddings=True)
    for answer in (default, floats):
        vectors = np.array([item.embedding for item in answer.data])
        assert vectors.shape == (len(TEXTS), DIMENSION)
        assert [item.index for item in answer.data] == list(range(len(TEXTS)))
        similarity = cosines(vectors, expected)
        print(f"openai client: min cosine {similarity.min():.9f} ({answer.data[0].object})")
        assert similarity.min() >= MIN_COSINE
        assert answer.model == MODEL
        assert answer.usage.prompt_tokens == answer.usage.total_tokens
        assert answer.usage.prompt_tokens == token_count(reference, TEXTS)
    # base64 carries the same float32 numbers the float form writes.
    np.testing.assert_array_equal(
        np.array([item.embedding for item in default.data], np.float32),
        np.array([item.embedding for item in floats.data], np.float32),
    )


def test_openai_client_dimensions_and_errors(client, reference):
    answer = client.embeddings.create(model=MODEL, input=TEXTS[0], dimensions=128)
    [item] = answer.data
    expected = reference.encode(TEXTS[:1], truncate_dim=128, normalize_embeddings=True)
    assert len(item.embedding) == 128
    assert cosines([item.embedding], expected)[0] >= MIN_COSINE
    assert answer.usage.prompt_tokens == token_count(reference, TEXTS[:1])

    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL, input="hello", dimensions=DIMENSION + 1)
    assert caught.value.status_code == 400
    assert caught.value.body["type"] == "invalid_request_error"
    assert "dimensions=385" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL, input=[[1, 2, 3]])
    assert "token id" in caught.value.body["message"]


def test_the_same_body_on_predictions_and_token_counts(torchserve, inference, version, reference):
    body = {"input": TEXTS[:2], "model": MODEL, "encoding_format": "float"}
    response = inference.post(f"{torchserve.inference_url}/predictions/{MODEL}", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    tokens = token_count(reference, TEXTS[:2])
    assert answer["usage"]["prompt_tokens"] == tokens
    assert int(response.headers["X-Compute-Tokens"]) == tokens
    vectors = [item["embedding"] for item in answer["data"]]
    assert cosines(vectors, reference.encode(TEXTS[:2])).min() >= MIN_COSINE

    # A tokenize request (text-embeddings-inference's /tokenize) counts the same tokens.
    url = f"{torchserve.inference_url}/predictions/{MODEL}/{version}/tokenize"
    response = inference.post(url, json={"inputs": TEXTS})
    assert response.status_code == 200, response.text
    tokenized = response.json()
    features = reference.tokenize(TEXTS)
    for tokens_of, ids, mask in zip(
        tokenized, features["input_ids"], features["attention_mask"], strict=True
    ):
        assert [token["id"] for token in tokens_of] == ids[mask.bool()].tolist()
    assert tokenized[0][1]["text"] == "The" and tokenized[0][1]["start"] == 0
    # The project's own client finds the version and posts to the same route.
    assert torchserve.client().tokenize(MODEL, TEXTS[:1]) == tokenized[:1]
    assert len(tokenized[-1]) == 256

    response = inference.post(
        f"{torchserve.inference_url}/predictions/{MODEL}/{version}/v1/chat/completions",
        json={"model": MODEL, "messages": []},
    )
    assert response.status_code == 404, response.text


def test_openai_requests_share_dynamic_batches_with_the_other_forms(
    torchserve, inference, version, reference
):
    """One text per request, OpenAI's form (on its route) interleaved with the task's own form:
    each answer is its own text's vector, and OpenAI requests ran in batches with others."""
    texts = [f"{TEXTS[i % 3]} ({i})" for i in range(24)]
    jobs = [("openai", i) if i % 2 else ("own", i) for i in range(len(texts))]
    random.Random(0).shuffle(jobs)
    base = f"{torchserve.inference_url}/predictions/{MODEL}"

    def send(job):
        form, index = job
        if form == "openai":
            body = {"input": texts[index], "model": MODEL, "encoding_format": "float"}
            return inference.post(f"{base}/{version}/v1/embeddings", json=body, timeout=120)
        return inference.post(base, json={"inputs": texts[index]}, timeout=120)

    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(send, jobs))
    assert all(response.ok for response in responses), [r.text[:200] for r in responses]
    expected = reference.encode(texts)
    served, sizes = [None] * len(texts), []
    for (form, index), response in zip(jobs, responses, strict=True):
        body = response.json()
        served[index] = body["data"][0]["embedding"] if form == "openai" else body[0]
        if form == "openai":
            sizes.append(int(response.headers["X-Batch-Size"]))
    print(f"batch sizes of OpenAI-form requests: {sorted(sizes)}")
    assert cosines(served, expected).min() >= MIN_COSINE
    assert max(sizes) > 1, "OpenAI-form requests must share dynamic batches"
