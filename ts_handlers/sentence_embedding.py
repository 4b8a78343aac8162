"""Sentence embeddings from a sentence-transformers folder, at parity with ``encode``.

Request (the text-embeddings-inference convention): ``text/plain``, or JSON
``{"inputs": "text" | ["t1", ...], "normalize": bool, "truncate": bool}``. Answer: a JSON list
with one embedding (a list of floats) per input, in order; a single string gets ``[[...]]``, as
text-embeddings-inference answers. ``normalize`` defaults to the model's own ``Normalize``
module; ``truncate`` defaults to true (what ``SentenceTransformer.encode`` does), and
``truncate: false`` refuses an over-long input with 413. ``dimensions`` (Matryoshka; default:
the config's ``truncate_dim``, else all) keeps the first numbers of each vector before
normalising, as ``encode(truncate_dim=...)`` does. OpenAI's embeddings API is answered too
(openai_api.py).

The export reads the folder's ``modules.json`` (Transformer, Pooling, optional Normalize), its
pooling config and its maximum sequence length, and records them in the archive under the names
opensearch-py-ml's model config uses (``embedding_dimension``, ``pooling_mode``,
``normalize_result``; the length is ``max_length``). The traced graph is the transformer +
sentence-transformers' own ``Pooling`` module, loaded from the folder by the library, so every
pooling mode it has (and a combination, concatenated as it does) is served as ``encode`` pools;
sentence-transformers is needed only to export, never to serve. Normalising is left to the
handler so one archive serves both ``normalize`` settings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from ts_handlers.base import Decoded, entry_point
from ts_handlers.config import (
    SETUP_CONFIG_FILE,
    ConfigError,
    OptionBool,
    OptionInt,
    PositiveInt,
    read_json_object,
)
from ts_handlers.errors import InvalidInput
from ts_handlers.export import ExportError, ExportPlan
from ts_handlers.payload import preview
from ts_handlers.protocols import OutputTensor, fp32_tensor
from ts_handlers.tasks import Task
from ts_handlers.text import (
    MAX_FLOAT_CHARS,
    TextConfig,
    TextHandler,
    TextOptions,
    Tokenized,
    TokenizeOptions,
    answer_bytes,
    load_pretrained,
    load_tokenizer,
    output_width,
    text_export_plan,
    tokenizer_files,
)

# sentence-transformers' pooling modes (its Pooling.POOLING_MODES; opensearch-py-ml writes the
# same names in upper case). Spelled out so that serving needs no sentence-transformers; a test
# checks them against the library. Several modes, joined by commas, are concatenated in order.
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers' legacy 1_Pooling/config.json flags -> the mode each one switches on, in
# the order the library concatenates them when several are on.
LEGACY_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
MODULES_FILE = "modules.json"
# The folder's prompts and default prompt name, as sentence-transformers saves them.
ST_CONFIG_FILE = "config_sentence_transformers.json"
# The longest literal "prompt" a request may send, and the longest "prompt_name" (docs/limits.md).
MAX_PROMPT_CHARS = 1024
MAX_PROMPT_NAME_CHARS = 256
SUPPORTED_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
MODULES_ORDER = "Transformer, Pooling, any number of Dense, and optionally Normalize last"
# Keys the export fills in from the folder when setup_config.json leaves them out.
# (pooling_mode is only reported: the pooling is inside the graph, and a user's own TorchScript
# file pools as it pleases.)
RESOLVED_KEYS = ("embedding_dimension", "normalize_result", "max_length")


class SentenceEmbeddingConfig(TextConfig):
    mode: Literal["sentence_embedding"] = "sentence_embedding"
    # The pooled graph is only ever served exported; there is no eager serving path.
    save_mode: Literal["torchscript", "aot_inductor", "onnx"] = "torchscript"
    # None: read from the sentence-transformers folder at export (max_seq_length).
    max_length: Annotated[int, Field(ge=2)] | None = None
    embedding_dimension: PositiveInt | None = None
    # One of POOLING_MODES, or several joined by commas ("mean,max": the vectors concatenated,
    # so twice the dimension). None: the folder's own.
    pooling_mode: str | None = None
    # The default of the per-request "normalize" option: True when the folder ends in Normalize.
    normalize_result: bool | None = None
    # Matryoshka: the default of the per-request "dimensions" (sentence-transformers calls it
    # truncate_dim): keep the first this many dimensions, then normalise. None: all of them.
    truncate_dim: PositiveInt | None = None
    # Instruction prompts by name ("query": "query: "), prepended to a text as
    # sentence-transformers' encode(prompt_name=...) does; None: the folder's
    # config_sentence_transformers.json.
    prompts: dict[str, str] | None = None
    # The prompt applied when a request names none (encode's default_prompt_name).
    default_prompt_name: str | None = None
    # False: the prompt's tokens are left out of the pooling (Pooling's include_prompt, read from
    # the folder; INSTRUCTOR-style models). Traced into the graph.
    include_prompt: bool | None = None

    @model_validator(mode="after")
    def _default_prompt_is_a_prompt(self) -> SentenceEmbeddingConfig:
        name = self.default_prompt_name
        if name is not None and name not in (self.prompts or {}):
            raise ValueError(
                f"default_prompt_name {name!r} is not one of the prompts "
                f"({', '.join(map(repr, self.prompts or {})) or 'none'})"
            )
        return self

    @model_validator(mode="after")
    def _truncate_dim_fits(self) -> SentenceEmbeddingConfig:
        dimension = self.embedding_dimension
        if (
            self.truncate_dim is not None
            and dimension is not None
            and self.truncate_dim > dimension
        ):
            raise ValueError(
                f"truncate_dim ({self.truncate_dim}) is above the model's embedding_dimension "
                f"({dimension})"
            )
        return self

    @field_validator("pooling_mode")
    @classmethod
    def _known_pooling_mode(cls, mode: str | None) -> str | None:
        # opensearch-py-ml writes "MEAN"; accept it so its model configs carry over.
        return None if mode is None else check_pooling_mode(mode)  # its ConfigError is a ValueError

    @property
    def unresolved(self) -> list[str]:
        return [key for key in RESOLVED_KEYS if getattr(self, key) is None]


def check_pooling_mode(mode: Any) -> str:
    """One mode ("mean"), or several ("mean,max", ["mean", "max"]) -> "mean" or "mean,max".

    Any case is accepted ("MEAN" is opensearch-py-ml's spelling). Several modes are kept in
    their order: sentence-transformers concatenates the pooled vectors in that order.
    """
    parts = mode.split(",") if isinstance(mode, str) else mode
    if isinstance(parts, list | tuple) and parts and all(isinstance(p, str) for p in parts):
        names = [part.strip().lower() for part in parts]
        if all(name in POOLING_MODES for name in names):
            return ",".join(names)
    choices = ", ".join(map(repr, POOLING_MODES))
    raise ConfigError(
        f"pooling_mode={mode!r} is not supported; choose one of {choices}, or several joined "
        'by commas ("mean,max"), concatenated in that order as sentence-transformers does'
    )


class SentenceEmbeddingOptions(TextOptions):
    # L2-normalise the embeddings; None: the archive's normalize_result.
    normalize: OptionBool | None = None
    # Matryoshka: keep the first this many dimensions, then normalise (OpenAI's name;
    # encode(truncate_dim=...) in sentence-transformers). None: the archive's truncate_dim.
    dimensions: OptionInt | None = None
    # An instruction prompt prepended to every text: one of the archive's prompts by name, or a
    # literal one (encode(prompt_name=...) / encode(prompt=...)). Neither: default_prompt_name.
    prompt_name: Annotated[str, Field(max_length=MAX_PROMPT_NAME_CHARS)] | None = None
    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = None


class SentenceTokenizeOptions(TokenizeOptions):
    """A tokenize request reads the prompt a prediction would prepend (TEI's prompt_name)."""

    prompt_name: Annotated[str, Field(max_length=MAX_PROMPT_NAME_CHARS)] | None = None
    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = None


class PooledEncoder(nn.Module):
    """Transformer + pooling as one traceable graph: (input_ids, attention_mask) -> (batch, dim).

    ``pooling`` is sentence-transformers' own ``Pooling`` module (see :func:`load_pooling`), so
    the padded positions of a group never leak into an embedding, exactly as in ``encode``. Its
    code traces without baking in the batch size or the sequence length, for every mode. The
    result is not normalised (see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        pooling: nn.Module,
        dense: Sequence[nn.Module] = (),
        *,
        exclude_prompt: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling
        # sentence-transformers' own Dense modules after the pooling (LaBSE, EmbeddingGemma).
        self.dense = nn.ModuleList(dense)
        # Pooling's include_prompt=False: the handler marks a prompt's positions with 2 in the
        # attention mask; the transformer attends to them, the pooling leaves them out (what
        # the library does by zeroing the pooling's mask over the first prompt_length tokens).
        self.exclude_prompt = exclude_prompt

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooling_mask = attention_mask
        if self.exclude_prompt:
            pooling_mask = (attention_mask == 1).to(attention_mask.dtype)
            attention_mask = (attention_mask > 0).to(attention_mask.dtype)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)
        features = {"token_embeddings": outputs[0], "attention_mask": pooling_mask}
        features = self.pooling(features)
        for layer in self.dense:
            features = layer(features)
        return features["sentence_embedding"]


class SentenceEmbeddingHandler(TextHandler[SentenceEmbeddingConfig, SentenceEmbeddingOptions]):
    config_class = SentenceEmbeddingConfig
    options_class = SentenceEmbeddingOptions
    tokenize_options_class = SentenceTokenizeOptions
    openai_embeddings = True

    def setup(self) -> None:
        if self.config.unresolved:
            raise ConfigError(
                f"setup_config.json has no {', '.join(self.config.unresolved)}; build the "
                "archive with `python -m ts_handlers.tools.build`, which resolves them from the "
                "model folder"
            )
        super().setup()

    def with_defaults(self, options: SentenceEmbeddingOptions) -> Any:
        dimension = self.config.embedding_dimension
        if options.dimensions is not None and options.dimensions > dimension:
            raise InvalidInput(
                f"dimensions={options.dimensions} is above this model's {dimension} dimensions "
                f"({SETUP_CONFIG_FILE} embedding_dimension); send at most {dimension}"
            )
        updates: dict[str, Any] = {"prompt": self.resolve_prompt(options)}
        if options.normalize is None:
            updates["normalize"] = self.config.normalize_result
        if options.dimensions is None:
            updates["dimensions"] = self.config.truncate_dim or dimension
        return options.model_copy(update=updates)

    def resolve_prompt(self, options: SentenceEmbeddingOptions) -> str:
        """The prompt text to prepend, as encode() resolves prompt, prompt_name and the default
        (a literal prompt and a name together are ambiguous: 400)."""
        prompts = self.config.prompts or {}
        if options.prompt is not None:
            if options.prompt_name is not None:
                raise InvalidInput("send prompt_name or prompt, not both")
            return options.prompt
        name = options.prompt_name
        if name is None:
            name = self.config.default_prompt_name
            return prompts.get(name, "") if name is not None else ""
        if name not in prompts:
            known = ", ".join(map(repr, prompts)) or "none (send a literal prompt)"
            raise InvalidInput(
                f"prompt_name={preview(name)} is not one of this model's prompts: {known}"
            )
        return prompts[name]

    def tokenize_texts(self, texts: list[str], options: Any) -> list[str]:
        prompt = self.resolve_prompt(options)
        if not prompt:
            return texts
        for index, text in enumerate(texts):
            if not text.strip():
                raise InvalidInput(f"inputs[{index}] is empty or whitespace only")
        return [prompt + text for text in texts]

    def decode_texts(
        self, texts: list[str], options: Any, single: bool, field: str = "inputs"
    ) -> Decoded[SentenceEmbeddingOptions]:
        """The texts with the request's prompt prepended, as encode() prepends it; with
        include_prompt false each text also carries its prompt's length in tokens. Always a
        list of vectors, also for one string: clients index the answer the same way."""
        single = False
        prompt = options.prompt
        if not prompt:
            return super().decode_texts(texts, options, single, field)
        for index, text in enumerate(texts):
            if not text.strip():  # the text itself, not the prompt, must say something
                raise InvalidInput(f"{field}[{index}] is empty or whitespace only")
        decoded = super().decode_texts([prompt + text for text in texts], options, single, field)
        if self.config.include_prompt is False:
            length = self.prompt_length(prompt)
            for item in decoded.inputs:
                item.prompt_length = length
        return decoded

    def prompt_length(self, prompt: str) -> int:
        """The prompt's tokens at the start of a text, as sentence-transformers counts them:
        the prompt tokenized alone, without a trailing special token ([SEP], </s>)."""
        ids = self.tokenizer(prompt, truncation=True, max_length=self.config.max_length)[
            "input_ids"
        ]
        if ids and ids[-1] in self.tokenizer.all_special_ids:
            return len(ids) - 1
        return len(ids)

    def collate(self, items: Sequence[Tokenized]) -> tuple[torch.Tensor, torch.Tensor]:
        """With include_prompt false, a prompt's positions are 2 in the mask: attended to, not
        pooled (see PooledEncoder)."""
        input_ids, attention_mask = super().collate(items)
        for row, item in enumerate(items):
            if item.prompt_length:
                attention_mask[row, : min(item.prompt_length, len(item.input_ids))] = 2
        return input_ids, attention_mask

    def run_model(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask).float()

    def answer_bytes_per_text(self, options: SentenceEmbeddingOptions) -> int:
        """One vector as JSON: each number at most MAX_FLOAT_CHARS, ", " between, brackets."""
        dimension = getattr(options, "dimensions", None) or self.config.embedding_dimension
        return answer_bytes(dimension, MAX_FLOAT_CHARS)

    def encode(
        self, outputs: list[torch.Tensor], decoded: Decoded[SentenceEmbeddingOptions]
    ) -> Any:
        embeddings = torch.stack(outputs)
        # Matryoshka: truncate first, then normalise, as encode(truncate_dim=...) does.
        embeddings = embeddings[:, : decoded.options.dimensions]
        if decoded.options.normalize:
            embeddings = F.normalize(embeddings, p=2, dim=-1)
        # A float32 array: the answer is written at float32's precision (base._answer).
        return embeddings.numpy()

    def kserve_outputs(
        self, outputs: list[torch.Tensor], decoded: Decoded[SentenceEmbeddingOptions]
    ) -> list[OutputTensor]:
        return [fp32_tensor("embeddings", self.encode(outputs, decoded))]  # [texts, dimension]


# ---- export ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SentenceTransformerFolder:
    """What a sentence-transformers folder says about serving it."""

    transformer_dir: Path
    pooling_dir: Path
    # The Dense modules after the pooling, in order.
    dense_dirs: tuple[Path, ...]
    # config_sentence_transformers.json's prompts and default prompt name.
    prompts: dict[str, str]
    default_prompt_name: str | None
    # What the pooling config states: the dimension of the token embeddings it pools (its
    # input). A combination of modes outputs a multiple of it (see load_pooling).
    embedding_dimension: int | None
    pooling_mode: str
    normalize_result: bool
    max_length: int
    max_position_embeddings: int | None
    do_lower_case: bool


def read_sentence_transformer(folder: Path) -> SentenceTransformerFolder:
    """Reads modules.json, the pooling config and the sequence limit, as the library loads them."""
    modules_path = folder / MODULES_FILE
    if not modules_path.is_file():
        raise ConfigError(
            f"model_name {str(folder)!r} is not a sentence-transformers folder: no {MODULES_FILE}"
        )
    modules = json.loads(modules_path.read_text(encoding="utf-8"))
    kinds = [str(module.get("type", "")).rsplit(".", 1)[-1] for module in modules]
    for position, kind in enumerate(kinds):
        if kind not in SUPPORTED_MODULES:
            raise ConfigError(
                f"{modules_path}: module {position} is {modules[position].get('type')!r}; "
                f"the sentence_embedding export supports {', '.join(SUPPORTED_MODULES)}"
            )
    tail = kinds[2:-1] if kinds[-1:] == ["Normalize"] else kinds[2:]
    if kinds[:2] != ["Transformer", "Pooling"] or any(kind != "Dense" for kind in tail):
        raise ConfigError(f"{modules_path}: expected {MODULES_ORDER}, got {', '.join(kinds)}")
    transformer_dir = folder / modules[0].get("path", "")
    pooling_dir = folder / modules[1].get("path", "")
    dense_dirs = tuple(folder / modules[2 + i].get("path", "") for i in range(len(tail)))
    pooling_path = pooling_dir / "config.json"
    pooling = read_json_object(pooling_path) or {}
    model_config = read_json_object(transformer_dir / "config.json") or {}
    st_config = read_json_object(transformer_dir / "sentence_bert_config.json") or {}
    tokenizer_config = read_json_object(transformer_dir / "tokenizer_config.json") or {}
    positions = model_config.get("max_position_embeddings")
    # sentence-transformers < 5 saved max_seq_length here; later versions keep it in the
    # tokenizer's model_max_length, which the library caps at the position embeddings.
    max_length = st_config.get("max_seq_length")
    if max_length is None:
        limits = [tokenizer_config.get("model_max_length"), positions]
        limits = [int(value) for value in limits if isinstance(value, int | float)]
        if not limits:
            raise ConfigError(f"{folder} states no sequence limit; set max_length")
        max_length = min(limits)
    try:
        pooling_mode = _pooling_mode(pooling)
    except ConfigError as error:
        raise ConfigError(f"{pooling_path}: {error}") from None
    return SentenceTransformerFolder(
        transformer_dir=transformer_dir,
        pooling_dir=pooling_dir,
        dense_dirs=dense_dirs,
        embedding_dimension=pooling.get("embedding_dimension")
        or pooling.get("word_embedding_dimension"),
        pooling_mode=pooling_mode,
        normalize_result="Normalize" in kinds[2:],
        max_length=int(max_length),
        max_position_embeddings=positions,
        do_lower_case=bool(st_config.get("do_lower_case", False)),
        **_read_prompts(folder / ST_CONFIG_FILE),
    )


def _read_prompts(path: Path) -> dict[str, Any]:
    """The prompts and default prompt name, as sentence-transformers reads them."""
    saved = read_json_object(path) or {}
    prompts = saved.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(
        isinstance(key, str) and isinstance(value, str | None) for key, value in prompts.items()
    ):
        raise ConfigError(f"{path}: prompts must map names to prompt texts")
    prompts = {key: value for key, value in prompts.items() if value is not None}
    default = saved.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ConfigError(f"{path}: default_prompt_name {default!r} is not one of the prompts")
    return {"prompts": prompts, "default_prompt_name": default}


def _pooling_mode(pooling: dict[str, Any]) -> str:
    """The mode(s) a pooling config switches on, as the library reads them ("max,mean")."""
    mode = pooling.get("pooling_mode")
    if mode is None:  # the legacy boolean flags; none set means mean, the library's default
        active = [name for key, name in LEGACY_POOLING_FLAGS.items() if pooling.get(key)]
        mode = active or ["mean"]
    return check_pooling_mode(mode)


def load_encoder(folder: Path) -> nn.Module:
    return load_pretrained("AutoModel", folder)


def load_pooling(pooling_dir: Path, pooling_mode: str | None = None) -> nn.Module:
    """sentence-transformers' own ``Pooling``, loaded from the folder by the library.

    The library reads the config (legacy boolean flags and renamed keys included); a
    ``pooling_mode`` (setup_config.json's) replaces the folder's mode and keeps its other keys.
    """
    pooling_class = _pooling_class()
    try:
        pooling = pooling_class.load(str(pooling_dir))
        if pooling_mode is not None and check_pooling_mode(pooling.pooling_mode) != pooling_mode:
            modes = tuple(pooling_mode.split(","))
            config = pooling.get_config_dict()
            config["pooling_mode"] = modes[0] if len(modes) == 1 else modes
            pooling = pooling_class(**config)
    except (TypeError, ValueError) as error:  # the library's own refusal of the config
        raise ConfigError(
            f"{pooling_dir / 'config.json'}: sentence-transformers cannot load it: {error}"
        ) from None
    return pooling.eval()


def load_dense(dense_dirs: Sequence[Path], dimension: int) -> list[nn.Module]:
    """sentence-transformers' own ``Dense`` modules, loaded by the library, checked to chain:
    each reads the previous one's output (the pooling's first)."""
    dense_class = _module_class("Dense")
    layers = []
    for path in dense_dirs:
        try:
            layer = dense_class.load(str(path), local_files_only=True)
        except (OSError, TypeError, ValueError) as error:
            raise ConfigError(f"{path}: sentence-transformers cannot load it: {error}") from None
        if layer.module_input_name != "sentence_embedding" or (
            layer.module_output_name != "sentence_embedding"
        ):
            raise ConfigError(
                f"{path}: a Dense module reading or writing {layer.module_input_name!r}/"
                f"{layer.module_output_name!r}; only the sentence embedding itself is served"
            )
        if layer.in_features != dimension:
            raise ConfigError(
                f"{path}: the Dense module reads {layer.in_features} dimensions but the module "
                f"before it outputs {dimension}"
            )
        dimension = int(layer.out_features)
        layers.append(layer.eval())
    return layers


def _describe_dense(layer: nn.Module) -> str:
    activation = type(layer.activation_function).__name__
    return f"{layer.in_features}->{layer.out_features} {activation}"


def pooled_dimension(pooling: nn.Module) -> int:
    """The pooling's output size: the token dimension times the number of modes."""
    return int(pooling.get_embedding_dimension())


def _pooling_class() -> Any:
    """Imported here, not at module level: only the export needs sentence-transformers.

    Version 6 is the first whose Pooling keeps its modes as ``pooling_mode`` (a name or a tuple,
    concatenated in that order); earlier ones only had the boolean flags.
    """
    return _module_class("Pooling")


def _module_class(name: str) -> Any:
    """A sentence-transformers module class (Pooling, Dense), imported where the export needs it."""
    needs = (
        "exporting a sentence_embedding model needs sentence-transformers >= 6 (only to export; "
        "the archive serves without it): pip install 'ts-handlers[export]' or "
        "pip install 'sentence-transformers>=6'"
    )
    try:
        import sentence_transformers
        from sentence_transformers.sentence_transformer import modules
    except ImportError:
        raise ExportError(needs) from None
    version = sentence_transformers.__version__
    if int(version.split(".")[0]) < 6:
        raise ExportError(f"{needs}; found {version}")
    return getattr(modules, name)


def prepare_export(config: SentenceEmbeddingConfig) -> ExportPlan:
    from ts_handlers.tools import user_files

    if user_files.user_model_kind(config):
        return _plan_user_encoder(config)
    folder = read_sentence_transformer(Path(config.model_name))
    model = load_encoder(folder.transformer_dir)
    hidden_size = int(model.config.hidden_size)
    if folder.embedding_dimension not in (None, hidden_size):
        raise ConfigError(
            f"the pooling config says {folder.embedding_dimension} dimensions but the "
            f"transformer outputs {hidden_size}"
        )
    pooling = load_pooling(folder.pooling_dir, config.pooling_mode)
    pooling_mode = check_pooling_mode(pooling.pooling_mode)
    include_prompt = (
        bool(pooling.include_prompt) if config.include_prompt is None else config.include_prompt
    )
    if not include_prompt and "weightedmean" in pooling_mode.split(","):
        # The library weighs the kept tokens by their position counted from the text's start,
        # prompt included; a mask cannot say that, so the served vectors would differ.
        raise ConfigError(
            "include_prompt false with weightedmean pooling is not supported; use another "
            "pooling mode or include_prompt true"
        )
    dense = load_dense(folder.dense_dirs, pooled_dimension(pooling))
    embedding_dimension = int(dense[-1].out_features) if dense else pooled_dimension(pooling)
    if config.embedding_dimension not in (None, embedding_dimension):
        dense_note = f", then {len(dense)} Dense" if dense else ""
        raise ConfigError(
            f"embedding_dimension is {config.embedding_dimension} but the model outputs "
            f"{embedding_dimension} ({pooling_mode} pooling of {hidden_size} dimensions"
            f"{dense_note})"
        )
    max_length = config.max_length or folder.max_length
    if folder.max_position_embeddings and max_length > folder.max_position_embeddings:
        raise ConfigError(
            f"max_length {max_length} exceeds the model's {folder.max_position_embeddings} "
            "position embeddings"
        )
    resolved: dict[str, Any] = {
        "embedding_dimension": embedding_dimension,
        "pooling_mode": pooling_mode,
        "normalize_result": (
            folder.normalize_result if config.normalize_result is None else config.normalize_result
        ),
        "max_length": max_length,
        "do_lower_case": config.do_lower_case or folder.do_lower_case,
        "prompts": folder.prompts if config.prompts is None else config.prompts,
        "default_prompt_name": (
            folder.default_prompt_name
            if config.default_prompt_name is None
            else config.default_prompt_name
        ),
        "include_prompt": include_prompt,
    }
    resolved_config = config.replace(**resolved)
    encoder = PooledEncoder(model, pooling, dense, exclude_prompt=not include_prompt).eval()
    plan = text_export_plan(
        resolved_config,
        encoder,
        load_tokenizer(folder.transformer_dir),
        tokenizer_files(folder.transformer_dir),
        # The Dense modules traced after the pooling, reported as "in->out Activation".
        metadata={**resolved, "dense": [_describe_dense(layer) for layer in dense]},
    )
    if not include_prompt:  # verify the prompt positions' path too
        plan.verify_inputs = [with_prompt_positions(batch) for batch in plan.verify_inputs]
        plan.fixed_shape_inputs = [with_prompt_positions(b) for b in plan.fixed_shape_inputs]
    plan.resolved.update(resolved)
    plan.output_kind = "embedding"
    return plan


def with_prompt_positions(
    batch: tuple[torch.Tensor, ...], length: int = 3
) -> tuple[torch.Tensor, ...]:
    """A verification batch whose odd rows start with a prompt: mask 2 after the first token."""
    input_ids, attention_mask = batch
    attention_mask = attention_mask.clone()
    for row in range(1, len(attention_mask), 2):
        real = int((attention_mask[row] > 0).sum())
        if real > length + 1:  # as the handler marks it: from the first token ([CLS])
            attention_mask[row, :length] = 2
    return input_ids, attention_mask


def _plan_user_encoder(config: SentenceEmbeddingConfig) -> ExportPlan:
    """The user's own graph ``(input_ids, attention_mask) -> (batch, dim)``, pooling included.

    ``model_name`` is the tokenizer folder, or a sentence-transformers folder (its sequence
    limit and Normalize module are then read from it).
    """
    from ts_handlers.tools import user_files

    folder = Path(config.model_name)
    if not config.model_name or not folder.is_dir():
        raise ConfigError(
            "with serialized_file, model_name must name the folder holding the tokenizer "
            f"(or the sentence-transformers folder) the model was trained with; got "
            f"{config.model_name!r}"
        )
    st_folder = read_sentence_transformer(folder) if (folder / MODULES_FILE).is_file() else None
    tokenizer_dir = st_folder.transformer_dir if st_folder else folder
    tokenizer = load_tokenizer(tokenizer_dir)
    max_length = config.max_length or (st_folder.max_length if st_folder else None)
    if max_length is None:
        raise ConfigError(
            f"{folder} states no sequence limit; set max_length (the longest input, in tokens, "
            "the model was traced or trained for)"
        )
    model, exported = user_files.load_user_model(config)
    dimension = output_width(model, tokenizer, max_length)
    if config.embedding_dimension not in (None, dimension):
        raise ConfigError(
            f"embedding_dimension is {config.embedding_dimension} but the model outputs {dimension}"
        )
    normalize = st_folder.normalize_result if st_folder else False
    resolved: dict[str, Any] = {
        "embedding_dimension": dimension,
        "normalize_result": normalize
        if config.normalize_result is None
        else config.normalize_result,
        "max_length": max_length,
        "do_lower_case": config.do_lower_case or bool(st_folder and st_folder.do_lower_case),
    }
    if st_folder is not None:  # the folder's prompts apply to the user's graph too
        resolved["prompts"] = st_folder.prompts if config.prompts is None else config.prompts
        if config.default_prompt_name is None:
            resolved["default_prompt_name"] = st_folder.default_prompt_name
    plan = text_export_plan(
        config.replace(**resolved),
        model,
        tokenizer,
        tokenizer_files(tokenizer_dir),
        metadata=dict(resolved),
        exported=exported,
    )
    plan.resolved.update(resolved)
    return plan


handle = entry_point(SentenceEmbeddingHandler)
TASK = Task(
    SentenceEmbeddingConfig, SentenceEmbeddingOptions, SentenceEmbeddingHandler, prepare_export
)
