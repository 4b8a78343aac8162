"""The archives' TorchScript models run in C++ with LibTorch alone, at parity with Python.

``cpp/model_runner`` (built into build/model_runner/ by ts_handlers.tools.libtorch once, and
reused while up to date) loads the ``model.pt`` of a real archive in
model_store/, reads our metadata from its ``_extra_files`` and runs ``forward`` on inputs
prepared here exactly as the archive's handler prepares them: real digits through the image
handler's decoding and normalisation; real sentences through the archive's own tokenizer,
sorted and padded by the text handler's collate. Python runs the same ``model.pt`` with
``torch.jit.load``; the answers must agree to MAX_ABS_DIFF. docs/without-python.md has the
figures and what a C++ service must do around the model.

No TorchServe is started: only the C++ toolchain (cmake, a C++17 compiler) is needed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from serving import MODEL_STORE, png_bytes, require
from ts.context import Context

from ts_handlers.export import METADATA_FILE
from ts_handlers.image_classification import image_to_tensor, open_image
from ts_handlers.tasks import task_for
from ts_handlers.tools.libtorch import (
    BUILD_DIR,
    SOURCE_DIR,
    RunnerError,
    RunnerResult,
    build_runner,
    run_runner,
    stale_reason,
)

MAX_ABS_DIFF = 1e-5
# How the runner prints a dtype (c10::toString of the scalar type).
CPP_DTYPES = {torch.float32: "Float", torch.int64: "Long"}
logger = logging.getLogger(__name__)

# Varied sentences: a word, ordinary reviews and questions, non-ASCII text, and one far past
# every archive's max_length, which the handler truncates to max_length tokens.
SENTENCES = [
    "Great!",
    "The film was a complete waste of two hours, and the ending made it worse.",
    "I did not expect much, but the staff were friendly and the room was spotless.",
    "Café naïve résumé: 東京 in the spring, with emoji 🙂 and a few numbers, 3.14 and 42.",
    "How do I reset my password?",
    " ".join(
        ["The battery lasts all day and the screen is bright, though the speakers are thin."] * 30
    ),
]


@pytest.fixture(scope="module")
def runner() -> Path:
    """The C++ runner, built once into build/model_runner/ and reused while up to date."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:  # a failure, not a skip: a skipped parity test would pass CI unseen
        pytest.fail(
            f"building the LibTorch runner needs {', '.join(missing)}: apt-get install cmake g++"
        )
    started = time.perf_counter()
    executable = build_runner()
    logger.info("runner ready in %.1f s: %s", time.perf_counter() - started, executable)
    return executable


@dataclass
class Archive:
    """One archive unzipped, its handler initialised, and its model.pt loaded by Python."""

    model_dir: Path
    handler: Any
    module: torch.jit.ScriptModule
    # The metadata string Python reads from model.pt's _extra_files.
    metadata: str

    @property
    def model_pt(self) -> Path:
        return self.model_dir / "model.pt"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Archive]:
    """name -> model_store/<name>.mar unzipped as TorchServe unzips it; loaded once per module."""
    loaded: dict[str, Archive] = {}

    def load(name: str) -> Archive:
        if name not in loaded:
            folder = tmp_path_factory.mktemp(name)
            with zipfile.ZipFile(require(MODEL_STORE / f"{name}.mar")) as mar:
                mar.extractall(folder)
            extra_files = {METADATA_FILE: ""}
            module = torch.jit.load(
                str(folder / "model.pt"), map_location="cpu", _extra_files=extra_files
            )
            metadata = extra_files[METADATA_FILE]
            loaded[name] = Archive(
                model_dir=folder,
                handler=load_handler(folder),
                module=module.eval(),
                metadata=metadata.decode() if isinstance(metadata, bytes) else metadata,
            )
        return loaded[name]

    return load


def load_handler(model_dir: Path) -> Any:
    """The archive's own handler (its setup_config.json mode picks it), initialised as a worker
    initialises it: for its preprocessing, which is what a C++ service must reproduce."""
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text(encoding="utf-8"))
    mode = json.loads((model_dir / "setup_config.json").read_text(encoding="utf-8"))["mode"]
    handler = task_for(mode).handler()
    context = Context(manifest["model"]["modelName"], str(model_dir), manifest, 8, None, "0.12.0")
    handler.initialize(context)
    return handler


def check_parity(
    runner: Path, archive: Archive, inputs: tuple[torch.Tensor, ...], record: Callable[..., None]
) -> tuple[torch.Tensor, RunnerResult]:
    """Runs model.pt in Python and in C++ on the same inputs; returns Python's output."""
    started = time.perf_counter()
    with torch.inference_mode():
        expected = archive.module(*inputs)
    python_ms = (time.perf_counter() - started) * 1000
    result = run_runner(runner, archive.model_pt, inputs)

    # The C++ side read the same metadata: the same bytes, and so the same JSON.
    assert archive.metadata, f"{archive.model_pt} has no {METADATA_FILE}"
    assert result.values("metadata") == [archive.metadata]
    assert result.metadata == json.loads(archive.metadata)
    # It read the inputs with the dtypes and shapes Python wrote (LibTorch's dtype names).
    assert result.values("input") == [
        f"{CPP_DTYPES[tensor.dtype]}{list(tensor.shape)}" for tensor in inputs
    ]

    assert len(result.outputs) == 1
    actual = result.outputs[0]
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    assert bool(torch.isfinite(actual).all())
    diff = (actual.double() - expected.double()).abs().max().item()
    shape = "x".join(map(str, inputs[0].shape))
    record(f"max_abs_diff[{shape}]", diff)
    name = archive.handler.context.model_name
    # Both figures are one first call: TorchScript's profiling executor may add warm-up to it.
    cpp_ms = float(result.values("forward_ms")[0])
    print(
        f"\n{name} input {shape}: max |C++ - Python| = {diff:.3g}; forward "
        f"C++ {cpp_ms:.0f} ms, Python {python_ms:.0f} ms"
    )
    assert diff <= MAX_ABS_DIFF, f"C++ and Python differ by {diff:.3g} on {shape}"
    return expected, result


