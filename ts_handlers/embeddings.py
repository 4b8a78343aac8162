"""Sentence embeddings from a sentence-transformers folder, at parity with ``encode``.

Request (the text-embeddings-inference convention): ``text/plain``, or JSON
``{"inputs": "text" | ["t1", ...], "normalize": bool, "truncate": bool}``. Answer: a JSON list
with one embedding (a list of floats) per input, in order; a single string gets ``[[...]]``, as
text-embeddings-inference answers. ``normalize`` defaults to the model's own ``Normalize``
module; ``truncate`` defaults to true (what ``SentenceTransformer.encode`` does), and
``truncate: false`` refuses an over-long input with 413.

The export reads the folder's ``modules.json`` (Transformer, Pooling, optional Normalize), its
pooling config and its maximum sequence length, and records them in the archive under the names
opensearch-py-ml's model config uses (``embedding_dimension``, ``pooling_mode``,
``normalize_result``; the length is ``max_length``). The traced graph is transformer + pooling;
normalising is left to the handler so one archive serves both ``normalize`` settings.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ts_handlers.base import Decoded, entry_point
from ts_handlers.config import ConfigError, HandlerConfig
from ts_handlers.export import ExportPlan
from ts_handlers.payload import bool_option
from ts_handlers.text import (
    TextConfig,
    TextHandler,
    load_tokenizer,
    text_export_plan,
    tokenizer_files,
    use_offline_hub,
)

# The pooling strategies the export and the traced graph implement; the names are
# sentence-transformers' own (opensearch-py-ml writes the same ones in upper case).
POOLING_MODES = ("mean", "cls", "max")
# sentence-transformers' legacy 1_Pooling/config.json flags -> the mode each one switches on.
LEGACY_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
MODULES_FILE = "modules.json"
SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")
# Keys the export fills in from the folder when setup_config.json leaves them out.
RESOLVED_KEYS = ("embedding_dimension", "pooling_mode", "normalize_result", "max_length")


@dataclass(frozen=True)
class SentenceEmbeddingConfig(TextConfig):
    mode: str = "sentence_embedding"
    # None: read from the sentence-transformers folder at export (max_seq_length).
    max_length: int | None = None  # type: ignore[assignment]
    embedding_dimension: int | None = None
    pooling_mode: str | None = None
    # The default of the per-request "normalize" option: True when the folder ends in Normalize.
    normalize_result: bool | None = None

    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **TextConfig.CHOICES,
        "mode": ("sentence_embedding",),
        # The pooled graph is only ever served exported; there is no eager serving path.
        "save_mode": ("torchscript",),
    }

    def __post_init__(self) -> None:
        if self.max_length is None:
            HandlerConfig.__post_init__(self)  # TextConfig's length check needs a number
        else:
            super().__post_init__()
        if self.pooling_mode is not None:
            # opensearch-py-ml writes "MEAN"; accept it so its model configs carry over.
            object.__setattr__(self, "pooling_mode", check_pooling_mode(self.pooling_mode))
        if self.embedding_dimension is not None and self.embedding_dimension < 1:
            raise ConfigError(
                f"embedding_dimension must be positive, got {self.embedding_dimension}"
            )

    @property
    def unresolved(self) -> list[str]:
        return [key for key in RESOLVED_KEYS if getattr(self, key) is None]


def check_pooling_mode(mode: Any) -> str:
    if isinstance(mode, str) and mode.lower() in POOLING_MODES:
        return mode.lower()
    choices = ", ".join(map(repr, POOLING_MODES))
    raise ConfigError(f"pooling_mode={mode!r} is not supported; choose one of {choices}")


class PooledEncoder(nn.Module):
    """Transformer + pooling as one traceable graph: (input_ids, attention_mask) -> (batch, dim).

    The pooling mirrors sentence-transformers' ``Pooling`` so the padded positions of a group
    never leak into an embedding. The result is not normalised (see the module docstring).
    """

    def __init__(self, model: nn.Module, pooling_mode: str) -> None:
        super().__init__()
        self.model = model
        self.pooling_mode = check_pooling_mode(pooling_mode)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)
        return pool(outputs[0], attention_mask, self.pooling_mode)


def pool(tokens: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "cls":
        return tokens[:, 0]  # right padding: the first position is always [CLS]
    mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
    if mode == "max":
        return tokens.masked_fill(mask == 0, float("-inf")).max(dim=1).values
    summed = (tokens * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


class SentenceEmbeddingHandler(TextHandler):
    config_class = SentenceEmbeddingConfig
    request_options = ("normalize", "truncate")

    def setup(self) -> None:
        if self.config.unresolved:
            raise ConfigError(
                f"setup_config.json has no {', '.join(self.config.unresolved)}; build the archive "
                "with `python -m ts_handlers.build`, which resolves them from the model folder"
            )
        super().setup()

    def parse_options(self, raw: dict[str, Any]) -> dict[str, Any]:
        options = super().parse_options(raw)
        options["normalize"] = bool_option(
            "normalize", raw.get("normalize"), self.config.normalize_result
        )
        return options

    def run_model(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask).float()

    def encode(self, outputs: list[torch.Tensor], decoded: Decoded) -> Any:
        embeddings = torch.stack(outputs)
        if decoded.options["normalize"]:
            embeddings = F.normalize(embeddings, p=2, dim=-1)
        # Always a list of vectors, also for one string: clients index the answer the same way.
        return embeddings.tolist()


# ---- export ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SentenceTransformerFolder:
    """What a sentence-transformers folder says about serving it."""

    transformer_dir: Path
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
    if kinds[:2] != ["Transformer", "Pooling"] or "Transformer" in kinds[2:]:
        raise ConfigError(
            f"{modules_path}: expected Transformer, Pooling and optionally Normalize, "
            f"got {', '.join(kinds)}"
        )
    transformer_dir = folder / modules[0].get("path", "")
    pooling_path = folder / modules[1].get("path", "") / "config.json"
    pooling = _read_json(pooling_path)
    model_config = _read_json(transformer_dir / "config.json")
    st_config = _read_json(transformer_dir / "sentence_bert_config.json")
    tokenizer_config = _read_json(transformer_dir / "tokenizer_config.json")
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
        embedding_dimension=pooling.get("embedding_dimension")
        or pooling.get("word_embedding_dimension"),
        pooling_mode=pooling_mode,
        normalize_result="Normalize" in kinds[2:],
        max_length=int(max_length),
        max_position_embeddings=positions,
        do_lower_case=bool(st_config.get("do_lower_case", False)),
    )


def _pooling_mode(pooling: dict[str, Any]) -> str:
    mode = pooling.get("pooling_mode")
    if mode is None:  # the legacy boolean flags; none set means mean, the library's default
        active = [name for key, name in LEGACY_POOLING_FLAGS.items() if pooling.get(key)]
        mode = active if len(active) > 1 else (active or ["mean"])[0]
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    return check_pooling_mode(mode)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_encoder(folder: Path) -> nn.Module:
    use_offline_hub()
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder), local_files_only=True).eval()


def prepare_export(config: SentenceEmbeddingConfig) -> ExportPlan:
    folder = read_sentence_transformer(Path(config.model_name))
    model = load_encoder(folder.transformer_dir)
    hidden_size = int(model.config.hidden_size)
    if folder.embedding_dimension not in (None, hidden_size):
        raise ConfigError(
            f"the pooling config says {folder.embedding_dimension} dimensions but the "
            f"transformer outputs {hidden_size}"
        )
    if config.embedding_dimension not in (None, hidden_size):
        raise ConfigError(
            f"embedding_dimension is {config.embedding_dimension} but the model outputs "
            f"{hidden_size}"
        )
    max_length = config.max_length or folder.max_length
    if folder.max_position_embeddings and max_length > folder.max_position_embeddings:
        raise ConfigError(
            f"max_length {max_length} exceeds the model's {folder.max_position_embeddings} "
            "position embeddings"
        )
    resolved: dict[str, Any] = {
        "embedding_dimension": hidden_size,
        "pooling_mode": config.pooling_mode or folder.pooling_mode,
        "normalize_result": (
            folder.normalize_result if config.normalize_result is None else config.normalize_result
        ),
        "max_length": max_length,
        "do_lower_case": config.do_lower_case or folder.do_lower_case,
    }
    resolved_config = dataclasses.replace(config, **resolved)
    encoder = PooledEncoder(model, resolved["pooling_mode"]).eval()
    plan = text_export_plan(
        resolved_config,
        encoder,
        load_tokenizer(folder.transformer_dir),
        tokenizer_files(folder.transformer_dir),
        metadata=dict(resolved),
    )
    plan.resolved.update(resolved)
    return plan


handle = entry_point(SentenceEmbeddingHandler)
