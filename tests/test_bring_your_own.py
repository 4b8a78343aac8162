"""Models this project never saw, the way users bring them.

* Every architecture family and problem type against ``transformers.pipeline``.
* The user's own files: a TorchScript file, or a ``.py`` + ``state_dict``; relative paths.
* Refusals at build time (nothing written) and the same checks at a worker's load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import (
    PROBLEM_TYPES,
    RGB_SETUP,
    TINY_ARCHITECTURES,
    TINY_TEXT_MAX_LENGTH,
    USER_MODEL_FILE,
    UserCNN,
    body_headers,
    load_text_handler,
    make_context,
    make_tiny_tokenizer,
    run_batch,
    save_tiny_classifier,
    unpack_archive,
    write_text_config,
)
from torch import nn

from ts_handlers.config import ConfigError
from ts_handlers.image_classification import ImageClassificationHandler
from ts_handlers.tools.build import build_archive

TOLERANCE = 1e-4
TEXTS = [
    "the movie was great",
    "i hated every minute of this awful boring film, and the popcorn was stale too",
    "tea",
    "service was slow but the food was really tasty; we will come back next week " * 3,
    "What a WONDERFUL surprise!!!",
    "rain",
]


def json_request(payload: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    return {"body": payload}, body_headers("application/json")


def pipeline_for(checkpoint: Path, **options: Any) -> Any:
    from transformers import pipeline

    return pipeline(
        "text-classification",
        model=str(checkpoint),
        truncation=True,
        max_length=TINY_TEXT_MAX_LENGTH,
        **options,
    )


def assert_same_answers(served: list[Any], expected: list[Any]) -> float:
    """Same labels in the same order, scores within TOLERANCE; returns the largest difference."""
    assert len(served) == len(expected)
    worst = 0.0
    for got, want in zip(served, expected, strict=True):
        assert [item["label"] for item in got] == [item["label"] for item in want]
        for got_item, want_item in zip(got, want, strict=True):
            worst = max(worst, abs(got_item["score"] - want_item["score"]))
    assert worst <= TOLERANCE
    return worst


def build(config_dir: Path, store: Path) -> Path:
    mar_path = build_archive(config_dir, store, force=True)
    assert mar_path is not None
    return mar_path


def vision_handler(mar_path: Path, model_dir: Path) -> ImageClassificationHandler:
    manifest = unpack_archive(mar_path, model_dir)
    handler = ImageClassificationHandler()
    handler.initialize(make_context(model_dir, manifest))
    return handler


def export_report(mar_path: Path, tmp_path: Path) -> dict[str, Any]:
    folder = tmp_path / "report"
    unpack_archive(mar_path, folder)
    return json.loads((folder / "export_report.json").read_text())


# ---- every architecture and problem type == transformers.pipeline ---------------------------


@pytest.mark.parametrize("problem", list(PROBLEM_TYPES))
@pytest.mark.parametrize("architecture", list(TINY_ARCHITECTURES))
def test_answers_equal_the_pipeline(architecture: str, problem: str, tmp_path: Path) -> None:
    checkpoint = save_tiny_classifier(tmp_path / "checkpoint", architecture, problem)
    config_dir = write_text_config(tmp_path / "config", checkpoint, inference_batch_size=4)
    handler = load_text_handler(build(config_dir, tmp_path / "store"), tmp_path / "model")

    [(status, answer, _)] = run_batch(handler, [json_request({"inputs": TEXTS})])
    assert status == 200
    assert_same_answers(answer, pipeline_for(checkpoint, top_k=None)(TEXTS))
    expected_function = {"single_label": "softmax", "multi_label": "sigmoid"}.get(problem, "none")
    assert handler.function == expected_function
    if problem == "regression":  # the raw value, not a probability
        assert answer[0][0]["label"] == "regression_0"


@pytest.fixture(scope="module")
def bert_single_label(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("bert") / "ckpt", "bert", "single_label")


@pytest.mark.parametrize("function", ["softmax", "sigmoid", "none"])
def test_function_to_apply_in_the_config_and_per_request(
    bert_single_label: Path, function: str, tmp_path: Path
) -> None:
    expected = pipeline_for(bert_single_label, top_k=None, function_to_apply=function)(TEXTS)
    config_dir = write_text_config(
        tmp_path / "config", bert_single_label, function_to_apply=function
    )
    handler = load_text_handler(build(config_dir, tmp_path / "store"), tmp_path / "model")
    [(status, answer, _)] = run_batch(handler, [json_request({"inputs": TEXTS})])
    assert status == 200
    assert_same_answers(answer, expected)

    # The same choice per request, on an archive whose default is another function, batched
    # with a request that keeps the default.
    other = "sigmoid" if function != "sigmoid" else "softmax"
    config_dir = write_text_config(tmp_path / "other", bert_single_label, function_to_apply=other)
    handler = load_text_handler(build(config_dir, tmp_path / "store2"), tmp_path / "model2")
    results = run_batch(
        handler,
        [
            json_request({"inputs": TEXTS, "function_to_apply": function}),
            json_request({"inputs": TEXTS}),
        ],
    )
    assert [status for status, _, _ in results] == [200, 200]
    assert_same_answers(results[0][1], expected)
    oracle_default = pipeline_for(bert_single_label, top_k=None, function_to_apply=other)
    assert_same_answers(results[1][1], oracle_default(TEXTS))


def test_top_k_behaves_as_the_pipeline(bert_single_label: Path, tmp_path: Path) -> None:
    config_dir = write_text_config(tmp_path / "config", bert_single_label)
    handler = load_text_handler(build(config_dir, tmp_path / "store"), tmp_path / "model")
    for top_k in (1, 2):
        [(status, answer, _)] = run_batch(
            handler, [json_request({"inputs": TEXTS, "top_k": top_k})]
        )
        assert status == 200
        assert_same_answers(answer, pipeline_for(bert_single_label, top_k=top_k)(TEXTS))


def test_a_function_that_does_not_exist_is_refused(bert_single_label: Path, tmp_path: Path) -> None:
    config_dir = write_text_config(tmp_path / "config", bert_single_label)
    handler = load_text_handler(build(config_dir, tmp_path / "store"), tmp_path / "model")
    [(status, body, _)] = run_batch(
        handler, [json_request({"inputs": "tea", "function_to_apply": "relu"})]
    )
    assert status == 400 and "choose one of 'softmax', 'sigmoid', 'none'" in body["message"]
    bad = write_text_config(tmp_path / "bad", bert_single_label, function_to_apply="relu")
    with pytest.raises(ConfigError, match="function_to_apply='relu'"):
        build_archive(bad, tmp_path / "store", force=True)


# ---- refusals at build time, and the same checks at load -------------------------------------


def write_labels(config_dir: Path, labels: dict[str, str]) -> None:
    (config_dir / "index_to_name.json").write_text(json.dumps(labels))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"0": "a", "1": "b"}, "has 2 names; the model outputs 3 classes; missing keys 2"),
        ({"0": "a", "1": "b", "2": "c", "3": "d"}, "unexpected keys 3"),
        ({"1": "a", "2": "b", "3": "c"}, "missing keys 0; unexpected keys 3"),
    ],
)
def test_a_labels_file_that_does_not_fit_is_refused_before_anything_is_written(
    bert_single_label: Path, tmp_path: Path, labels: dict[str, str], message: str
) -> None:
    config_dir = write_text_config(tmp_path / "config", bert_single_label)
    write_labels(config_dir, labels)
    with pytest.raises(ConfigError, match=message):
        build_archive(config_dir, tmp_path / "store", force=True)
    assert not (tmp_path / "store").exists()


def test_a_wrong_labels_file_fails_the_load_of_an_archive_built_elsewhere(
    bert_single_label: Path, tmp_path: Path
) -> None:
    config_dir = write_text_config(tmp_path / "config", bert_single_label)
    write_labels(config_dir, {"0": "a", "1": "b", "2": "c"})
    mar_path = build(config_dir, tmp_path / "store")
    model_dir = tmp_path / "model"
    manifest = unpack_archive(mar_path, model_dir)
    write_labels(model_dir, {"0": "a", "1": "b"})
    from ts_handlers.sequence_classification import SequenceClassificationHandler

    with pytest.raises(ConfigError, match="has 2 names; the model outputs 3 classes"):
        SequenceClassificationHandler().initialize(make_context(model_dir, manifest))


def save_bert_with_tokenizer(folder: Path, tokenizer: Any, vocab_size: int) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=64,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def five_token_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]"
    )


@pytest.mark.parametrize("save_mode", ["torchscript", "pretrained"])
def test_a_tokenizer_that_does_not_fit_the_model_is_refused(save_mode: str, tmp_path: Path) -> None:
    small = save_bert_with_tokenizer(tmp_path / "small", five_token_tokenizer(), 30522)
    config_dir = write_text_config(tmp_path / "config", small, save_mode=save_mode)
    with pytest.raises(
        ConfigError, match="has 5 tokens for a model whose embedding table has 30522"
    ):
        build_archive(config_dir, tmp_path / "store", force=True)

    tokenizer = make_tiny_tokenizer()
    large = save_bert_with_tokenizer(tmp_path / "large", tokenizer, len(tokenizer) - 20)
    config_dir = write_text_config(tmp_path / "config2", large, save_mode=save_mode)
    with pytest.raises(ConfigError, match=f"ids up to {len(tokenizer) - 1}, past the model's"):
        build_archive(config_dir, tmp_path / "store", force=True)
    assert not (tmp_path / "store").exists()


def test_a_swapped_tokenizer_fails_the_load(bert_single_label: Path, tmp_path: Path) -> None:
    config_dir = write_text_config(tmp_path / "config", bert_single_label)
    mar_path = build(config_dir, tmp_path / "store")
    model_dir = tmp_path / "model"
    manifest = unpack_archive(mar_path, model_dir)
    bpe_folder = tmp_path / "bpe"
    from harness import make_bpe_tokenizer

    make_bpe_tokenizer().save_pretrained(bpe_folder)  # 400 tokens for a 150-row table
    for path in bpe_folder.iterdir():
        shutil.copy2(path, model_dir / path.name)
    from ts_handlers.sequence_classification import SequenceClassificationHandler

    with pytest.raises(ConfigError, match="was not made for this model"):
        SequenceClassificationHandler().initialize(make_context(model_dir, manifest))


@pytest.mark.parametrize(
    ("architecture", "layer"),
    [("distilbert", "distilbert.embeddings"), ("roberta", "roberta.embeddings")],
)
def test_explanations_find_the_embedding_layer_of_any_model(
    architecture: str, layer: str, tmp_path: Path
) -> None:
    checkpoint = save_tiny_classifier(tmp_path / "ckpt", architecture, "single_label")
    settings = {"save_mode": "pretrained", "captum_explanation": True, "explanation_steps": 8}
    config_dir = write_text_config(tmp_path / "config", checkpoint, **settings)
    mar_path = build(config_dir, tmp_path / "store")
    handler = load_text_handler(mar_path, tmp_path / "model")
    assert handler.config.embedding_name == layer  # resolved by the build, recorded in the archive
    [(status, answer, _)] = run_batch(
        handler, [({"body": "the movie was great"}, body_headers("text/plain", explain="True"))]
    )
    assert status == 200
    assert len(answer["attributions"]) == len(answer["tokens"]) > 2

    # TorchServe's default name "bert" means nothing to this model: refused with the fix.
    wrong = write_text_config(tmp_path / "wrong", checkpoint, embedding_name="bert", **settings)
    with pytest.raises(ConfigError, match=f"does not name an embedding layer.*use '{layer}'"):
        build_archive(wrong, tmp_path / "store2", force=True)
    assert not (tmp_path / "store2").exists()

    # An archive built elsewhere with a wrong name fails its load, not its first explanation.
    model_dir = tmp_path / "model"
    setup = json.loads((model_dir / "setup_config.json").read_text())
    (model_dir / "setup_config.json").write_text(json.dumps({**setup, "embedding_name": "bert"}))
    from ts_handlers.sequence_classification import SequenceClassificationHandler

    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    with pytest.raises(ConfigError, match="does not name an embedding layer"):
        SequenceClassificationHandler().initialize(make_context(model_dir, manifest))


def test_explanations_on_a_torchscript_archive_are_refused_at_build(
    bert_single_label: Path, tmp_path: Path
) -> None:
    config_dir = write_text_config(tmp_path / "config", bert_single_label, captum_explanation=True)
    with pytest.raises(ConfigError, match="captum_explanation needs save_mode 'pretrained'"):
        build_archive(config_dir, tmp_path / "store", force=True)


# ---- the user's own files: vision ---------------------------------------------------------------


def png(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_serves_like(handler: ImageClassificationHandler, model: nn.Module) -> None:
    """Every answer equals the model's own softmax on the same preprocessed image."""
    import io

    from PIL import Image

    from ts_handlers.image_classification import image_to_tensor

    images = [png(seed) for seed in range(6)]
    results = run_batch(
        handler, [({"body": bytearray(data)}, body_headers("image/png")) for data in images]
    )
    for data, (status, answer, _) in zip(images, results, strict=True):
        assert status == 200
        tensor = image_to_tensor(Image.open(io.BytesIO(data)), handler.config)
        with torch.no_grad():
            expected = torch.softmax(model(tensor.unsqueeze(0)), dim=-1)[0]
        for item in answer:
            assert item["score"] == pytest.approx(float(expected[int(item["label"])]), abs=1e-5)


