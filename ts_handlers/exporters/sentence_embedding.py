"""The sentence_embedding export: a sentence-transformers folder (or the user's own encoder)
as one traced graph of transformer, pooling and Dense layers, with what the folder says.

Export-time only (sentence-transformers is needed here, never to serve); a worker never imports
this module.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ts_handlers.config import ConfigError, read_json_object
from ts_handlers.export import ExportError, ExportPlan
from ts_handlers.exporters import user_files
from ts_handlers.exporters.answers import is_number
from ts_handlers.exporters.text import text_export_plan, tokenizer_files
from ts_handlers.sentence_embedding import (
    SentenceEmbeddingConfig,
    check_pooling_mode,
)
from ts_handlers.tasks import InitSetup
from ts_handlers.text import load_pretrained, load_tokenizer, output_width

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
SUPPORTED_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
MODULES_ORDER = "Transformer, Pooling, any number of Dense, and optionally Normalize last"


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


# ---- for the tools: how init recognises a model of this task, how predict prints an answer --

EMBEDDING_NUMBERS_SHOWN = 6


def init_setup(model_path: Path, relative: str, options: dict[str, Any]) -> InitSetup | None:
    """A sentence-transformers folder (its modules.json): its pooling and length."""
    if not (model_path / MODULES_FILE).is_file():
        return None
    folder = read_sentence_transformer(model_path)
    setup = {
        "mode": "sentence_embedding",
        "model_name": relative,
        "pooling_mode": folder.pooling_mode,
        "max_length": folder.max_length,
    }
    return setup, None


def format_answer(answer: Any, inputs: Sequence[str] | None) -> str | None:
    """Each embedding's dimension and first numbers, beside its text."""
    embeddings = isinstance(answer, list) and bool(answer)
    embeddings = embeddings and all(
        isinstance(row, list) and row and all(map(is_number, row)) for row in answer
    )
    if not embeddings:
        return None
    lines = []
    labels = list(inputs) if inputs and len(inputs) == len(answer) else [""] * len(answer)
    for label, vector in zip(labels, answer, strict=True):
        numbers = ", ".join(f"{value:+.4f}" for value in vector[:EMBEDDING_NUMBERS_SHOWN])
        more = ", ..." if len(vector) > EMBEDDING_NUMBERS_SHOWN else ""
        lines.append(f"dim {len(vector)}  [{numbers}{more}]" + (f"  {label}" if label else ""))
    return "\n".join(lines)
