"""MNIST-style image classification with Pillow and torch alone.

Accepts image bytes of any size and mode (PNG, JPEG, BMP, ...), a base64 string, or JSON
``{"data": "<base64>", "top_k": 3}``; converts to the configured colour mode, resizes,
normalises, batches, and answers ``[{"label": ..., "score": ...}, ...]`` sorted by score.
KServe v1/v2 bodies carry up to ``max_images_per_request`` base64 images
(docs/kserve-protocols.md).
"""

from __future__ import annotations

import io
import re
import struct
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError
from pydantic import model_validator

from ts_handlers.base import Decoded, TaskHandler, entry_point, top_k_labels
from ts_handlers.config import (
    SETUP_CONFIG_FILE,
    ConfigError,
    FloatTuple,
    HandlerConfig,
    IntTuple,
    OptionInt,
    PositiveInt,
    RequestOptions,
)
from ts_handlers.errors import (
    InvalidInput,
    PayloadTooLarge,
    RequestError,
    UnsupportedMediaType,
    check_count,
)
from ts_handlers.image_bytes import check_scan_work, check_structure
from ts_handlers.payload import Request, decode_base64, reject_unknown_fields
from ts_handlers.protocols import OutputTensor, Parsed, labels_and_scores
from ts_handlers.tasks import InitOption, Task, positive_int

COLOR_MODES = ("L", "RGB")
# The formats the docs promise; Pillow opens nothing else (ICO, ICNS, EPS, JPEG 2000, ... get
# 415 before any decoding: a container's embedded images are never sized by its header).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
# What Pillow raises on hostile or broken input, opened or decoded: all of it is the client's.
PILLOW_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    ZeroDivisionError,
    OverflowError,
)
# The bits per sample a raw mode names: "RGBA;16B" -> 16, "F;32F" -> 32.
_RAW_SAMPLE_BITS = re.compile(r";(\d+)")


class ImageClassificationConfig(HandlerConfig):
    mode: Literal["image_classification"] = "image_classification"
    save_mode: Literal["torchscript", "aot_inductor", "onnx"] = "torchscript"
    export_method: Literal["trace", "script"] = "script"
    color_mode: Literal["L", "RGB"] = "L"
    image_size: IntTuple = (28, 28)  # height, width
    mean: FloatTuple = (0.1307,)
    std: FloatTuple = (0.3081,)
    top_k: PositiveInt = 5
    # Larger images get 413 before they are decoded; Pillow's own bomb guard stays on as well.
    max_image_pixels: PositiveInt = 4096 * 4096
    # Bytes the decoded pixels take, width x height x bands x bytes per sample as the image
    # header states them (a 16-bit RGBA PNG is 8 bytes a pixel); more: 413 before decoding.
    # The default is a 4096 x 4096 RGB image at 8 bits.
    max_image_bytes: PositiveInt = 4096 * 4096 * 3
    # Images in one KServe v1/v2 request (the other request forms carry one); more: 413. A full
    # batch of such requests at the two limits above stays a few times the cost of a batch of
    # single worst images, well inside responseTimeout (docs/kserve-protocols.md).
    max_images_per_request: PositiveInt = 4

    @model_validator(mode="after")
    def _shapes_fit_the_colour_mode(self) -> ImageClassificationConfig:
        channels = len(self.color_mode)
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be [height, width], got {list(self.image_size)}")
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"mean and std need {channels} value(s) for color_mode {self.color_mode!r}, "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if min(self.std) <= 0:
            raise ValueError("std values must be positive")
        return self


class ImageClassificationOptions(RequestOptions):
    top_k: OptionInt | None = None


