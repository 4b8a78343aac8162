"""The attribution page ``ts-handlers predict --explain --html`` writes: colours, escaping, form.

integration_tests/test_cli_served.py runs the command on a real explanation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from ts_handlers.tools import cli
from ts_handlers.tools.client import TorchServeClient
from ts_handlers.tools.explanation_html import (
    NEGATIVE_RGB,
    NEUTRAL_RGB,
    POSITIVE_RGB,
    attribution_colour,
    parse_explanations,
    render_html,
    write_html,
)

EXPLANATION = {
    "label": "positive",
    "score": 0.9883,
    "tokens": ["[CLS]", "i", "loved", "this", "film", "[SEP]"],
    "attributions": [0.0, 0.0482, 0.9781, -0.1330, 0.1529, 0.0],
    "delta": 5.96e-08,
}


def spans(page: str) -> list[tuple[str, str, str]]:
    """(background, title, text) of every token span, in order."""
    return re.findall(
        r'<span class="token[^"]*" style="background:(#[0-9a-f]{6})" title="([^"]*)">([^<]*)<',
        page,
    )


def test_colour_follows_the_sign_and_the_magnitude() -> None:
    assert attribution_colour(0.0, 1.0) == NEUTRAL_RGB
    assert attribution_colour(1.0, 1.0) == POSITIVE_RGB
    assert attribution_colour(-1.0, 1.0) == NEGATIVE_RGB
    assert attribution_colour(-3.0, 1.0) == NEGATIVE_RGB  # past the scale: full colour
    half_green, half_red = attribution_colour(0.5, 1.0), attribution_colour(-0.5, 1.0)
    assert half_green[1] > half_green[0] and half_red[0] > half_red[1]  # green vs red
    weak, strong = attribution_colour(0.1, 1.0), attribution_colour(0.8, 1.0)
    # Further from white the larger the magnitude, channel by channel.
    assert all(s <= w <= n for s, w, n in zip(strong, weak, NEUTRAL_RGB, strict=True))
    assert weak != NEUTRAL_RGB and strong != weak
    assert attribution_colour(0.3, 0.0) == NEUTRAL_RGB  # nothing to scale by: no colour


def test_page_colours_every_token_and_names_the_label() -> None:
    page = render_html(EXPLANATION, ["I loved this film"])

    drawn = spans(page)
    assert [text for _, _, text in drawn] == ["[CLS]", "i", "loved", "this", "film", "[SEP]"]
    colours = {text: background for background, _, text in drawn}
    assert colours["loved"] == "#1a9641"  # the largest attribution: full green
    assert colours["[CLS]"] == "#ffffff"
    red, green, _ = (int(colours["this"][i : i + 2], 16) for i in (1, 3, 5))
    assert red > green  # negative: red
    assert 'title="loved: +0.9781"' in page
    assert "predicted <strong>positive</strong> (score 0.9883" in page
    assert "input: I loved this film" in page
    assert 'class="legend"' in page and "&minus;0.978" in page and "+0.978" in page


def test_page_is_self_contained_and_escapes_what_it_shows() -> None:
    hostile = {
        **EXPLANATION,
        "label": "<b>pos</b>",
        "tokens": ["<script>alert(1)</script>", '"quoted"', "&amp", "##s"],
        "attributions": [0.5, -0.5, 0.1, 0.2],
    }
    page = render_html(hostile, ["<img src=x onerror=alert(1)>"], title="a <title>")

    assert "<script" not in page and "<img" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;quoted&quot;" in page and "&amp;amp" in page
    assert "<title>a &lt;title&gt;</title>" in page
    # No asset from anywhere else: no links, sources, imports or scripts.
    plain = render_html(EXPLANATION)
    for outside in ("http://", "https://", "src=", "href=", "@import", "url(", "<script"):
        assert outside not in plain
    assert plain.startswith("<!DOCTYPE html>") and plain.rstrip().endswith("</html>")


def test_word_pieces_join_their_word_and_one_scale_serves_the_page() -> None:
    first = {**EXPLANATION, "tokens": ["[CLS]", "un", "##seen", "[SEP]"]}
    first["attributions"] = [0.0, 0.2, 0.1, 0.0]
    second = {**EXPLANATION, "tokens": ["[CLS]", "ok", "[SEP]"], "attributions": [0, 0.4, 0]}

    page = render_html([first, second])

    assert re.search(r">un</span><span[^>]*>seen</span>", page)  # no space inside the word
    colours = {text: background for background, _, text in spans(page)}
    assert colours["ok"] == "#1a9641"  # 0.4 is the page's largest
    assert colours["un"] != "#1a9641"  # 0.2 of 0.4: half way, though the largest in its text
    assert page.count('class="explanation"') == 2


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ([{"label": "positive", "score": 0.9}], "not {label, score, tokens, attributions}"),
        ({**EXPLANATION, "attributions": [0.1]}, "lists of one length"),
        ({**EXPLANATION, "attributions": ["x"] * 6}, "lists of one length"),
        ([], "no explanation"),
    ],
)
def test_answers_that_are_not_explanations_are_refused(answer: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_explanations(answer)


def test_predict_explain_html_writes_the_page_and_prints_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    asked: dict[str, Any] = {}

    def canned_explain(self: TorchServeClient, name: str, data: Any, **kwargs: Any) -> Any:
        asked.update(name=name, data=data)
        return EXPLANATION

    monkeypatch.setattr(TorchServeClient, "explain", canned_explain)
    out = tmp_path / "explain.html"
    argv = ["predict", "sentiment_eager", "--text", "I loved this film", "--explain"]
    argv += ["--url", "http://127.0.0.1:9", "--key", "k", "--html", str(out)]

    assert cli.main(argv) == 0

    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "positive  0.9883"
    assert printed[3] == "  loved  +0.9781"
    assert printed[-1] == f"wrote {out}"
    assert asked == {"name": "sentiment_eager", "data": {"inputs": "I loved this film"}}
    assert len(spans(out.read_text(encoding="utf-8"))) == 6


def test_html_without_explain_is_an_argument_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["predict", "m", "--text", "x", "--html", str(tmp_path / "x.html")])
    assert exited.value.code == 2


def test_write_html_returns_the_path_it_wrote(tmp_path: Path) -> None:
    path = write_html(tmp_path / "page.html", json.loads(json.dumps(EXPLANATION)))
    assert path.read_text(encoding="utf-8") == render_html(EXPLANATION)
