"""TokenClassificationHandler == transformers.pipeline("token-classification"), no server.

A tiny random BERT (WordPiece) and RoBERTa (byte-level BPE) token classifier with BIO labels are
built from configs here, taken through the real build (trace, verify, archive) and served from
the unpacked archive; every aggregation strategy is compared with the pipeline on the same
checkpoint, with the archive's truncation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from harness import (
    TINY_TEXT_MAX_LENGTH,
    body_headers,
    make_bpe_tokenizer,
    make_context,
    make_tiny_tokenizer,
    run_batch,
    unpack_archive,
)

from ts_handlers.config import ConfigError
from ts_handlers.token_classification import STRATEGIES, TokenClassificationHandler
from ts_handlers.tools.build import build_archive

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
TOLERANCE = 1e-4
LONG = "the battery died after two days in Reykjavik, said Ms. Oyelaran-Whitfield. " * 6
TEXTS = [
    "Angela Merkel visited Paris and Berlin last week.",
    "the movie was great",
    "WHAT A WONDERFUL SURPRISE from Jean-Luc Picard!!!",
    "Dr. O'Neill flew from São Paulo to New York, via Zürich.",
    "tea",
    "Microsoft and Apple opened offices in Tokyo; Satya Nadella said so.",
    LONG,  # over max_length: truncated, as the pipeline truncates
    "service was slow but the food was really tasty 😊 at Café Müller",
]
# family -> (config class, model class, tokenizer factory, extra config keys)
FAMILIES = {
    "bert": ("BertConfig", "BertForTokenClassification", make_tiny_tokenizer, {}),
    # RoBERTa's positions start after the padding index: two more rows than tokens.
    "roberta": (
        "RobertaConfig",
        "RobertaForTokenClassification",
        make_bpe_tokenizer,
        {"max_position_embeddings": TINY_TEXT_MAX_LENGTH + 2},
    ),
}


def json_request(payload: Any, **headers: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return {"body": payload}, body_headers("application/json", **headers)


def save_checkpoint(folder: Path, family: str) -> Path:
    import torch
    import transformers

    config_name, model_name, make_tokenizer, extra = FAMILIES[family]
    tokenizer = make_tokenizer()
    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 48,
        "max_position_embeddings": TINY_TEXT_MAX_LENGTH,
        "initializer_range": 0.5,  # wide, so the predicted labels vary from token to token
        "id2label": dict(enumerate(LABELS)),
        "label2id": {label: i for i, label in enumerate(LABELS)},
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = getattr(transformers, config_name)(**{**settings, **extra})
    torch.manual_seed(0)
    getattr(transformers, model_name)(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_config(config_dir: Path, checkpoint: Path, **setup: Any) -> Path:
    config_dir.mkdir(parents=True)
    setup = {
        "mode": "token_classification",
        "model_name": str(checkpoint),
        "max_length": TINY_TEXT_MAX_LENGTH,
        "inference_batch_size": 3,  # several sorted, padded groups per batch
        **setup,
    }
    (config_dir / "setup_config.json").write_text(json.dumps(setup))
    (config_dir / "model-config.yaml").write_text("batchSize: 8\nmaxBatchDelay: 10\n")
    return config_dir


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """(handler loaded from the built archive, the pipeline factory for its checkpoint)."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    root = tmp_path_factory.mktemp(f"ner_{request.param}")
    checkpoint = save_checkpoint(root / "checkpoint", request.param)
    mar_path = build_archive(write_config(root / "ner", checkpoint), root / "store", force=True)
    assert mar_path is not None
    manifest = unpack_archive(mar_path, root / "model")
    handler = TokenClassificationHandler()
    handler.initialize(make_context(root / "model", manifest))

    model = AutoModelForTokenClassification.from_pretrained(str(checkpoint)).eval()
    # The pipeline truncates at the tokenizer's model_max_length: the archive's max_length.
    tokenizer = AutoTokenizer.from_pretrained(
        str(checkpoint), model_max_length=TINY_TEXT_MAX_LENGTH
    )

    def oracle(strategy: str) -> Any:
        return pipeline(
            "token-classification", model=model, tokenizer=tokenizer, aggregation_strategy=strategy
        )

    return handler, oracle


