"""Token attributions as coloured text: one self-contained HTML page, no scripts, no links.

An explanation from ``POST /explanations/<model>`` (ts_handlers.sequence_classification) is
``{"label", "score", "tokens", "attributions", "delta"}``, one attribution per token for the
predicted label; a request of several texts gets a list of them. Each token is drawn on a
diverging scale: green where it pushes towards the predicted label, red where it pushes away,
white at zero, full colour at the largest magnitude on the page, so texts on one page compare.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ColorBrewer's RdYlGn ends: colour-blind readers tell them apart by lightness as well.
NEGATIVE_RGB = (215, 48, 39)
POSITIVE_RGB = (26, 150, 65)
NEUTRAL_RGB = (255, 255, 255)
# Above this intensity the background is dark enough that white text reads better.
LIGHT_TEXT_FROM = 0.6
# Tokenizers mark pieces that continue a word (WordPiece) or start one (byte-level BPE,
# SentencePiece); drawn as text, the markers go and the spacing says the same.
CONTINUATION_PREFIX = "##"
WORD_START_PREFIXES = ("Ġ", "▁")
SPECIAL_TOKENS = {"[CLS]", "[SEP]", "[PAD]", "<s>", "</s>", "<pad>", "<cls>", "<sep>"}


@dataclass(frozen=True)
class Explanation:
    label: str
    score: float
    tokens: list[str]
    attributions: list[float]
    delta: float | None = None


def parse_explanations(answer: Any) -> list[Explanation]:
    """The explanation answer (one object or a list of them), checked; ValueError says why."""
    items = answer if isinstance(answer, list) else [answer]
    if not items:
        raise ValueError("the answer holds no explanation")
    explanations = []
    for index, item in enumerate(items):
        where = f"explanation {index}" if isinstance(answer, list) else "the explanation"
        if not isinstance(item, dict) or not {"label", "tokens", "attributions"} <= set(item):
            raise ValueError(
                f"{where} is not {{label, score, tokens, attributions}}: was the request "
                "sent to /explanations of an archive built with captum_explanation?"
            )
        tokens, attributions = item["tokens"], item["attributions"]
        if (
            not isinstance(tokens, list)
            or not isinstance(attributions, list)
            or len(tokens) != len(attributions)
            or not all(isinstance(token, str) for token in tokens)
            or not all(_is_finite_number(value) for value in attributions)
        ):
            raise ValueError(f"{where}: tokens and attributions must be lists of one length")
        delta = item.get("delta")
        explanations.append(
            Explanation(
                label=str(item["label"]),
                score=float(item.get("score", math.nan)),
                tokens=tokens,
                attributions=[float(value) for value in attributions],
                delta=float(delta) if _is_finite_number(delta) else None,
            )
        )
    return explanations


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def attribution_colour(value: float, scale: float) -> tuple[int, int, int]:
    """The background for ``value`` when ``scale`` is the largest magnitude shown."""
    intensity = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    end = POSITIVE_RGB if value > 0 else NEGATIVE_RGB
    red, green, blue = (
        round(neutral + (target - neutral) * intensity)
        for neutral, target in zip(NEUTRAL_RGB, end, strict=True)
    )
    return red, green, blue


def _hex(rgb: Sequence[int]) -> str:
    return "#" + "".join(f"{channel:02x}" for channel in rgb)


def _token_span(token: str, value: float, scale: float) -> str:
    text, joins_previous = token, False
    if token.startswith(CONTINUATION_PREFIX) and len(token) > len(CONTINUATION_PREFIX):
        text, joins_previous = token[len(CONTINUATION_PREFIX) :], True
    elif token.startswith(WORD_START_PREFIXES):
        text = token[1:]
    intensity = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    classes = ["token"]
    if token in SPECIAL_TOKENS:
        classes.append("special")
    if intensity > LIGHT_TEXT_FROM:
        classes.append("strong")
    span = (
        f'<span class="{" ".join(classes)}" '
        f'style="background:{_hex(attribution_colour(value, scale))}" '
        f'title="{html.escape(token)}: {value:+.4f}">{html.escape(text)}</span>'
    )
    # A space between words; none inside a word split into pieces.
    return span if joins_previous else " " + span


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #1a1a1a; max-width: 60rem; }
h1 { font-size: 1.3rem; }
.explanation { margin: 1.5rem 0; padding: 1rem; border: 1px solid #ddd; border-radius: 6px; }
.prediction { margin: 0 0 0.6rem; }
.text { font-size: 1.25rem; line-height: 2.2; }
.token { padding: 0.15rem 0.2rem; border-radius: 3px; }
.token.strong { color: #fff; }
.token.special { font-size: 0.8em; opacity: 0.75; font-family: ui-monospace, monospace; }
.input { color: #555; margin: 0.6rem 0 0; font-size: 0.9rem; }
.legend { display: flex; align-items: center; gap: 0.6rem; font-size: 0.9rem; }
.bar { width: 16rem; height: 0.9rem; border: 1px solid #ccc; border-radius: 3px;
       background: linear-gradient(to right, NEGATIVE, NEUTRAL, POSITIVE); }
table { border-collapse: collapse; font-size: 0.85rem; margin-top: 0.6rem; }
td { padding: 0 0.8rem 0 0; font-family: ui-monospace, monospace; }
"""


