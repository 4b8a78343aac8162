"""Unit-test harness: drive a handler through a real ``ts.context.Context``, and tiny models.

Kept out of conftest.py so test modules import it by a name no other test folder uses.
"""

from __future__ import annotations

import inspect
import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ts.context import Context, RequestProcessor

from ts_handlers.tools.build import build_archive


def unpack_archive(mar_path: Path, model_dir: Path) -> dict[str, Any]:
    """Unzips a .mar like TorchServe does and returns its manifest."""
    with zipfile.ZipFile(mar_path) as archive:
        archive.extractall(model_dir)
    return json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())


def make_context(model_dir: Path, manifest: dict[str, Any]) -> Context:
    return Context(manifest["model"]["modelName"], str(model_dir), manifest, 8, None, "0.12.0")


def run_batch(
    handler: Any, requests: list[tuple[Any, dict[str, str]]]
) -> list[tuple[int, Any, dict[str, str]]]:
    """Sends (row, headers) pairs as one TorchServe batch; returns (status, body, headers)."""
    context = handler.context
    context.request_processor = [RequestProcessor(headers) for _, headers in requests]
    answers = handler.handle([row for row, _ in requests], context)
    assert len(answers) == len(requests), "one answer per request, in order"
    results = []
    for index, answer in enumerate(answers):
        status, _ = context.get_response_status(index)
        assert context.get_response_content_type(index) == "application/json"
        results.append((status, json.loads(answer), context.get_response_headers(index)))
    return results


def body_headers(content_type: str = "", **extra: str) -> dict[str, Any]:
    return {"body": {"content-type": content_type}, **extra}


# ---- text: a tiny randomly initialised BERT and its WordPiece tokenizer, built offline ---

TINY_TEXT_LABELS = {0: "negative", 1: "neutral", 2: "positive"}

TINY_TEXT_MAX_LENGTH = 32

TINY_TEXT_CORPUS = [
    "the movie was great and the acting was superb",
    "i hated every minute of this awful boring film",
    "a quiet afternoon with tea, books and rain",
    "service was slow but the food was really tasty",
    "what a wonderful surprise, thank you so much!",
    "the battery died after two days; never again.",
]


# The special tokens (and length) of the tiny WordPiece tokenizers, BERT's.
WORDPIECE_TOKENS = {
    "unk_token": "[UNK]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
    "model_max_length": 64,
}


def make_tiny_tokenizer() -> Any:
    """A BERT-style WordPiece tokenizer trained on a few sentences; special tokens come first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(
        TINY_TEXT_CORPUS, WordPieceTrainer(vocab_size=150, special_tokens=special)
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(token, tokenizer.token_to_id(token)) for token in ("[CLS]", "[SEP]")],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **WORDPIECE_TOKENS,
    )


def make_tiny_bert(vocab_size: int) -> Any:
    """Two layers, hidden size 32, three labels; a wide initialisation so scores differ."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        initializer_range=0.5,
        num_labels=len(TINY_TEXT_LABELS),
        id2label=TINY_TEXT_LABELS,
        label2id={label: index for index, label in TINY_TEXT_LABELS.items()},
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config).eval()


def save_tiny_sentence_transformer(
    root: Path, *, max_seq_length: int, layers: int = 2, normalize: bool = False
) -> Path:
    """A tiny BERT with mean pooling (and Normalize), saved by sentence-transformers itself into
    ``root / "model"`` (the checkpoint beside it); returns that folder."""
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel

    try:  # sentence-transformers >= 5.4 moved the modules
        from sentence_transformers.sentence_transformer.modules import (
            Normalize,
            Pooling,
            Transformer,
        )
    except ImportError:  # pragma: no cover - depends on the installed sentence-transformers
        from sentence_transformers.models import Normalize, Pooling, Transformer

    tokenizer = make_tiny_tokenizer()
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        initializer_range=0.5,  # wide weights: embeddings of different texts differ clearly
        pad_token_id=0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(root / "checkpoint")
    tokenizer.save_pretrained(root / "checkpoint")
    transformer = Transformer(str(root / "checkpoint"), max_seq_length=max_seq_length)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), "mean")]
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(root / "model"))
    return root / "model"


def write_text_config(config_dir: Path, checkpoint: Path, **setup: Any) -> Path:
    """An archiver_configs/<name> folder for a sequence-classification checkpoint."""
    config_dir.mkdir(parents=True, exist_ok=True)
    setup = {
        "mode": "sequence_classification",
        "model_name": str(checkpoint),
        "max_length": TINY_TEXT_MAX_LENGTH,
        **setup,
    }
    (config_dir / "setup_config.json").write_text(json.dumps(setup))
    (config_dir / "model-config.yaml").write_text("batchSize: 4\nmaxBatchDelay: 10\n")
    return config_dir


