"""ner.mar, ner_aoti.mar and ner_onnx.mar on real TorchServe, against
transformers.pipeline("token-classification").

The oracle is the pipeline on the checkpoint the archive was built from
(``build/checkpoints/ner``, ``scripts/train_ner.py``), with the archive's truncation
(``max_length``). The held-out sentences and extra texts (casing, punctuation, odd Unicode,
past ``max_length``) are sent concurrently, so TorchServe's dynamic batches mix lengths, each
with aggregation ``simple`` and ``none`` (``X-Aggregation-Strategy``).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from serving import ROOT, require

CHECKPOINT = ROOT / "build/checkpoints/ner"
TOLERANCE = 1e-4
STRATEGIES = ("simple", "none")
EXTRA_TEXTS = [
    "Angela Merkel met Emmanuel Macron in Paris on Tuesday.",
    "ANGELA MERKEL MET EMMANUEL MACRON IN PARIS",
    "angela merkel met emmanuel macron in paris",
    "Dr. O'Neill flew from São Paulo to New York, via Zürich!!!",
    "Satya Nadella (Microsoft) spoke at Stanford University; Sundar Pichai didn't.",
    "Tokyo",
    "the weather was lovely all week",
    "Ms. Oyelaran-Whitfield joined Rolls-Royce in Reykjavík 🎉 last year",
    "Lufthansa flights from Frankfurt to Lagos are delayed. " * 20,  # past max_length
]


def read_heldout() -> list[str]:
    """The held-out sentences, words joined by spaces."""
    text = require(CHECKPOINT / "heldout.conll").read_text(encoding="utf-8")
    return [
        " ".join(line.split("\t")[0] for line in block.splitlines())
        for block in text.split("\n\n")
        if block.strip()
    ]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    texts = read_heldout() + EXTRA_TEXTS
    assert len(set(texts)) == len(texts) >= 50
    return texts


@pytest.fixture(scope="module")
def oracle(texts: list[str]) -> dict[str, list[list[dict[str, Any]]]]:
    from transformers import AutoTokenizer, pipeline

    setup = json.loads((ROOT / "archiver_configs/ner/setup_config.json").read_text())
    # The pipeline truncates at the tokenizer's model_max_length: the archive's max_length.
    tokenizer = AutoTokenizer.from_pretrained(
        str(CHECKPOINT), model_max_length=setup["max_length"], local_files_only=True
    )
    return {
        strategy: pipeline(
            "token-classification",
            model=str(CHECKPOINT),
            tokenizer=tokenizer,
            aggregation_strategy=strategy,
        )(texts)
        for strategy in STRATEGIES
    }


# The same NER model exported three ways: TorchScript, torch.export + AOTInductor, and
# torch.onnx run by ONNX Runtime.
@pytest.fixture(scope="module", params=["ner", "ner_aoti", "ner_onnx"])
def served(request, torchserve, inference, texts: list[str]) -> dict[str, list[Any]]:
    """Every text as its own text/plain request, both strategies, all in flight together."""
    require(ROOT / f"model_store/{request.param}.mar")
    target = f"{torchserve.inference_url}/predictions/{request.param}"
    jobs = [
        {"Content-Type": "text/plain; charset=utf-8", "X-Aggregation-Strategy": strategy}
        for strategy in STRATEGIES
    ]

    def send(item: tuple[str, dict[str, str]]) -> Any:
        text, headers = item
        return inference.post(target, data=text.encode(), headers=headers, timeout=120)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(send, [(text, h) for text in texts for h in jobs]))
    failed = [response.text for response in responses if response.status_code != 200]
    assert not failed, failed[:3]
    return {strategy: responses[i :: len(STRATEGIES)] for i, strategy in enumerate(STRATEGIES)}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_served_entities_match_the_pipeline(served, oracle, texts, strategy: str) -> None:
    worst, found = 0.0, 0
    for text, response, expected in zip(texts, served[strategy], oracle[strategy], strict=True):
        answer = response.json()
        assert [{**e, "score": 0} for e in answer] == [{**e, "score": 0} for e in expected], text
        for got, want in zip(answer, expected, strict=True):
            worst = max(worst, abs(got["score"] - float(want["score"])))
        found += len(answer)
    print(f"ner {strategy}: max |served - pipeline| = {worst:.2e}, {found} entities")
    assert worst <= TOLERANCE
    assert found >= len(texts)  # the demo model finds entities
    sizes = {int(response.headers["X-Batch-Size"]) for response in served[strategy]}
    assert max(sizes) > 1  # concurrent requests shared dynamic batches
