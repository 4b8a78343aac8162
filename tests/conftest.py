"""Unit-test fixtures: tiny models taken through the real build, handlers loaded from them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import (
    TINY_TEXT_MAX_LENGTH,
    build_small,
    load_built,
    load_text_handler,
    make_context,
    make_tiny_bert,
    make_tiny_tokenizer,
    run_batch,
    save_tiny_sentence_transformer,
    unpack_archive,
    write_text_config,
)

from ts_handlers.sentence_embedding import SentenceEmbeddingHandler
from ts_handlers.token_classification import TokenClassificationHandler
from ts_handlers.tools.build import build_archive
from ts_handlers.tools.models import SmallCNN


@pytest.fixture(scope="session")
def tiny_vision_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised SmallCNN taken through the real build: export, verify, archive."""
    root = tmp_path_factory.mktemp("tiny_vision")
    checkpoint = root / "checkpoint"
    SmallCNN(in_channels=1, num_classes=4, image_size=16).save_checkpoint(checkpoint)
    config_dir = root / "tiny_vision"
    config_dir.mkdir()
    (config_dir / "setup_config.json").write_text(
        json.dumps(
            {
                "mode": "image_classification",
                "model_name": str(checkpoint),
                "model_class": "ts_handlers.tools.models:SmallCNN",
                "image_size": [16, 16],
                "top_k": 2,
                "max_image_pixels": 1_000_000,
            }
        )
    )
    labels = {"0": "zero", "1": "one", "2": "two", "3": "three"}
    (config_dir / "index_to_name.json").write_text(json.dumps(labels))
    (config_dir / "model-config.yaml").write_text("batchSize: 4\nmaxBatchDelay: 10\n")
    mar_path = build_archive(config_dir, root / "store", force=True)
    assert mar_path is not None
    return mar_path


@pytest.fixture(scope="session")
def vision_handler(tiny_vision_archive: Path, tmp_path_factory: pytest.TempPathFactory):
    from ts_handlers.image_classification import ImageClassificationHandler

    model_dir = tmp_path_factory.mktemp("tiny_vision_model")
    manifest = unpack_archive(tiny_vision_archive, model_dir)
    handler = ImageClassificationHandler()
    handler.initialize(make_context(model_dir, manifest))
    return handler


@pytest.fixture
def batch(vision_handler) -> Callable[..., list[tuple[int, Any, dict[str, str]]]]:
    return lambda requests: run_batch(vision_handler, requests)


@pytest.fixture(scope="session")
def tiny_text_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """save_pretrained files of a tiny random BERT classifier and its tokenizer (no download)."""
    checkpoint = tmp_path_factory.mktemp("tiny_text") / "checkpoint"
    tokenizer = make_tiny_tokenizer()
    make_tiny_bert(tokenizer.vocab_size).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    return checkpoint


@pytest.fixture(scope="session")
def tiny_text_archives(
    tiny_text_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The checkpoint taken through the real build in both save modes: save_mode -> .mar."""
    root = tmp_path_factory.mktemp("tiny_text_build")
    settings = {
        # A small inference_batch_size makes the handler cut a batch into several sorted groups.
        "torchscript": {"save_mode": "torchscript", "inference_batch_size": 3},
        "pretrained": {
            "save_mode": "pretrained",
            "captum_explanation": True,
            "explanation_steps": 16,
        },
    }
    archives = {}
    for save_mode, setup in settings.items():
        config_dir = write_text_config(
            root / f"tiny_text_{save_mode}", tiny_text_checkpoint, **setup
        )
        mar_path = build_archive(config_dir, root / "store", force=True)
        assert mar_path is not None
        archives[save_mode] = mar_path
    return archives


@pytest.fixture(scope="session")
def text_handlers(
    tiny_text_archives: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """A SequenceClassificationHandler initialised from each unpacked archive."""
    return {
        save_mode: load_text_handler(mar_path, tmp_path_factory.mktemp(f"tiny_text_{save_mode}"))
        for save_mode, mar_path in tiny_text_archives.items()
    }


@pytest.fixture(scope="session")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> SentenceEmbeddingHandler:
    """A tiny BERT, mean pooling and Normalize, saved by sentence-transformers and built."""
    root = tmp_path_factory.mktemp("kserve_embedding")
    save_tiny_sentence_transformer(root, max_seq_length=TINY_TEXT_MAX_LENGTH, normalize=True)
    setup = {"mode": "sentence_embedding", "model_name": str(root / "model")}
    return load_built(SentenceEmbeddingHandler, build_small(root, setup))


@pytest.fixture(scope="session")
def recogniser(tmp_path_factory: pytest.TempPathFactory) -> TokenClassificationHandler:
    from transformers import BertConfig, BertForTokenClassification

    root = tmp_path_factory.mktemp("kserve_ner")
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    tokenizer = make_tiny_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=TINY_TEXT_MAX_LENGTH,
        initializer_range=0.5,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertForTokenClassification(config).eval().save_pretrained(root / "checkpoint")
    tokenizer.save_pretrained(root / "checkpoint")
    setup = {
        "mode": "token_classification",
        "model_name": str(root / "checkpoint"),
        "max_length": TINY_TEXT_MAX_LENGTH,
    }
    return load_built(TokenClassificationHandler, build_small(root, setup))