def test_a_users_torchscript_file_is_served_and_checked_against_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "archiver_configs" / "user_cnn"
    config_dir.mkdir(parents=True)
    torch.manual_seed(0)
    scripted = torch.jit.script(UserCNN().eval())
    scripted.save(str(config_dir / "my_model.pt"))
    (config_dir / "setup_config.json").write_text(
        json.dumps({**RGB_SETUP, "serialized_file": "my_model.pt"})
    )
    monkeypatch.chdir(tmp_path)  # the relative path is read from the config folder, not here
    mar_path = build(config_dir, tmp_path / "store")

    report = export_report(mar_path, tmp_path)
    verification = report["verification"]
    assert verification["eager_reference"] is False
    assert verification["dynamic_shapes"]["passed"] is True
    assert "one input at a time" in verification["dynamic_shapes"]["reference"]
    assert [case["shape"][0] for case in verification["dynamic_shapes"]["cases"]] == [1, 2, 7, 32]
    handler = vision_handler(mar_path, tmp_path / "model")
    assert handler.labels == ["0", "1", "2", "3", "4"]
    assert_serves_like(handler, scripted)


class BakedBatch(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.reshape(4, -1)[:, :5]


def test_a_torchscript_file_that_baked_in_its_batch_size_is_refused(tmp_path: Path) -> None:
    config_dir = tmp_path / "baked"
    config_dir.mkdir()
    traced = torch.jit.trace(BakedBatch(), torch.randn(4, 3, 32, 32))
    traced.save(str(config_dir / "model.pt"))
    (config_dir / "setup_config.json").write_text(
        json.dumps({**RGB_SETUP, "serialized_file": "model.pt"})
    )
    # Its output on a batch of 2 is not (2, classes): caught before any verification.
    with pytest.raises(ConfigError, match=r"\(2, num_classes\) logits|fails on a 2x3x32x32"):
        build_archive(config_dir, tmp_path / "store", force=True)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("weights", ["weights.pt", "weights.safetensors"])
def test_a_users_model_file_and_state_dict_are_exported_and_verified_against_eager(
    tmp_path: Path, weights: str
) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "user_net.py").write_text(USER_MODEL_FILE)
    torch.manual_seed(1)
    model = UserCNN().eval()
    if weights.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(config_dir / weights))
    else:
        torch.save(model.state_dict(), config_dir / weights)
    setup = {**RGB_SETUP, "model_file": "user_net.py", "serialized_file": weights}
    (config_dir / "setup_config.json").write_text(json.dumps(setup))
    write_labels(config_dir, {str(i): name for i, name in enumerate("abcde")})
    mar_path = build(config_dir, tmp_path / "store")

    verification = export_report(mar_path, tmp_path)["verification"]
    assert verification["eager_reference"] is True
    assert verification["dynamic_shapes"]["reference"] == "eager"
    assert verification["dynamic_shapes"]["max_abs_diff"] < 1e-4
    handler = vision_handler(mar_path, tmp_path / "model")
    handler.labels = [str(i) for i in range(5)]  # compare by class index
    assert_serves_like(handler, model)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ({}, "name the model: serialized_file"),
        ({"model_file": "user_net.py"}, "model_file needs serialized_file"),
        ({"serialized_file": "weights.pt"}, "looks like a state_dict"),
        (
            {"model_file": "user_net.py", "model_class": "Nope", "serialized_file": "weights.pt"},
            "model_class 'Nope' is not an nn.Module defined in .*it defines UserCNN",
        ),
        ({"model_file": "user_net.py", "serialized_file": "other.pt"}, "does not fit UserCNN"),
        ({"serialized_file": "missing.pt"}, "does not exist"),
    ],
)
def test_user_files_that_cannot_work_are_refused_with_the_fix(
    tmp_path: Path, setup: dict[str, str], message: str
) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "user_net.py").write_text(USER_MODEL_FILE)
    torch.save(UserCNN().state_dict(), config_dir / "weights.pt")
    torch.save(nn.Linear(3, 3).state_dict(), config_dir / "other.pt")
    (config_dir / "setup_config.json").write_text(json.dumps({**RGB_SETUP, **setup}))
    with pytest.raises(ConfigError, match=message):
        build_archive(config_dir, tmp_path / "store", force=True)
    assert not (tmp_path / "store").exists()