def render_html(
    answer: Any, texts: Sequence[str] | None = None, *, title: str = "Token attributions"
) -> str:
    """The page for an explanation answer; ``texts`` (the inputs) are shown under each."""
    explanations = parse_explanations(answer)
    # One scale for the page: the same colour means the same attribution in every text.
    scale = max((abs(v) for e in explanations for v in e.attributions), default=0.0)
    inputs = list(texts) if texts and len(texts) == len(explanations) else []
    style = (
        STYLE.replace("NEGATIVE", _hex(NEGATIVE_RGB))
        .replace("NEUTRAL", _hex(NEUTRAL_RGB))
        .replace("POSITIVE", _hex(POSITIVE_RGB))
    )
    sections = []
    for index, explanation in enumerate(explanations):
        label = html.escape(explanation.label)
        spans = "".join(
            _token_span(token, value, scale)
            for token, value in zip(explanation.tokens, explanation.attributions, strict=True)
        ).strip()
        rows = "".join(
            f"<tr><td>{html.escape(token)}</td><td>{value:+.4f}</td></tr>"
            for token, value in zip(explanation.tokens, explanation.attributions, strict=True)
        )
        delta = (
            f", convergence delta {explanation.delta:.2e}" if explanation.delta is not None else ""
        )
        sections.append(
            '<section class="explanation">'
            f'<p class="prediction">predicted <strong>{label}</strong> '
            f"(score {explanation.score:.4f}{delta})</p>"
            f'<div class="text">{spans}</div>'
            + (f'<p class="input">input: {html.escape(inputs[index])}</p>' if inputs else "")
            + f"<details><summary>values</summary><table>{rows}</table></details>"
            "</section>"
        )
    legend = (
        '<div class="legend">'
        f"<span>against the label (&minus;{scale:.3f})</span>"
        '<span class="bar"></span>'
        f"<span>for the label (+{scale:.3f})</span>"
        "</div>"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{style}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>"
        "<p>Layer integrated gradients for the predicted label: each token's share, scaled "
        "to the largest magnitude on this page.</p>"
        f"{legend}{''.join(sections)}</body></html>\n"
    )


def write_html(
    path: Path, answer: Any, texts: Sequence[str] | None = None, *, title: str | None = None
) -> Path:
    """Writes the page to ``path`` (its folder must exist) and returns the path."""
    page = render_html(answer, texts, title=title or "Token attributions")
    path.write_text(page, encoding="utf-8")
    return path
