"""Typed configuration read from ``setup_config.json``, and typed per-request options.

One file drives both the export step and the served handler, so it is parsed in exactly one
place. Each task declares its keys once, as a pydantic model: types, ``Literal`` choices and
constraints (``Field(ge=1)``) are declared on the field, unknown keys are forbidden, and
``mode`` is the discriminator that picks the task. A mistake fails when the model loads (or
when the export starts), with a message that names the key, the value and what is allowed.

Per-request options (``top_k``, ``truncate``, ...) are declared the same way, as a task's
:class:`RequestOptions` model; they arrive as JSON values or as text (form fields, headers), so
that model reads ``"3"`` as 3 and ``"true"`` as true.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

SETUP_CONFIG_FILE = "setup_config.json"

logger = logging.getLogger(__name__)

# Keys of TorchServe's Hugging Face example setup_config.json (examples/Huggingface_Transformers)
# that have no meaning here, and why; accepted and ignored with one logged line, so that
# example's file loads as it is. Any other unknown key still fails.
TORCHSERVE_IGNORED_KEYS = {
    "FasterTransformer": "NVIDIA FasterTransformer swaps in CUDA-only kernels after loading; "
    "the served graph is the one the export verified",
    "BetterTransformer": "optimum's BetterTransformer rewrites the model after loading (and is "
    "retired: transformers uses fused SDPA attention itself); the served graph is the one the "
    "export verified",
    "model_parallel": "the example splits the model over GPUs; a worker here holds the whole "
    "model, so scale with workers (minWorkers/maxWorkers in model-config.yaml)",
}
# Keys that example writes as strings ("num_labels": "2", "max_length": "150"); read as numbers.
TORCHSERVE_NUMBER_KEYS = ("num_labels", "max_length")
_DIGITS = re.compile(r"^\s*\d+\s*$")


class ConfigError(ValueError):
    """A setup_config.json that cannot be used; raised before any request is served."""


def _list_to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# A JSON list, kept as a tuple so configs stay immutable and hashable.
IntTuple = Annotated[tuple[int, ...], BeforeValidator(_list_to_tuple)]
FloatTuple = Annotated[tuple[float, ...], BeforeValidator(_list_to_tuple)]
StrTuple = Annotated[tuple[str, ...], BeforeValidator(_list_to_tuple)]
PositiveInt = Annotated[int, Field(ge=1)]


# The most digits a per-request count may be written with ("3" in a header or a form field);
# a longer string is refused before it is converted (int() of n digits costs O(n^2)).
MAX_OPTION_DIGITS = 10


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):  # lax int parsing would read true as 1
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    if isinstance(value, str) and len(value.strip()) > MAX_OPTION_DIGITS:
        raise PydanticCustomError(
            "int_parsing_size",
            f"Input should be a whole number of at most {MAX_OPTION_DIGITS} digits",
        )
    return value


# A per-request count: "3" from a header or a form field reads as 3, true does not.
OptionInt = Annotated[int, BeforeValidator(_not_a_bool), Field(ge=1, le=2**31 - 1)]

_BOOL_TEXT = {"true": True, "1": True, "false": False, "0": False}


def _bool_or_its_text(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOL_TEXT:
        return _BOOL_TEXT[value.strip().lower()]
    raise PydanticCustomError("bool_type", "Input should be a valid boolean")


# A per-request switch: true/false, or "true"/"false"/"1"/"0" from a header or a form field;
# nothing else ("y", "on", 2) guesses.
OptionBool = Annotated[bool, BeforeValidator(_bool_or_its_text)]


class OnnxRuntimeConfig(BaseModel):
    """How ONNX Runtime runs a ``save_mode: "onnx"`` archive (``setup_config.json`` key
    ``onnxruntime``); the names are those of ``onnxruntime.SessionOptions``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    # ORT's graph optimisations at session creation: "all" adds the layout and fusions
    # (attention, GELU, LayerNorm) that make it fast; "disable" runs the graph as exported.
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    # Threads one operator may use; 0: ONNX Runtime's default (one per physical core). With
    # several workers on one machine, give each its share.
    intra_op_num_threads: Annotated[int, Field(ge=0)] = 0
    # Threads running independent operators at once; 0: ONNX Runtime's default. Used only
    # when execution_mode is "parallel".
    inter_op_num_threads: Annotated[int, Field(ge=0)] = 0
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    # Whether idle intra-op threads spin before sleeping. ONNX Runtime's own default is true;
    # ours is false: spinning threads take the cores TorchServe's frontend and the next request
    # need (as GOMP_SPINCOUNT for torch's OpenMP threads, tools/server.py). MiniLM on 2 shared
    # cores, c=16, short sentences: 72-84 req/s spinning, 137-153 not (docs/performance.md).
    allow_spinning: bool = False