def test_a_vision_labels_file_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    torch.jit.script(UserCNN().eval()).save(str(config_dir / "model.pt"))
    (config_dir / "setup_config.json").write_text(
        json.dumps({**RGB_SETUP, "serialized_file": "model.pt"})
    )
    write_labels(config_dir, {str(i): name for i, name in enumerate("abcd")})
    with pytest.raises(ConfigError, match="has 4 names; the model outputs 5 classes"):
        build_archive(config_dir, tmp_path / "store", force=True)


# ---- the user's own files: text -----------------------------------------------------------------


class TracedLogits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def test_a_users_traced_text_classifier_is_served_at_pipeline_parity(
    tmp_path: Path,
) -> None:
    checkpoint = save_tiny_classifier(tmp_path / "ckpt", "roberta", "multi_label")
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint)).eval()
    example = torch.ones((2, 16), dtype=torch.long)
    traced = torch.jit.trace(TracedLogits(model), (example, example), strict=False)
    tokenizer_dir = tmp_path / "tokenizer"
    shutil.copytree(checkpoint, tokenizer_dir)
    for weights in tokenizer_dir.glob("*.safetensors"):
        weights.unlink()  # the TorchScript file is the model; this folder only says how to read
    traced.save(str(tmp_path / "classifier.pt"))
    config_dir = write_text_config(
        tmp_path / "config", tokenizer_dir, serialized_file=str(tmp_path / "classifier.pt")
    )
    mar_path = build(config_dir, tmp_path / "store")
    assert export_report(mar_path, tmp_path)["verification"]["eager_reference"] is False
    handler = load_text_handler(mar_path, tmp_path / "model")
    assert handler.function == "sigmoid"  # problem_type read from the folder's config.json
    [(status, answer, _)] = run_batch(handler, [json_request({"inputs": TEXTS})])
    assert status == 200
    assert_same_answers(answer, pipeline_for(checkpoint, top_k=None)(TEXTS))