def score_difference(served: list[list[dict]], expected: list[list[dict]]) -> float:
    """Every field equal but the score; returns the largest score difference."""
    worst = 0.0
    assert len(served) == len(expected)
    for got, want in zip(served, expected, strict=True):
        assert [{**e, "score": 0} for e in got] == [{**e, "score": 0} for e in want]
        for got_entity, want_entity in zip(got, want, strict=True):
            worst = max(worst, abs(got_entity["score"] - float(want_entity["score"])))
    return worst


def test_every_strategy_answers_as_the_pipeline(served) -> None:
    handler, oracle = served
    requests = [json_request({"inputs": TEXTS, "aggregation_strategy": s}) for s in STRATEGIES]
    requests.append(json_request({"inputs": TEXTS}))  # the archive's default: simple
    requests.append(json_request(TEXTS[0], **{"X-Aggregation-Strategy": "first"}))
    results = run_batch(handler, requests)  # one TorchServe batch
    assert [status for status, _, _ in results] == [200] * len(requests), results
    assert results[0][2]["X-Batch-Size"] == str(len(STRATEGIES) * len(TEXTS) + len(TEXTS) + 1)
    answers = {s: results[i][1] for i, s in enumerate(STRATEGIES)}
    for strategy, answer in answers.items():
        assert score_difference(answer, oracle(strategy)(TEXTS)) <= TOLERANCE, strategy
    assert score_difference(results[len(STRATEGIES)][1], answers["simple"]) <= TOLERANCE
    assert score_difference([results[-1][1]], [oracle("first")(TEXTS[0])]) <= TOLERANCE

    # Guards: the random model finds entities, and the strategies give different answers.
    assert sum(len(entities) for entities in answers["simple"]) >= len(TEXTS)
    assert {"entity", "index"} <= set(answers["none"][0][0])
    assert len({json.dumps(answer) for answer in answers.values()}) == len(STRATEGIES)
    # The long text was truncated: no entity after its first max_length tokens.
    long_tokens = handler.tokenize(LONG, 0)
    assert len(long_tokens.input_ids) == TINY_TEXT_MAX_LENGTH
    last_end = max(end for _, end in long_tokens.offsets)
    assert all(entity["end"] <= last_end for entity in answers["none"][TEXTS.index(LONG)])


def test_a_bad_strategy_or_a_long_text_is_refused_alone(served) -> None:
    handler, oracle = served
    results = run_batch(
        handler,
        [
            json_request({"inputs": "Paris", "aggregation_strategy": "longest"}),
            json_request({"inputs": LONG, "truncate": False}),
            json_request(TEXTS[0]),
        ],
    )
    status, body, _ = results[0]
    assert status == 400 and body["type"] == "InvalidInput"
    assert "choose one of 'none', 'simple', 'first', 'average', 'max'" in body["message"]
    assert results[1][0] == 413
    assert results[2][0] == 200
    assert score_difference([results[2][1]], [oracle("simple")(TEXTS[0])]) <= TOLERANCE


def test_a_bad_config_is_refused_at_build(tmp_path: Path) -> None:
    checkpoint = tmp_path / "no-checkpoint"
    bad = write_config(tmp_path / "bad", checkpoint, aggregation_strategy="longest")
    with pytest.raises(ConfigError, match="aggregation_strategy='longest'.*'none', 'simple'"):
        build_archive(bad, tmp_path / "store", force=True)
    eager = write_config(tmp_path / "eager", checkpoint, save_mode="pretrained")
    with pytest.raises(ConfigError, match="save_mode='pretrained' is not supported"):
        build_archive(eager, tmp_path / "store", force=True)


