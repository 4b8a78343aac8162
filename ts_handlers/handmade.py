"""Archives made by hand with ``torch-model-archiver``: what the build records, derived at load.

Every graph ``ts-handlers build`` exports carries ``ts_handlers.json``: the class count, which
padding the graph holds under, and the verification figures. A graph a user traced themselves
carries none of it: TorchServe's Hugging Face example traces ``torch.jit.trace(model,
[input_ids])`` on one text padded to ``max_length`` and saves ``traced_model.pt``. So when a
worker loads such a graph this module derives the same facts from the graph and the archive's
files, with the checks the build runs on a user's own TorchScript file:

* which inputs the graph takes: its signature (``input_ids`` alone, ``(input_ids,
  attention_mask)``, or with ``token_type_ids``, which a single text fills with zeros);
* the class count: one text run through it;
* the padding policy: a batch must answer what each of its texts answers alone. Checked first
  at ``max_length`` (texts padded to it), then at other lengths padded per batch; a graph that
  holds only at ``max_length`` gets every text padded to it, as the build would record.
  A graph with no ``attention_mask`` input attends to padding, so it is batched only with
  texts of the same length, unpadded, when it holds at other lengths.

The checks run a fixed, small set of batches (at most 3 texts of at most ``max_length`` tokens
each), and stop after ``LOAD_CHECK_BUDGET_S`` seconds: the batches checked so far decide, and
the safe policy (pad to ``max_length``) is taken for what was not checked.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ts_handlers.config import ConfigError
from ts_handlers.verification import one_at_a_time, verify

logger = logging.getLogger(__name__)

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Seconds the load checks may take; past it, the remaining checks are skipped (see above).
LOAD_CHECK_BUDGET_S = 30.0
# Texts per checked batch, and the shorter lengths checked besides max_length.
CHECK_BATCH = 3
CHECK_LENGTHS = (7, 33)


def graph_inputs(graph: Any) -> tuple[str, ...]:
    """The text inputs a TorchScript graph takes, in its order.

    Names are read from the graph's signature (a traced Hugging Face model keeps the names of
    its ``forward``); a graph whose names are others (``x``, ``input_1``) is read by arity, in
    the order Hugging Face models take them.
    """
    schema = getattr(getattr(graph, "forward", None), "schema", None)
    if schema is None:  # not TorchScript (an AOTInductor package): our own build's two inputs
        return TEXT_INPUTS[:2]
    arguments = [arg for arg in schema.arguments[1:] if not arg.has_default_value()]
    names = tuple(arg.name for arg in arguments)
    if not 1 <= len(names) <= len(TEXT_INPUTS):
        raise ConfigError(
            f"the graph takes {len(names)} inputs ({', '.join(names) or 'none'}); a text model "
            "is served with input_ids, attention_mask and token_type_ids (in that order, the "
            "first one or more): trace it on (input_ids,) or (input_ids, attention_mask)"
        )
    if set(names) <= set(TEXT_INPUTS) and names[0] == "input_ids":
        return names
    return TEXT_INPUTS[: len(names)]


def first_tensor(output: Any) -> torch.Tensor:
    """The logits of whatever the graph returns: a tensor, a tuple (``torchscript=True``
    models return ``(logits,)``) or a dict."""
    if isinstance(output, dict):
        output = output.get("logits", next(iter(output.values()), None))
    if isinstance(output, list | tuple):
        output = output[0] if output else None
    if not isinstance(output, torch.Tensor):
        raise ConfigError(f"the graph returns {type(output).__name__}, not a tensor of logits")
    return output


class TextGraph:
    """A user's text graph, called as the handlers call a model: ``(input_ids,
    attention_mask)`` -> logits. Passes only the inputs the graph takes."""

    def __init__(self, graph: Any, inputs: tuple[str, ...]) -> None:
        self.graph = graph
        self.inputs = inputs

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        given = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:  # a text pair's segment ids; one text: zeros
            given["token_type_ids"] = token_type_ids
        arguments = [given.get(name, torch.zeros_like(input_ids)) for name in self.inputs]
        return first_tensor(self.graph(*arguments))


@dataclass
class Derived:
    """What the build would have recorded, as the load checks found it."""

    inputs: tuple[str, ...]
    num_classes: int
    pad_to_max_length: bool
    # No attention_mask input, and the graph holds at any length: batch texts of one length.
    same_length_batches: bool
    checks: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def metadata(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "num_labels": self.num_classes,
            "inputs": list(self.inputs),
            "pad_to_max_length": self.pad_to_max_length,
            "same_length_batches": self.same_length_batches,
            "load_checks": {**self.checks, "seconds": round(self.seconds, 3)},
        }


def check_inputs(
    tokenizer: Any, max_length: int, with_mask: bool
) -> tuple[list[tuple[torch.Tensor, ...]], list[tuple[torch.Tensor, ...]]]:
    """(batches at max_length, batches at shorter lengths) of CHECK_BATCH random texts."""
    from ts_handlers.text import text_export_inputs

    lengths = tuple(length for length in CHECK_LENGTHS if length < max_length)
    dynamic, fixed = text_export_inputs(tokenizer, max_length, (CHECK_BATCH,), lengths)
    dynamic = [case for case in dynamic if case[0].shape[1] < max_length]
    if not with_mask:  # rows of full length: a graph with no mask would attend to padding
        dynamic = [(ids, torch.ones_like(mask)) for ids, mask in dynamic]
    return fixed, dynamic


def derive_text_graph(
    graph: Any,
    tokenizer: Any,
    max_length: int,
    *,
    pad_to_max_length: bool = False,
    atol: float = 1e-4,
    budget_s: float = LOAD_CHECK_BUDGET_S,
) -> tuple[TextGraph, Derived]:
    """The graph wrapped to take ``(input_ids, attention_mask)``, and what the build would have
    recorded about it; a graph no batch can be trusted with is refused with what to change."""
    from ts_handlers.text import _check_largest_id_runs, one_text_at_a_time, output_width

    started = time.perf_counter()
    inputs = graph_inputs(graph)
    model = TextGraph(graph, inputs)
    try:
        num_classes = output_width(model, tokenizer, max_length)
    except ConfigError as error:
        raise ConfigError(
            f"the graph (inputs {', '.join(inputs)}) cannot answer one text: {error}. Is "
            f"max_length ({max_length}) in setup_config.json the length it was traced at?"
        ) from None
    _check_largest_id_runs(model, tokenizer, max_length)
    with_mask = "attention_mask" in inputs
    fixed, dynamic = check_inputs(tokenizer, max_length, with_mask)
    checks: dict[str, Any] = {"reference": "itself, one text at a time", "atol": atol}
    report = verify(one_at_a_time(model), model, fixed, atol, "one text at a time")
    checks["max_length"] = report.to_dict()
    if not report.passed:
        raise ConfigError(
            f"the graph answers a batch of {CHECK_BATCH} texts padded to max_length "
            f"{max_length} differently from each text alone (largest difference "
            f"{report.max_abs_diff:.3g}): it cannot be batched. Trace it so that the batch size "
            "is not baked in (torch.jit.trace on a batch of 2 or more), or build the archive "
            "with ts-handlers build, which verifies the export against the eager model\n"
            + report.summary()
        )
    holds_any_length = False
    if not pad_to_max_length and dynamic:
        if time.perf_counter() - started > budget_s:
            checks["other_lengths"] = f"skipped: the checks took over {budget_s:.0f} s"
        else:
            report = verify(one_text_at_a_time(model), model, dynamic, atol, "one text at a time")
            checks["other_lengths"] = report.to_dict()
            holds_any_length = report.passed
    derived = Derived(
        inputs=inputs,
        num_classes=num_classes,
        pad_to_max_length=pad_to_max_length or not holds_any_length,
        same_length_batches=holds_any_length and not with_mask,
        checks=checks,
        seconds=time.perf_counter() - started,
    )
    if derived.pad_to_max_length:
        policy = f"every text padded to max_length {max_length}"
        if not with_mask:
            policy += (
                " and the padding attended (the graph takes no attention_mask), as TorchServe's "
                "example handler runs it"
            )
    elif derived.same_length_batches:
        policy = "texts batched with texts of their own length, unpadded (no attention_mask)"
    else:
        policy = "each batch padded to its longest text"
    logger.info(
        "no ts_handlers.json in the archive (made by hand): graph inputs %s, %d classes, %s; "
        "load checks took %.2f s",
        ", ".join(inputs),
        num_classes,
        policy,
        derived.seconds,
    )
    return model, derived