# ---- the runner itself -----------------------------------------------------------------------


def test_runner_is_reused_while_up_to_date(runner: Path, tmp_path: Path) -> None:
    built = runner.stat().st_mtime_ns
    assert build_runner() == runner
    assert runner.stat().st_mtime_ns == built, "an up-to-date runner was rebuilt"
    assert stale_reason(SOURCE_DIR, BUILD_DIR) is None
    # A source newer than the binary makes it stale (checked on a copy: no rebuild here).
    source = tmp_path / "model_runner"
    shutil.copytree(SOURCE_DIR, source)
    os.utime(source / "main.cpp", ns=(built + 10**9, built + 10**9))
    assert "main.cpp" in (stale_reason(source, BUILD_DIR) or "")


def test_runner_refuses_inputs_the_model_cannot_take(runner: Path, archive) -> None:
    # Integer pixels: the graph needs float; the runner exits 1 with TorchScript's message.
    with pytest.raises(RunnerError, match="exit 1"):
        run_runner(
            runner, archive("mnist").model_pt, (torch.zeros((1, 1, 28, 28), dtype=torch.long),)
        )


# ---- parity on each archive ------------------------------------------------------------------


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits as 8x8 uint8 images, as scripts/train_digits.py reads
    them (ink bright on dark, like MNIST)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.clip(digits.images * 16.0, 0, 255).astype(np.uint8), digits.target


@pytest.mark.parametrize("count", [1, 32])
def test_mnist_runs_in_cpp_at_parity(runner, archive, record_property, count) -> None:
    mnist = archive("mnist")
    images, labels = real_digits()
    picked = np.linspace(0, len(images) - 1, count).astype(int)
    # Each digit goes as the PNG a client sends, through the handler's decoding, resizing and
    # normalisation; the batch is stacked as the handler's forward stacks it.
    config = mnist.handler.config
    pixels = [
        image_to_tensor(
            open_image(png_bytes(images[i]), config.max_image_pixels, config.max_image_bytes),
            config,
        )
        for i in picked
    ]
    batch = torch.stack(pixels)
    assert batch.shape == (count, 1, *config.image_size)
    assert batch.dtype == torch.float32

    expected, result = check_parity(runner, mnist, (batch,), record_property)
    assert expected.shape == (count, result.metadata["num_classes"])
    predicted = result.outputs[0].argmax(dim=1).numpy()
    assert np.array_equal(predicted, expected.argmax(dim=1).numpy())
    if count > 1:  # the digits are real: the C++ answers are right, not only equal
        assert (predicted == labels[picked]).mean() >= 0.9


def tokenized_batch(handler: Any) -> tuple[list[Any], tuple[torch.Tensor, ...]]:
    """SENTENCES tokenized by the archive's tokenizer, then sorted by length and padded as the
    handler's forward sorts and pads one group (its collate pads to the group's longest text,
    or to max_length when the archive says pad_to_max_length). The graph's inputs, in order:
    input_ids, attention_mask, and token_type_ids for a model that reads segment ids (the
    sentiment classifier: zeros for single texts)."""
    items = [handler.tokenize(text, index) for index, text in enumerate(SENTENCES)]
    assert len(items) <= handler.config.inference_batch_size  # one group, as the handler runs it
    group = sorted(items, key=lambda item: len(item.input_ids))
    return items, handler.collate(group)


# The reduced-precision archives too: a bfloat16 graph, and int8 layers on fbgemm's
# quantized::linear_dynamic, which LibTorch carries as Python's torch does.
@pytest.mark.parametrize("name", ["sentiment", "minilm", "minilm_bf16", "minilm_int8"])
def test_text_model_runs_in_cpp_at_parity(runner, archive, record_property, name) -> None:
    text = archive(name)
    config = text.handler.config
    items, tensors = tokenized_batch(text.handler)
    input_ids, attention_mask = tensors[:2]
    lengths = sorted(len(item.input_ids) for item in items)
    assert lengths[0] <= 5 and lengths[-1] == config.max_length, lengths  # short to truncated
    width = config.max_length if config.pad_to_max_length else lengths[-1]
    assert input_ids.shape == attention_mask.shape == (len(SENTENCES), width)
    assert input_ids.dtype == attention_mask.dtype == torch.int64
    assert attention_mask.sum(dim=1).tolist() == lengths

    expected, result = check_parity(runner, text, tensors, record_property)
    metadata = result.metadata
    width = metadata["num_classes"] if name == "sentiment" else metadata["embedding_dimension"]
    assert expected.shape == (len(SENTENCES), width)


@pytest.mark.parametrize("name", ["sentiment", "minilm"])
def test_one_text_alone_runs_in_cpp_at_parity(runner, archive, record_property, name) -> None:
    """No padding at all: one text, as a request of one short text runs."""
    text = archive(name)
    tensors = text.handler.collate([text.handler.tokenize(SENTENCES[2], 0)])
    assert bool(tensors[1].all())  # the attention mask
    check_parity(runner, text, tensors, record_property)
