"""MNIST-style image classification with Pillow and torch alone.

Accepts image bytes of any size and mode (PNG, JPEG, BMP, ...), a base64 string, or JSON
``{"data": "<base64>", "top_k": 3}``; converts to the configured colour mode, resizes,
normalises, batches, and answers ``[{"label": ..., "score": ...}, ...]`` sorted by score.
"""

from __future__ import annotations

import importlib
import io
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ts_handlers.base import Decoded, TaskHandler, entry_point, top_k_labels
from ts_handlers.config import ConfigError, HandlerConfig
from ts_handlers.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from ts_handlers.export import ExportPlan
from ts_handlers.payload import Request, decode_base64, int_option

COLOR_MODES = ("L", "RGB")


@dataclass(frozen=True)
class ImageClassifierConfig(HandlerConfig):
    mode: str = "image_classification"
    export_method: str = "script"
    # Eager architecture the export step rebuilds from model_name ("module:Class").
    model_class: str = "ts_handlers.models:SmallCNN"
    color_mode: str = "L"
    image_size: tuple[int, ...] = (28, 28)  # height, width
    mean: tuple[float, ...] = (0.1307,)
    std: tuple[float, ...] = (0.3081,)
    top_k: int = 5
    # Larger images get 413 before they are decoded; Pillow's own bomb guard stays on as well.
    max_image_pixels: int = 4096 * 4096

    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **HandlerConfig.CHOICES,
        "mode": ("image_classification",),
        "save_mode": ("torchscript",),
        "color_mode": COLOR_MODES,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        channels = len(self.color_mode)
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ConfigError(f"image_size must be [height, width], got {list(self.image_size)}")
        if len(self.mean) != channels or len(self.std) != channels:
            raise ConfigError(
                f"mean and std need {channels} value(s) for color_mode {self.color_mode!r}, "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if min(self.std) <= 0:
            raise ConfigError("std values must be positive")
        if self.top_k < 1 or self.max_image_pixels < 1:
            raise ConfigError("top_k and max_image_pixels must be at least 1")


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decodes image bytes, refusing oversized or broken images with a client error."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnsupportedMediaType(
            "the body is not an image Pillow can read; send PNG, JPEG, BMP, GIF, TIFF or WebP "
            'bytes, a base64 string, or JSON {"data": "<base64>"}'
        ) from None
    except Image.DecompressionBombError as error:
        raise PayloadTooLarge(str(error)) from None
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"the image is {width}x{height} = {width * height} pixels; "
            f"this model accepts at most {max_pixels}"
        )
    try:
        image.load()
    except Image.DecompressionBombError as error:
        raise PayloadTooLarge(str(error)) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InvalidInput(f"the image is truncated or corrupt: {error}") from None
    return image


def image_to_tensor(image: Image.Image, config: ImageClassifierConfig) -> torch.Tensor:
    """Colour conversion, resize and normalisation; the trainer uses this too, so train = serve."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Composite onto black: MNIST-style digits are light strokes on a dark background.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    image = image.convert(config.color_mode)
    height, width = config.image_size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    pixels = pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)
    mean = torch.tensor(config.mean).view(-1, 1, 1)
    std = torch.tensor(config.std).view(-1, 1, 1)
    return (pixels - mean) / std


class ImageClassifierHandler(TaskHandler[ImageClassifierConfig]):
    config_class = ImageClassifierConfig

    def setup(self) -> None:
        if self.labels is None:
            self.labels = [
                str(index) for index in range(self.export_metadata.get("num_classes", 10))
            ]

    def decode(self, request: Request) -> Decoded:
        if request.is_empty:
            raise InvalidInput(
                'the request body is empty; send image bytes, base64, or JSON {"data": "<base64>"}'
            )
        payload = None
        raw = request.raw_bytes()
        if request.looks_like_json() and not _is_image_signature(raw):
            payload = request.json()
            if not isinstance(payload, dict):
                raise InvalidInput(
                    f'expected a JSON object {{"data": "<base64>"}}, got {type(payload).__name__}; '
                    "send one image per request"
                )
            data = payload.get("data", payload.get("image"))
            if not isinstance(data, str):
                raise InvalidInput('the JSON body needs "data": a base64-encoded image string')
            raw = decode_base64(data, what='"data"')
        elif raw is None or not _is_image_signature(raw):
            raw = self._bytes_or_base64(request, raw)
        top_k = int_option("top_k", request.option("top_k", payload), self.config.top_k)
        image = open_image(raw, self.config.max_image_pixels)
        return Decoded(inputs=[image_to_tensor(image, self.config)], options={"top_k": top_k})

    @staticmethod
    def _bytes_or_base64(request: Request, raw: bytes | None) -> bytes:
        """Bytes Pillow may still recognise, else the body read as base64 text."""
        if raw is not None:
            try:
                return decode_base64(raw.decode("ascii"), what="the body")
            except (UnicodeDecodeError, InvalidInput):
                return raw  # let Pillow say whether it is an image
        return decode_base64(request.text(), what="the body")

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        batch = torch.stack(inputs).to(self.device)
        probabilities = torch.softmax(self.model(batch).float(), dim=-1).cpu()
        return list(probabilities)

    def encode(self, outputs: list[torch.Tensor], decoded: Decoded) -> Any:
        return top_k_labels(outputs[0], self.labels, decoded.options["top_k"])


def _is_image_signature(raw: bytes | None) -> bool:
    """True for bytes that start like a common image file, so they are never read as text."""
    if not raw:
        return False
    signatures = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"GIF8", b"II*\x00", b"MM\x00*", b"RIFF")
    return raw.startswith(signatures)


def prepare_export(config: ImageClassifierConfig) -> ExportPlan:
    """Rebuilds the eager model from its checkpoint and plans verification on several batches."""
    module_name, _, class_name = config.model_class.partition(":")
    model_class = getattr(importlib.import_module(module_name), class_name)
    model = model_class.from_checkpoint(config.model_name).eval()
    generator = torch.Generator().manual_seed(0)
    height, width = config.image_size

    def images(count: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(count, len(config.color_mode), height, width, generator=generator),)

    example = images(2)
    with torch.inference_mode():
        num_classes = int(model(*example).shape[-1])
    return ExportPlan(
        model=model,
        example_inputs=example,
        verify_inputs=[images(count) for count in (1, 2, 7, 32)],
        metadata={"num_classes": num_classes},
    )


handle = entry_point(ImageClassifierHandler)

__all__ = [
    "ImageClassifierConfig",
    "ImageClassifierHandler",
    "handle",
    "image_to_tensor",
    "prepare_export",
]
