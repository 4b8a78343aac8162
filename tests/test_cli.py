"""The ``ts-handlers`` command: init on tiny model folders, argument errors, readable answers.

Nothing here starts TorchServe: ``predict --url`` is pointed at a client whose answer is
canned (integration_tests/test_cli_served.py runs the command against a real server).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import UserCNN, make_tiny_tokenizer, save_tiny_classifier

from ts_handlers.tasks import load_task_config
from ts_handlers.tools import cli
from ts_handlers.tools.client import TorchServeClient, TorchServeError

# ---- init ------------------------------------------------------------------------------------


def read_setup(config_dir: Path) -> dict[str, Any]:
    return json.loads((config_dir / "setup_config.json").read_text())


def test_init_sequence_classifier_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = save_tiny_classifier(tmp_path / "models" / "reviews", "bert", "single_label")
    configs = tmp_path / "configs"

    assert cli.main(["init", str(checkpoint), "--configs-root", str(configs)]) == 0

    config_dir = configs / "reviews"
    setup = read_setup(config_dir)
    # The tokenizer says 64, as does the position table; both are under the 512 cap.
    assert setup == {
        "mode": "sequence_classification",
        "model_name": "../../models/reviews",
        "max_length": 64,
    }
    assert (config_dir / setup["model_name"]).resolve() == checkpoint.resolve()
    labels = json.loads((config_dir / "index_to_name.json").read_text())
    assert labels == {"0": "single_label_0", "1": "single_label_1", "2": "single_label_2"}
    assert (config_dir / "model-config.yaml").is_file()
    task, _ = load_task_config(config_dir / "setup_config.json")
    assert task.mode == "sequence_classification"
    assert "sequence_classification" in capsys.readouterr().out


def test_init_token_classifier_caps_max_length_at_512(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForTokenClassification

    tokenizer = make_tiny_tokenizer()
    tokenizer.model_max_length = 10**30  # what a tokenizer without a limit stores
    labels = {0: "O", 1: "B-PER", 2: "I-PER"}
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=1024,
        id2label=labels,
        label2id={label: index for index, label in labels.items()},
    )
    folder = tmp_path / "ner_checkpoint"
    BertForTokenClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    assert cli.main(["init", str(folder), "--name", "ner", "--configs-root", str(tmp_path)]) == 0

    setup = read_setup(tmp_path / "ner")
    assert setup["mode"] == "token_classification"
    assert setup["max_length"] == 512
    assert json.loads((tmp_path / "ner" / "index_to_name.json").read_text())["1"] == "B-PER"


def test_init_sentence_transformers_folder(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6 keeps them here
        from sentence_transformers.models import Pooling, Transformer

    checkpoint = tmp_path / "encoder"
    tokenizer = make_tiny_tokenizer()
    BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=64,
        )
    ).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    transformer = Transformer(str(checkpoint), max_seq_length=48)
    pooling = Pooling(transformer.get_embedding_dimension(), "max")
    folder = tmp_path / "st_model"
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(folder))

    assert cli.main(["init", str(folder), "--configs-root", str(tmp_path / "configs")]) == 0

    setup = read_setup(tmp_path / "configs" / "st_model")
    assert setup == {
        "mode": "sentence_embedding",
        "model_name": "../../st_model",
        "pooling_mode": "max",
        "max_length": 48,
    }
    assert not (tmp_path / "configs" / "st_model" / "index_to_name.json").exists()


def test_init_torchscript_file_then_build(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model_file = tmp_path / "weights" / "my_cnn.pt"
    model_file.parent.mkdir()
    torch.jit.script(UserCNN().eval()).save(str(model_file))
    configs = tmp_path / "configs"
    command = ["init", str(model_file), "--configs-root", str(configs)]

    assert cli.main([*command, "--image-size", "32", "32", "--color-mode", "RGB"]) == 0

    config_dir = configs / "my_cnn"
    setup = read_setup(config_dir)
    assert setup["mode"] == "image_classification"
    assert setup["serialized_file"] == "../../weights/my_cnn.pt"
    assert setup["image_size"] == [32, 32] and setup["color_mode"] == "RGB"
    assert len(setup["mean"]) == len(setup["std"]) == 3

    # The build resolves the written paths from the config folder, wherever it runs from.
    store = tmp_path / "store"
    assert cli.main(["build", str(config_dir), "--model-store", str(store)]) == 0
    out = capsys.readouterr().out
    for stage in ("loading the model", "exporting (torchscript) and verifying", "packaging"):
        assert f"[my_cnn] {stage}" in out
    assert "[my_cnn] wrote" in out
    assert (store / "my_cnn.mar").is_file()


def test_init_torchscript_defaults_are_28_by_28_grey(tmp_path: Path) -> None:
    model_file = tmp_path / "digits.pt"
    model_file.write_bytes(b"not read by init")
    assert cli.main(["init", str(model_file), "--configs-root", str(tmp_path / "c")]) == 0
    setup = read_setup(tmp_path / "c" / "digits")
    assert setup["image_size"] == [28, 28] and setup["color_mode"] == "L"
    assert setup["mean"] == [0.1307] and setup["std"] == [0.3081]


def test_init_refuses_an_existing_folder_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model_file = tmp_path / "m.pt"
    model_file.write_bytes(b"")
    existing = tmp_path / "c" / "m"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("mine")
    command = ["init", str(model_file), "--configs-root", str(tmp_path / "c")]

    assert cli.main(command) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert (existing / "keep.txt").is_file()

    assert cli.main([*command, "--force"]) == 0
    assert not (existing / "keep.txt").exists()
    assert read_setup(existing)["serialized_file"] == "../../m.pt"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda folder: None, "neither modules.json"),
        (
            lambda folder: (folder / "config.json").write_text(
                json.dumps({"architectures": ["GPT2LMHeadModel"]})
            ),
            "GPT2LMHeadModel",
        ),
    ],
    ids=["empty folder", "unknown architecture"],
)
def test_init_refuses_what_it_cannot_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture, make: Any, message: str
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    make(folder)
    assert cli.main(["init", str(folder), "--configs-root", str(tmp_path / "c")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c" / "model").exists()


def test_init_removes_a_config_that_does_not_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model_file = tmp_path / "m.pt"
    model_file.write_bytes(b"")
    command = ["init", str(model_file), "--configs-root", str(tmp_path / "c")]
    # One std for three channels: the task's schema refuses it.
    assert cli.main([*command, "--color-mode", "RGB", "--std", "0.5"]) == 1
    assert "mean and std need 3 value(s)" in capsys.readouterr().err
    assert not (tmp_path / "c" / "m").exists()


# ---- argument errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["predict", "mnist"],  # neither --text nor --file
        ["predict", "mnist", "--text", "a", "--file", "x.png"],
        ["predict", "mnist", "--text", "a", "--url", "http://127.0.0.1:8080"],  # no --key
        ["init"],
        ["init", "m.pt", "--image-size", "28"],
        ["init", "m.pt", "--color-mode", "CMYK"],
        ["init", "m.pt", "--image-size", "0", "28"],
    ],
)
def test_argument_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2


def test_build_needs_a_folder(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:  # the build's own argument error
        cli.main(["build"])
    assert exited.value.code == 2
    assert "name at least one" in capsys.readouterr().err


def test_serve_names_the_archives_there_are(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "mnist.mar").write_bytes(b"")
    assert cli.main(["serve", "nope", "--model-store", str(tmp_path)]) == 1
    assert "nope.mar is not in" in (err := capsys.readouterr().err) and "mnist.mar" in err


def test_resolve_archives_by_name_and_by_path(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "a.mar").write_bytes(b"")
    (store / "b.mar").write_bytes(b"")
    assert cli.resolve_archives(["a", "b.mar"], store) == (store.resolve(), ["a.mar", "b.mar"])
    # A path names its own store.
    assert cli.resolve_archives([str(store / "a.mar")], None) == (store.resolve(), ["a.mar"])
    elsewhere = tmp_path / "c.mar"
    elsewhere.write_bytes(b"")
    with pytest.raises(cli.CommandError, match="one model store"):
        cli.resolve_archives([str(elsewhere)], store)


# ---- predict: request bodies and readable answers --------------------------------------------


def test_request_bodies(tmp_path: Path) -> None:
    assert cli.request_body(["one"], None) == ({"inputs": "one"}, "application/json")
    assert cli.request_body(["a", "b"], None) == ({"inputs": ["a", "b"]}, "application/json")
    text = tmp_path / "review.txt"
    text.write_text("a fine film\n")
    assert cli.request_body(None, text) == ({"inputs": "a fine film"}, "application/json")
    body = tmp_path / "request.json"
    body.write_text('{"inputs": "x", "top_k": 1}')
    assert cli.request_body(None, body) == (body.read_bytes(), "application/json")
    image = tmp_path / "digit.png"
    image.write_bytes(b"\x89PNG...")
    assert cli.request_body(None, image) == (b"\x89PNG...", "image/png")
    with pytest.raises(cli.CommandError, match="not a file"):
        cli.request_body(None, tmp_path / "missing.png")


def test_a_query_makes_a_rerank_body_and_its_answer_prints_best_first() -> None:
    body, content_type = cli.request_body(["tea", "the food was tasty"], None, "food")
    assert body == {"query": "food", "texts": ["tea", "the food was tasty"], "return_text": True}
    assert content_type == "application/json"
    with pytest.raises(cli.CommandError, match="--text"):
        cli.request_body(None, None, "food")
    answer = [
        {"index": 1, "score": 0.9312, "text": "the food was tasty"},
        {"index": 0, "score": 0.01},
    ]
    assert cli.format_answer(answer, ["tea", "the food was tasty"]) == (
        "  1. 0.9312  [1]  the food was tasty\n  2. 0.0100  [0]  tea"
    )


def test_labels_print_as_aligned_rows() -> None:
    answer = [{"label": "positive", "score": 0.91234}, {"label": "neg", "score": 0.0877}]
    assert cli.format_answer(answer) == "positive  0.9123\nneg       0.0877"


def test_one_answer_per_text_prints_under_each_text() -> None:
    answer = [[{"label": "positive", "score": 0.9}], [{"label": "negative", "score": 0.8}]]
    assert cli.format_answer(answer, ["good", "bad"]) == (
        "good\n  positive  0.9000\nbad\n  negative  0.8000"
    )


def test_embeddings_print_dimension_and_first_numbers() -> None:
    vector = [0.5, -0.25, 0.125, 0.0, 1.0, -1.0, 0.75, 0.3]
    text = cli.format_answer([vector, vector[:3]], ["first", "second"])
    assert text.splitlines() == [
        "dim 8  [+0.5000, -0.2500, +0.1250, +0.0000, +1.0000, -1.0000, ...]  first",
        "dim 3  [+0.5000, -0.2500, +0.1250]  second",
    ]


def test_entities_print_as_rows() -> None:
    answer = [
        {"entity_group": "PER", "score": 0.998, "word": "Angela Merkel", "start": 0, "end": 13},
        {"entity_group": "LOC", "score": 0.91, "word": "Paris", "start": 35, "end": 40},
    ]
    assert cli.format_answer(answer).splitlines() == [
        "PER  0.9980   0-13  'Angela Merkel'",
        "LOC  0.9100  35-40  'Paris'",
    ]
    assert cli.format_answer([]) == "(nothing found)"


def test_anything_else_prints_as_json() -> None:
    assert cli.format_answer({"tokens": ["a"], "attributions": [0.5]}) == json.dumps(
        {"tokens": ["a"], "attributions": [0.5]}, indent=2
    )


def test_predict_against_a_running_server_prints_its_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    sent: dict[str, Any] = {}

    def canned_predict(self: TorchServeClient, name: str, data: Any, **kwargs: Any) -> Any:
        sent.update(name=name, data=data, key=self.inference_key, **kwargs)
        return [{"label": "positive", "score": 0.75}, {"label": "negative", "score": 0.25}]

    monkeypatch.setattr(TorchServeClient, "predict", canned_predict)
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "secret"}, "management": {"key": "m"}}))
    argv = ["predict", "sentiment", "--text", "great", "--url", "http://127.0.0.1:9"]

    assert cli.main([*argv, "--key", str(key_file)]) == 0

    assert capsys.readouterr().out == "positive  0.7500\nnegative  0.2500\n"
    assert sent == {
        "name": "sentiment",
        "data": {"inputs": "great"},
        "key": "secret",
        "content_type": "application/json",
    }
    assert cli.main([*argv, "--key", "plain-key"]) == 0
    assert sent["key"] == "plain-key"


def test_predict_prints_the_servers_refusal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def refuse(self: TorchServeClient, name: str, data: Any, **kwargs: Any) -> Any:
        raise TorchServeError(400, "inputs must be a string or a list of strings")

    monkeypatch.setattr(TorchServeClient, "predict", refuse)
    argv = ["predict", "sentiment", "--text", "x", "--url", "http://127.0.0.1:9", "--key", "k"]
    assert cli.main(argv) == 1
    assert "HTTP 400: inputs must be" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "ts-handlers"
    assert script.is_file(), "run: .venv/bin/pip install --no-deps -e ."