USER_TEXT_MODEL_FILE = '''
import torch
from torch import nn


class BagOfWords(nn.Module):
    """Mean of the unpadded token embeddings, then a linear head."""

    def __init__(self, vocab_size: int = 150, classes: int = 2) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, 16)
        self.head = nn.Linear(16, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embeddings(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled)
'''


def test_a_users_text_model_file_is_exported_and_verified_against_eager(tmp_path: Path) -> None:
    tokenizer = make_tiny_tokenizer()
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "bow.py").write_text(USER_TEXT_MODEL_FILE)
    namespace: dict[str, Any] = {}
    exec(USER_TEXT_MODEL_FILE, namespace)
    torch.manual_seed(0)
    model = namespace["BagOfWords"](vocab_size=len(tokenizer)).eval()
    torch.save(model.state_dict(), config_dir / "bow.pt")
    write_labels(config_dir, {"0": "no", "1": "yes"})
    write_text_config(
        config_dir,
        Path("../tokenizer"),
        model_file="bow.py",
        model_class="BagOfWords",
        serialized_file="bow.pt",
    )
    mar_path = build(config_dir, tmp_path / "store")
    verification = export_report(mar_path, tmp_path)["verification"]
    assert verification["eager_reference"] is True
    handler = load_text_handler(mar_path, tmp_path / "model")
    assert handler.labels == ["no", "yes"] and handler.function == "softmax"
    [(status, answer, _)] = run_batch(handler, [json_request({"inputs": TEXTS})])
    assert status == 200
    for text, got in zip(TEXTS, answer, strict=True):
        ids = tokenizer(text, truncation=True, max_length=TINY_TEXT_MAX_LENGTH)["input_ids"]
        ids = torch.tensor([ids])
        with torch.no_grad():
            expected = torch.softmax(model(ids, torch.ones_like(ids)), dim=-1)[0]
        by_label = {item["label"]: item["score"] for item in got}
        assert by_label["no"] == pytest.approx(float(expected[0]), abs=1e-5)
        assert by_label["yes"] == pytest.approx(float(expected[1]), abs=1e-5)