def load_text_handler(mar_path: Path, model_dir: Path) -> Any:
    from ts_handlers.sequence_classification import SequenceClassificationHandler

    manifest = unpack_archive(mar_path, model_dir)
    handler = SequenceClassificationHandler()
    handler.initialize(make_context(model_dir, manifest))
    return handler


# ---- tokenizers of the other families, built offline (no sentencepiece model needed) ------


def make_bpe_tokenizer() -> Any:
    """A RoBERTa-style byte-level BPE tokenizer: <s> text </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TINY_TEXT_CORPUS, trainer)
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", tokenizer.token_to_id("</s>")), ("<s>", tokenizer.token_to_id("<s>"))
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=64,
    )


def make_unigram_tokenizer() -> Any:
    """A SentencePiece-style Unigram tokenizer (what DeBERTa-v2 and ALBERT ship), trained here."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import UnigramTrainer
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = UnigramTrainer(vocab_size=150, special_tokens=special, unk_token="[UNK]")
    tokenizer.train_from_iterator(TINY_TEXT_CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(token, tokenizer.token_to_id(token)) for token in ("[CLS]", "[SEP]")],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **WORDPIECE_TOKENS,
    )


# Architecture -> (config class, model class, tokenizer factory, size keys): tiny and random.
_SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_ARCHITECTURES: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "bert": ("BertConfig", "BertForSequenceClassification", "wordpiece", {**_SMALL}),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        "wordpiece",
        {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 48},
    ),
    # RoBERTa's positions start after the padding index: two more rows than tokens.
    "roberta": (
        "RobertaConfig",
        "RobertaForSequenceClassification",
        "bpe",
        {**_SMALL, "max_position_embeddings": 66},
    ),
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification", "unigram", {**_SMALL}),
    "electra": (
        "ElectraConfig",
        "ElectraForSequenceClassification",
        "wordpiece",
        {**_SMALL, "embedding_size": 16},
    ),
    "albert": (
        "AlbertConfig",
        "AlbertForSequenceClassification",
        "unigram",
        {**_SMALL, "embedding_size": 16},
    ),
}
TOKENIZERS = {
    "wordpiece": make_tiny_tokenizer,
    "bpe": make_bpe_tokenizer,
    "unigram": make_unigram_tokenizer,
}
# problem type -> (num_labels, config.problem_type)
PROBLEM_TYPES = {
    "single_label": (3, "single_label_classification"),
    "multi_label": (3, "multi_label_classification"),
    "regression": (1, "regression"),
}


def save_tiny_classifier(folder: Path, architecture: str, problem: str, seed: int = 0) -> Path:
    """save_pretrained files of a tiny random classifier of one architecture and problem type."""
    import torch
    import transformers

    config_name, model_name, tokenizer_kind, sizes = TINY_ARCHITECTURES[architecture]
    tokenizer = TOKENIZERS[tokenizer_kind]()
    num_labels, problem_type = PROBLEM_TYPES[problem]
    labels = {i: f"{problem}_{i}" for i in range(num_labels)}
    config = getattr(transformers, config_name)(
        **{
            "vocab_size": len(tokenizer),
            "intermediate_size": 48,
            "max_position_embeddings": 64,
            "initializer_range": 0.3,
            "num_labels": num_labels,
            "problem_type": problem_type,
            "id2label": labels,
            "label2id": {label: i for i, label in labels.items()},
            "pad_token_id": tokenizer.pad_token_id,
            **sizes,
        }
    )
    torch.manual_seed(seed)
    getattr(transformers, model_name)(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---- a user's own vision model: the class, its .py source and the setup it is served with ----

RGB_SETUP = {
    "mode": "image_classification",
    "color_mode": "RGB",
    "image_size": [32, 32],
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "top_k": 5,
}


class UserCNN(nn.Module):
    """A user's 3x32x32 classifier with five classes; its source becomes the user's .py file."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten()
        )
        self.head = nn.Linear(8 * 16, 5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


# What the user's model_file holds: the same class, with the imports it needs.
USER_MODEL_FILE = "import torch\nfrom torch import nn\n\n\n" + inspect.getsource(UserCNN)


# ---- small archives built in a test ------------------------------------------------------


def build_small(root: Path, setup: dict[str, Any]) -> Path:
    config_dir = root / "config"
    config_dir.mkdir()
    (config_dir / "setup_config.json").write_text(json.dumps(setup))
    (config_dir / "model-config.yaml").write_text("batchSize: 8\nmaxBatchDelay: 5\n")
    mar_path = build_archive(config_dir, root / "store", name=root.name, force=True)
    assert mar_path is not None
    return mar_path


def load_built(handler_class: type, mar_path: Path) -> Any:
    model_dir = mar_path.parent.parent / "unpacked"
    handler = handler_class()
    handler.initialize(make_context(model_dir, unpack_archive(mar_path, model_dir)))
    return handler


# ---- an archive made by hand, the way TorchServe's Hugging Face example makes one ----------

# TorchServe's examples/Huggingface_Transformers/setup_config.json, as its users have it:
# numbers as strings, and switches that mean nothing to ts_handlers.
TORCHSERVE_EXAMPLE_SETUP = {
    "model_name": "bert-base-uncased",
    "mode": "sequence_classification",
    "do_lower_case": False,
    "num_labels": "3",
    "save_mode": "torchscript",
    "max_length": str(TINY_TEXT_MAX_LENGTH),
    "captum_explanation": True,
    "embedding_name": "bert",
    "FasterTransformer": False,
    "BetterTransformer": False,
    "model_parallel": False,
}
TEXT_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class _Logits1(nn.Module):
    """transformers 5 returns a tuple under torchscript=True; the example's trace wants logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids)[0]


class _Logits2(_Logits1):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)[0]