def decoded_bytes(image: Image.Image) -> int:
    """Bytes the pixels of an opened (not yet decoded) image take: from its header alone.

    Bands and sample size come from Pillow's mode, or from the raw mode the file's data is
    stored in when that names wider samples ("RGBA;16B": 16 bits, so 8 bytes a pixel).
    """
    mode = ImageMode.getmode(image.mode)
    sample = int(mode.typestr[-1]) if mode.typestr[-1].isdigit() else 1
    for tile in getattr(image, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        rawmode = args if isinstance(args, str) else ""
        if isinstance(args, tuple) and args and isinstance(args[0], str):
            rawmode = args[0]
        bits = _RAW_SAMPLE_BITS.search(rawmode)
        if bits:
            sample = max(sample, -(-int(bits.group(1)) // 8))
    width, height = image.size
    return width * height * len(mode.bands) * sample


def open_image(data: bytes, max_pixels: int, max_bytes: int | None = None) -> Image.Image:
    """Decodes image bytes, refusing oversized or broken images with a client error.

    Only :data:`IMAGE_FORMATS` are opened, and only what the header and the bytes claim is
    checked before decoding: the segments and scans of the file (image_bytes.py), the size in
    pixels and in decoded bytes. Only the first frame is ever decoded. Any error Pillow raises
    is a 4xx.
    """
    scans = check_structure(data)
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise UnsupportedMediaType(
            "the body is not an image in a format this model reads; send PNG, JPEG, BMP, GIF, "
            'TIFF or WebP bytes, a base64 string, or JSON {"data": "<base64>"}'
        ) from None
    except Image.DecompressionBombError as error:
        raise PayloadTooLarge(str(error)) from None
    except PILLOW_ERRORS as error:
        raise InvalidInput(f"the image is truncated or corrupt: {_reason(error)}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"the image is {width}x{height} = {width * height} pixels; "
            f"this model accepts at most {max_pixels} ({SETUP_CONFIG_FILE} max_image_pixels)"
        )
    if image.format in ("JPEG", "MPO"):
        check_scan_work(scans, width, height, max_pixels)
    size = decoded_bytes(image)
    if max_bytes is not None and size > max_bytes:
        raise PayloadTooLarge(
            f"the image is {width}x{height} {image.mode} and decodes to {size} bytes; this "
            f"model accepts at most {max_bytes} ({SETUP_CONFIG_FILE} max_image_bytes). Send it "
            "smaller, or with 8 bits per sample"
        )
    try:
        image.load()  # the first frame only: nothing here seeks to another
    except Image.DecompressionBombError as error:
        raise PayloadTooLarge(str(error)) from None
    except PILLOW_ERRORS as error:
        raise InvalidInput(f"the image is truncated or corrupt: {_reason(error)}") from None
    return image


def _reason(error: BaseException) -> str:
    """Pillow's own words, cut short (they may quote the file)."""
    return str(error)[:200] or type(error).__name__


def image_to_tensor(image: Image.Image, config: ImageClassificationConfig) -> torch.Tensor:
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


class ImageClassificationHandler(
    TaskHandler[ImageClassificationConfig, ImageClassificationOptions]
):
    config_class = ImageClassificationConfig
    options_class = ImageClassificationOptions
    kserve_binary = True  # a KServe instance is an image file, base64-encoded
    instance_limit = ("images", "max_images_per_request")

    def with_defaults(self, options: ImageClassificationOptions) -> Any:
        return options.model_copy(update={"top_k": options.top_k or self.config.top_k})

    def load_model(self) -> Any:
        model = super().load_model()
        if not self.export_metadata:
            self.export_metadata = self.derive_metadata(model)
        return model

    def derive_metadata(self, model: Any) -> dict[str, Any]:
        """An archive made by hand (a graph with no ts_handlers.json): the class count from one
        batch, and the build's check that a batch answers what each image answers alone."""
        import logging  # here, not at the top: keeps this addition apart from the decode code

        from ts_handlers.verification import one_at_a_time, verify

        generator = torch.Generator().manual_seed(0)
        height, width = self.config.image_size
        shape = (3, len(self.config.color_mode), height, width)
        images = torch.randn(shape, generator=generator).to(self.device)
        num_classes = _num_classes(model, images)
        report = verify(one_at_a_time(model), model, [(images,)], self.config.verify_atol)
        if not report.passed:
            raise ConfigError(
                "the graph answers a batch of 3 images differently from each image alone: it "
                "cannot be batched (was its batch size baked in by the trace?)\n" + report.summary()
            )
        logging.getLogger(__name__).info(
            "no ts_handlers.json in the archive (made by hand): %d classes", num_classes
        )
        return {"num_classes": num_classes, "load_checks": report.to_dict()}

    def setup(self) -> None:
        if self.labels is None:
            self.labels = [
                str(index) for index in range(self.export_metadata.get("num_classes", 10))
            ]

    def decode(self, request: Request) -> Decoded[ImageClassificationOptions]:
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
            # "image" is another name for "data"
            reject_unknown_fields(payload, ("data", "image", *self.options_class.names()))
            if "data" in payload and "image" in payload:
                raise InvalidInput('send the image as "data" or as "image", not both')
            data = payload.get("data", payload.get("image"))
            if not isinstance(data, str):
                raise InvalidInput('the JSON body needs "data": a base64-encoded image string')
            raw = decode_base64(data, what='"data"')
        elif raw is None or not _is_image_signature(raw):
            raw = self._bytes_or_base64(request, raw)
        options = self.read_options(request, payload)
        return Decoded(inputs=[self.image_tensor(raw)], options=options)

    def decode_instances(
        self, parsed: Parsed, options: ImageClassificationOptions
    ) -> Decoded[ImageClassificationOptions]:
        values, field = parsed.instances, parsed.field
        check_count(
            len(values),
            self.config.max_images_per_request,
            "images",
            f"{SETUP_CONFIG_FILE} max_images_per_request",
        )
        inputs = []
        for index, raw in enumerate(values):
            try:
                inputs.append(self.image_tensor(raw))  # bytes: kserve_binary
            except RequestError as error:  # the same error, naming the instance
                raise type(error)(f"{field}[{index}]: {error.message}") from None
        return Decoded(inputs=inputs, options=options, single=False)

    def image_tensor(self, raw: bytes) -> torch.Tensor:
        image = open_image(raw, self.config.max_image_pixels, self.config.max_image_bytes)
        try:  # EXIF orientation and mode conversion read the file's metadata too
            return image_to_tensor(image, self.config)
        except PILLOW_ERRORS as error:
            raise InvalidInput(f"the image is truncated or corrupt: {_reason(error)}") from None

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

    def encode(
        self, outputs: list[torch.Tensor], decoded: Decoded[ImageClassificationOptions]
    ) -> Any:
        return [top_k_labels(row, self.labels, decoded.options.top_k) for row in outputs]

    def kserve_outputs(
        self, outputs: list[torch.Tensor], decoded: Decoded[ImageClassificationOptions]
    ) -> list[OutputTensor]:
        return labels_and_scores(self.encode(outputs, decoded))


def _is_image_signature(raw: bytes | None) -> bool:
    """True for bytes that start like a common image file, so they are never read as text."""
    if not raw:
        return False
    signatures = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"GIF8", b"II*\x00", b"MM\x00*", b"RIFF")
    return raw.startswith(signatures)


def _num_classes(model: Any, images: torch.Tensor) -> int:
    """Runs the model once; refuses one that does not answer (N, C, H, W) with (N, classes)."""
    shape = "x".join(map(str, images.shape))
    try:
        with torch.inference_mode():
            logits = model(images)
    except Exception as error:
        raise ConfigError(
            f"the model fails on a {shape} (N, C, H, W) batch, the shape color_mode and "
            f"image_size give: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or len(logits) != len(images):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(
            f"the model must map a {shape} batch to ({len(images)}, num_classes) logits; got {got}"
        )
    return int(logits.shape[-1])


handle = entry_point(ImageClassificationHandler)
TASK = Task(
    ImageClassificationConfig,
    ImageClassificationOptions,
    ImageClassificationHandler,
    export="ts_handlers.exporters.image_classification:prepare_export",
    extra="vision",
    init="ts_handlers.exporters.image_classification:init_setup",
    init_takes="a TorchScript .pt file (image classification)",
    init_options=(
        InitOption(
            ("--image-size",),
            {
                "type": positive_int,
                "nargs": 2,
                "default": [28, 28],
                "metavar": ("H", "W"),
                "help": ".pt image models: input height and width",
            },
        ),
        InitOption(
            ("--color-mode",), {"choices": COLOR_MODES, "default": "L", "help": ".pt image models"}
        ),
        InitOption(
            ("--mean",), {"type": float, "nargs": "+", "help": ".pt image models: per channel"}
        ),
        InitOption(
            ("--std",), {"type": float, "nargs": "+", "help": ".pt image models: per channel"}
        ),
    ),
    answer="ts_handlers.exporters.image_classification:format_answer",
)

__all__ = [
    "ImageClassificationConfig",
    "ImageClassificationHandler",
    "handle",
    "image_to_tensor",
]