class HandlerConfig(BaseModel):
    """Keys every task understands.

    Names follow TorchServe's own ``setup_config.json`` where they mean the same thing
    (``model_name``, ``mode``, ``save_mode``), so a user's existing file mostly carries over.
    """

    # Strict: "3" is not an integer and "yes" is not a boolean in a file a person wrote.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    mode: str
    # Where the export step finds the eager checkpoint (a folder, or a tokenizer folder).
    model_name: str = ""
    # "torchscript" serves a TorchScript graph (model.pt); "aot_inductor" a torch.export graph
    # compiled by AOTInductor (model.pt2); "onnx" a torch.onnx graph run by ONNX Runtime
    # (model.onnx); "pretrained" serves the eager checkpoint.
    save_mode: Literal["torchscript", "aot_inductor", "onnx", "pretrained"] = "torchscript"
    # How the torchscript graph is produced: "trace" runs example inputs, "script" compiles Python.
    # aot_inductor always captures with torch.export and ignores it.
    export_method: Literal["trace", "script"] = "trace"
    # Folds the weights into the graph: torch.jit.freeze, or Inductor's freezing.
    freeze: bool = True
    # Largest difference between exported and eager outputs that verification accepts.
    verify_atol: float = 1e-4
    # Inputs run through the model in one forward; bounds memory when a request carries many.
    inference_batch_size: PositiveInt = 32
    # The user's own files, named as torch-model-archiver names them (see user_files.py): a
    # TorchScript file, or a state_dict loaded into model_class from the .py model_file.
    serialized_file: str = ""
    model_file: str = ""
    model_class: str = ""
    # Precision of the exported graph (docs/performance.md). "bfloat16" and "float16" convert the
    # weights; quantization "dynamic_int8" quantizes Linear layers to int8. A reduced precision is
    # verified by accuracy gates against the float32 model over calibration_file (text: one input
    # per line; images: a folder of image files), instead of within verify_atol.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantization: Literal["dynamic_int8"] | None = None
    calibration_file: str = ""
    # save_mode "onnx" only: ONNX Runtime's session settings.
    onnxruntime: OnnxRuntimeConfig = OnnxRuntimeConfig()

    @model_validator(mode="after")
    def _onnx_settings_need_onnx(self) -> HandlerConfig:
        if self.onnxruntime != OnnxRuntimeConfig() and self.save_mode != "onnx":
            raise ValueError(
                f"onnxruntime settings apply to save_mode 'onnx'; this config has save_mode "
                f"{self.save_mode!r}: drop onnxruntime, or set save_mode 'onnx'"
            )
        if self.save_mode == "onnx" and self.dtype != "float32":
            raise ValueError(
                f"save_mode 'onnx' serves float32, or int8 with quantization 'dynamic_int8' "
                f"(ONNX Runtime's own); dtype {self.dtype!r} is not supported there: use "
                "save_mode 'torchscript' or 'aot_inductor' for it"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _torchserve_example_keys(cls, raw: Any) -> Any:
        """TorchServe's example file as it is: its numbers-as-text read as numbers, its
        switches that mean nothing here dropped with one logged line saying why."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        for key in TORCHSERVE_NUMBER_KEYS:
            value = raw.get(key)
            if key in cls.model_fields and isinstance(value, str) and _DIGITS.match(value):
                raw[key] = int(value)
        ignored = [key for key in TORCHSERVE_IGNORED_KEYS if key in raw]
        if ignored:
            logger.warning(
                "%s: ignoring TorchServe example key(s) %s",
                SETUP_CONFIG_FILE,
                "; ".join(f"{key} ({TORCHSERVE_IGNORED_KEYS[key]})" for key in ignored),
            )
            for key in ignored:
                del raw[key]
        return raw

    @model_validator(mode="after")
    def _one_reduced_precision(self) -> HandlerConfig:
        if self.quantization and self.dtype != "float32":
            raise ValueError(
                f"quantization {self.quantization!r} runs its int8 layers on float32 inputs; "
                f"leave dtype at 'float32' (got {self.dtype!r}), or drop quantization"
            )
        if (self.quantization or self.dtype != "float32") and self.save_mode == "pretrained":
            raise ValueError(
                "dtype and quantization apply to an exported graph; save_mode 'pretrained' "
                "serves the checkpoint as it is (use save_mode 'torchscript' or 'aot_inductor')"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        # Settings of a runtime the archive does not use stay out of its files and describe.
        unused = set() if self.save_mode == "onnx" else {"onnxruntime"}
        return self.model_dump(mode="json", exclude=unused)

    def replace(self, **changes: Any) -> HandlerConfig:
        """A copy with ``changes``, validated like the file was."""
        return parse_config(type(self), {**self.to_dict(), **changes}, "resolved config")


class RequestOptions(BaseModel):
    """Per-request options of a task; ``None`` means "the archive's default"."""

    # Lax: a form field or a header carries "3" for 3 and "true" for true.
    model_config = ConfigDict(extra="ignore", frozen=True)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(cls.model_fields)


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def parse_config(config_class: type[ConfigT], raw: Mapping[str, Any], source: str) -> ConfigT:
    """Builds ``config_class`` from a JSON mapping, checking every key and type."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    try:
        return config_class.model_validate(dict(raw))
    except ValidationError as error:
        raise ConfigError(
            f"{source}: {validation_message(error, config_class.model_fields)}"
        ) from None


def load_config(config_class: type[ConfigT], path: str | Path) -> ConfigT:
    """Reads and parses a setup_config.json file."""
    return parse_config(config_class, read_config_file(Path(path)), str(path))


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON file holding an object (a model folder's config.json, say); None when there is
    no such file or it holds something else."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def read_config_file(path: Path) -> Any:
    """The JSON of a setup_config.json, or a ConfigError saying why there is none."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing; every archive needs a {SETUP_CONFIG_FILE}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from None


# pydantic's error type -> what the value must be, in the words of a JSON file.
_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "tuple_type": "a list",
    "list_type": "a list",
    "dict_type": "an object",
}


def validation_message(error: ValidationError, fields: Iterable[str]) -> str:
    """One sentence per mistake, each naming the key, the value and what is allowed."""
    errors = error.errors()
    unknown = [str(item["loc"][0]) for item in errors if _unknown_key(item, top_level=True)]
    messages = []
    if unknown:
        messages.append(
            f"unknown key(s) {', '.join(sorted(unknown))}; valid keys are {', '.join(fields)}"
        )
    for item in errors:
        if not _unknown_key(item, top_level=True):
            messages.append(_sentence(item))
    return "; ".join(messages)


def _unknown_key(item: Any, top_level: bool) -> bool:
    return item["type"] == "extra_forbidden" and (len(item["loc"]) == 1) == top_level


# Nested settings objects, by key: their own valid keys are listed when one is unknown.
_NESTED: dict[str, type[BaseModel]] = {"onnxruntime": OnnxRuntimeConfig}


def _sentence(item: Any) -> str:
    key = field_path(item["loc"])
    value, kind, context = item.get("input"), item["type"], item.get("ctx") or {}
    shown = _json(value)
    if kind == "extra_forbidden":  # inside a nested object
        nested = _NESTED.get(str(item["loc"][0]))
        valid = f"; valid keys are {', '.join(nested.model_fields)}" if nested else ""
        return f"unknown key {key}{valid}"
    if kind == "model_type":
        return f"{key} must be an object, got {shown}"
    if kind in _EXPECTED:
        return f"{key} must be {_EXPECTED[kind]}, got {shown}"
    if kind == "literal_error":
        choices = context.get("expected", "").replace(" or ", ", ")
        return f"{key}={value!r} is not supported; choose one of {choices}"
    if kind in ("greater_than_equal", "greater_than"):
        bound = context.get("ge", context.get("gt"))
        word = "at least" if kind == "greater_than_equal" else "more than"
        return f"{key} must be {word} {bound}, got {shown}"
    if kind in ("less_than_equal", "less_than"):
        bound = context.get("le", context.get("lt"))
        word = "at most" if kind == "less_than_equal" else "less than"
        return f"{key} must be {word} {bound}, got {shown}"
    if kind == "missing":
        return f"{key} is required"
    if kind == "value_error":  # a model validator's own sentence
        return str(context.get("error", item["msg"]))
    return f"{key}: {item['msg']}, got {shown}"


def field_path(location: Sequence[Any], root: str = "config") -> str:
    """A pydantic error's location as the file or body spells it: ``inputs[0].shape``;
    ``root`` when the error is about the whole."""
    key = ""
    for part in location:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key or root


def _json(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