def test_tokenize_matches_the_tokenizer_and_counts_what_ran(served) -> None:
    """A tokenize request gives the ids, offsets and token strings of each text as the model
    reads it (truncated), for each tokenizer family; a prediction reports that count."""
    from ts_handlers.text import TOKENIZE_PATH, TOKENS_HEADER

    handler, _ = served
    tokenizer = handler.tokenizer
    [(status, tokens, _), (status_predict, _, headers)] = run_batch(
        handler,
        [
            json_request({"inputs": TEXTS}, url_path=TOKENIZE_PATH),
            json_request({"inputs": TEXTS}),
        ],
    )
    assert (status, status_predict) == (200, 200), tokens
    counts = []
    for text, answer in zip(TEXTS, tokens, strict=True):
        encoding = tokenizer(
            text,
            truncation=True,
            max_length=TINY_TEXT_MAX_LENGTH,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        assert [token["id"] for token in answer] == encoding["input_ids"]
        assert [token["token"] for token in answer] == tokenizer.convert_ids_to_tokens(
            encoding["input_ids"]
        )
        for token, (start, stop), special in zip(
            answer, encoding["offset_mapping"], encoding["special_tokens_mask"], strict=True
        ):
            assert token["special"] is bool(special)
            if not special:
                assert (token["start"], token["stop"]) == (start, stop)
                assert token["text"] == text[start:stop]
        counts.append(len(encoding["input_ids"]))
    assert max(counts) == TINY_TEXT_MAX_LENGTH  # LONG is truncated as the model reads it
    assert int(headers[TOKENS_HEADER]) == sum(counts)


def test_truncation_side_left_answers_as_the_pipeline_with_a_left_truncating_tokenizer(
    served,
) -> None:
    """Entities of a text's end, with offsets into the text as sent."""
    from transformers import pipeline

    handler, oracle = served
    base = oracle("none")
    tokenizer = base.tokenizer
    tokenizer.truncation_side = "left"
    try:
        for strategy in ("none", "simple"):
            left = pipeline(
                "token-classification",
                model=base.model,
                tokenizer=tokenizer,
                aggregation_strategy=strategy,
            )
            expected = left([LONG, TEXTS[0]])
            [(status, answer, _)] = run_batch(
                handler,
                [
                    json_request(
                        {
                            "inputs": [LONG, TEXTS[0]],
                            "aggregation_strategy": strategy,
                            "truncation_side": "left",
                        }
                    )
                ],
            )
            assert status == 200, answer
            assert score_difference(answer, expected) <= TOLERANCE, strategy
            assert any(entity["end"] > len(LONG) // 2 for entity in answer[0])  # the end's
            for entity in answer[0]:
                assert entity["word"]  # offsets index LONG itself
                assert 0 <= entity["start"] <= entity["end"] <= len(LONG)
    finally:
        tokenizer.truncation_side = "right"


def test_stride_reads_long_texts_whole_as_the_pipeline(served) -> None:
    """stride: a text over max_length in overlapping windows, the entities merged as the
    pipeline's stride merges them, within 1e-4; the windows' tokens are what the model ran."""
    from ts_handlers.text import TOKENS_HEADER

    handler, oracle = served
    texts = [LONG, TEXTS[0]]
    stride = 6
    strategies = ("simple", "first", "average", "max")
    results = run_batch(  # one TorchServe batch: every strategy's windows in one forward
        handler,
        [
            json_request({"inputs": texts, "aggregation_strategy": s, "stride": stride})
            for s in strategies
        ],
    )
    truncated = handler.tokenize(LONG, 0)
    last_read = max(end for _, end in truncated.offsets)
    for strategy, (status, answer, _) in zip(strategies, results, strict=True):
        assert status == 200, answer
        expected = oracle(strategy)(texts, stride=stride)
        assert score_difference(answer, expected) <= TOLERANCE, strategy
        # Entities past the first window: the whole text was read.
        assert any(entity["start"] >= last_read for entity in answer[0]), strategy
    windows = handler.tokenizer(
        texts,
        truncation=True,
        max_length=TINY_TEXT_MAX_LENGTH,
        stride=stride,
        return_overflowing_tokens=True,
    )["input_ids"]
    assert len(windows) > len(texts)
    assert int(results[0][2][TOKENS_HEADER]) == sum(map(len, windows))


def test_stride_limits(served) -> None:
    handler, _ = served
    window = TINY_TEXT_MAX_LENGTH - handler.tokenizer.num_special_tokens_to_add()
    results = run_batch(
        handler,
        [
            json_request({"inputs": LONG, "stride": window}),
            json_request({"inputs": LONG, "stride": 4, "aggregation_strategy": "none"}),
            json_request({"inputs": LONG * 40, "stride": 4}),
            json_request({"inputs": [LONG] * 30, "stride": 4}),
            json_request({"inputs": LONG, "stride": -1}),
            json_request({"inputs": TEXTS[0], "stride": 4}),
        ],
    )
    statuses = [status for status, _, _ in results]
    assert statuses == [400, 400, 413, 413, 400, 200], results
    assert f"stride={window} must be below" in results[0][1]["message"]
    assert 'aggregation_strategy "none"' in results[1][1]["message"]
    assert "max_tokens_per_request" in results[2][1]["message"]
    assert "max_tokens_per_request" in results[3][1]["message"]
    assert "stride" in results[4][1]["message"]
