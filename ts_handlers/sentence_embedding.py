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

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from ts_handlers.base import Decoded, entry_point
from ts_handlers.config import (
    SETUP_CONFIG_FILE,
    ConfigError,
    OptionBool,
    OptionInt,
    PositiveInt,
)
from ts_handlers.errors import InvalidInput
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
)

# sentence-transformers' pooling modes (its Pooling.POOLING_MODES; opensearch-py-ml writes the
# same names in upper case). Spelled out so that serving needs no sentence-transformers; a test
# checks them against the library. Several modes, joined by commas, are concatenated in order.
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# The longest literal "prompt" a request may send, and the longest "prompt_name" (docs/limits.md).
MAX_PROMPT_CHARS = 1024
MAX_PROMPT_NAME_CHARS = 256
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
        pooled (see exporters.sentence_embedding.PooledEncoder)."""
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


handle = entry_point(SentenceEmbeddingHandler)
TASK = Task(
    SentenceEmbeddingConfig,
    SentenceEmbeddingOptions,
    SentenceEmbeddingHandler,
    export="ts_handlers.exporters.sentence_embedding:prepare_export",
    extra="text",
    init="ts_handlers.exporters.sentence_embedding:init_setup",
    init_takes="a sentence-transformers folder (modules.json)",
    answer="ts_handlers.exporters.sentence_embedding:format_answer",
)