class _Logits3(_Logits1):
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        )[0]


def trace_like_torchserve_example(
    checkpoint: Path, path: Path, inputs: int = 1, max_length: int = TINY_TEXT_MAX_LENGTH
) -> Path:
    """Traces as Download_Transformer_models.py does: ``torchscript=True``, one dummy text
    padded to ``max_length``, ``torch.jit.trace(model, [input_ids])`` (or with the first
    ``inputs`` of input_ids, attention_mask, token_type_ids), saved under ``path``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(str(checkpoint), torchscript=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint), config=config)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    encoded = tokenizer(
        "This is a dummy input for torch jit trace",
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
        return_token_type_ids=True,
    )
    wrapper = (_Logits1, _Logits2, _Logits3)[inputs - 1](model.eval())
    example = [encoded[name] for name in TEXT_INPUT_NAMES[:inputs]]
    traced = torch.jit.trace(wrapper, example, strict=False)
    torch.jit.save(traced, str(path))
    return path


def handmade_model_dir(
    folder: Path,
    checkpoint: Path,
    serialized: Path | None,
    setup: dict[str, Any],
    files: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "config.json"),
) -> tuple[Path, dict[str, Any]]:
    """(model_dir, manifest) as TorchServe unpacks a torch-model-archiver archive: the
    serialized file, setup_config.json and the extra files at the root, no ts_handlers.json."""
    import shutil

    folder.mkdir(parents=True)
    for name in files:
        if (checkpoint / name).is_file():
            shutil.copy(checkpoint / name, folder / name)
    if serialized is not None:
        shutil.copy(serialized, folder / serialized.name)
    (folder / "setup_config.json").write_text(json.dumps(setup))
    manifest = {
        "model": {
            "modelName": "handmade",
            "handler": "sequence_classification.py",
            "serializedFile": serialized.name if serialized is not None else "",
        }
    }
    return folder, manifest


# ---- tiny cross-encoders (rerankers): one output, saved as sentence-transformers loads them -


def save_tiny_cross_encoder(folder: Path, architecture: str, seed: int = 0) -> Path:
    """A tiny random cross-encoder (``num_labels`` 1) in ``folder``: ``bert`` reads segment
    ids (a ``BertTokenizerFast`` gives a pair's second text id 1, ``type_vocab_size`` 2);
    ``roberta`` does not (byte-level BPE, ``<s> a </s></s> b </s>``, one segment)."""
    import transformers

    config_name, model_name, tokenizer_kind, sizes = TINY_ARCHITECTURES[architecture]
    tokenizer = TOKENIZERS[tokenizer_kind]()
    if architecture == "bert":  # BERT's own tokenizer class: token_type_ids for pairs
        tokenizer = transformers.BertTokenizerFast(
            tokenizer_object=tokenizer.backend_tokenizer,
            **WORDPIECE_TOKENS,
        )
    config = getattr(transformers, config_name)(
        **{
            "vocab_size": len(tokenizer),
            "intermediate_size": 48,
            "max_position_embeddings": 64,
            "initializer_range": 0.5,  # wide weights: scores of different pairs differ clearly
            "num_labels": 1,
            "pad_token_id": tokenizer.pad_token_id,
            **sizes,
            # RoBERTa checkpoints have one segment embedding; BERT's have two.
            **({"type_vocab_size": 1} if architecture == "roberta" else {}),
        }
    )
    torch.manual_seed(seed)
    getattr(transformers, model_name)(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_text_archive(root: Path, name: str, checkpoint: Path, **setup: Any) -> Path:
    """``checkpoint`` taken through the real build as ``root/store/<name>.mar``, with a
    sequence-classification ``setup_config.json`` (``setup`` overrides its keys)."""
    config_dir = write_text_config(root / name, checkpoint, **setup)
    mar_path = build_archive(config_dir, root / "store", force=True)
    assert mar_path is not None
    return mar_path
