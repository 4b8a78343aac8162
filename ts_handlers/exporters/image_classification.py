"""The image_classification export: the model the config names (a TorchScript file, a .py
and its state_dict, or a class with ``from_checkpoint``), planned for the build with random
images of the configured shape and, for reduced precision, the calibration images.

Export-time only; a worker never imports this module.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ts_handlers.config import ConfigError
from ts_handlers.errors import InvalidInput, PayloadTooLarge
from ts_handlers.export import ExportPlan
from ts_handlers.exporters import user_files
from ts_handlers.exporters.answers import format_labels, is_label_list
from ts_handlers.image_classification import (
    ImageClassificationConfig,
    _num_classes,
    image_to_tensor,
    open_image,
)
from ts_handlers.tasks import InitSetup


def prepare_export(config: ImageClassificationConfig) -> ExportPlan:
    """Loads the model the config names and plans verification on several batch sizes.

    The model maps ``(N, C, H, W)`` float images (``C`` from ``color_mode``, ``H, W`` from
    ``image_size``, normalised with ``mean``/``std``) to ``(N, num_classes)`` logits.
    """

    kind = user_files.user_model_kind(config)
    model: torch.nn.Module | None = None
    exported = reference = None
    if kind == "torchscript_file":
        exported = user_files.load_torchscript(config.serialized_file)
        reference = user_files.one_at_a_time(exported)
    elif kind == "model_file":
        model = user_files.load_model_file(
            config.model_file, config.model_class, config.serialized_file
        )
    elif ":" in config.model_class and config.model_name:
        module_name, _, class_name = config.model_class.partition(":")
        model = getattr(importlib.import_module(module_name), class_name)
        model = model.from_checkpoint(config.model_name).eval()
    else:
        raise ConfigError(
            "name the model: serialized_file (a TorchScript file), or model_file + model_class "
            "+ serialized_file (a .py and its state_dict), or model_class 'module:Class' with a "
            "from_checkpoint(model_name) class method and model_name"
        )
    generator = torch.Generator().manual_seed(0)
    height, width = config.image_size

    def images(count: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(count, len(config.color_mode), height, width, generator=generator),)

    example = images(2)
    num_classes = _num_classes(exported if model is None else model, example[0])
    plan = ExportPlan(
        model=model,
        exported=exported,
        reference=reference,
        example_inputs=example,
        verify_inputs=[images(count) for count in (1, 2, 7, 32)],
        metadata={"num_classes": num_classes},
        num_classes=num_classes,
        # Reduced precision is gated on the probabilities clients get.
        gate_rows=lambda logits, *inputs: torch.softmax(logits, dim=-1),
    )
    if config.calibration_file:
        plan.calibration_inputs = calibration_images(Path(config.calibration_file), config)
        plan.calibration_source = f"the images of {config.calibration_file}"
    return plan


def calibration_images(
    folder: Path, config: ImageClassificationConfig
) -> list[tuple[torch.Tensor]]:
    """The folder's image files, preprocessed as requests are, in batches of the handler's size."""
    paths = sorted(path for path in folder.iterdir() if path.is_file()) if folder.is_dir() else []
    tensors = []
    for path in paths:
        try:
            image = open_image(path.read_bytes(), config.max_image_pixels, config.max_image_bytes)
        except (InvalidInput, PayloadTooLarge):
            continue  # not an image (a README, say)
        tensors.append(image_to_tensor(image, config))
    if len(tensors) < 3:
        raise ConfigError(
            f"calibration_file {str(folder)!r} must be a folder of image files (a few hundred, "
            f"as varied as the traffic); found {len(tensors)} images"
        )
    size = config.inference_batch_size
    return [(torch.stack(tensors[start : start + size]),) for start in range(0, len(tensors), size)]


# ---- for the tools: how init recognises a model of this task, how predict prints an answer --

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")
# Per-channel statistics written for an image model when none are given: MNIST's for one
# channel, ImageNet's for three; the user's training statistics belong here if they differ.
DEFAULT_MEAN_STD = {
    "L": ([0.1307], [0.3081]),
    "RGB": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}


def init_setup(model_path: Path, relative: str, options: dict[str, Any]) -> InitSetup | None:
    """A TorchScript file: served as images of ``image_size`` in ``color_mode``."""
    if not model_path.is_file() or model_path.suffix not in TORCHSCRIPT_SUFFIXES:
        return None
    color_mode = options.get("color_mode") or "L"
    default_mean, default_std = DEFAULT_MEAN_STD[color_mode]
    setup = {
        "mode": "image_classification",
        "serialized_file": relative,
        "color_mode": color_mode,
        "image_size": list(options.get("image_size") or (28, 28)),
        "mean": list(options.get("mean") or default_mean),
        "std": list(options.get("std") or default_std),
    }
    return setup, None


def format_answer(answer: Any, inputs: Sequence[str] | None) -> str | None:
    return format_labels(answer) if is_label_list(answer) else None
