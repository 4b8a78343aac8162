"""The layers apart: wire protocols are data, admission is pure of any handler.

Protocols parse and wrap without a handler (dependence runs one way: base -> batch ->
protocols); the explanation scheduler and the token budget are driven with numbers alone.
"""

from __future__ import annotations

import math
import subprocess
import sys
from http import HTTPStatus

import pytest

from ts_handlers.admission import Budget, ExplanationScheduler, over_budget
from ts_handlers.errors import InvalidInput, NotFound, PayloadTooLarge
from ts_handlers.openai_api import OpenAIEmbeddings
from ts_handlers.payload import Request
from ts_handlers.protocols import TASK_FORM, Decoded, TaskSpec, TextPair, V1Request, V2Request
from ts_handlers.rerank import Rerank


def test_protocols_load_no_handler_module():
    code = (
        "import sys, ts_handlers.protocols, ts_handlers.openai_api, ts_handlers.rerank; "
        "print(sorted(m for m in sys.modules if m in "
        "('ts_handlers.base', 'ts_handlers.batch', 'ts_handlers.text', "
        "'ts_handlers.sequence_classification', 'ts_handlers.sentence_embedding')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_rerank_body_parses_and_wraps_with_data_alone():
    spec = TaskSpec(num_labels=1, score_activation="sigmoid", max_instances=8)
    body = {"query": "q", "texts": ["a", "b", "c"], "top_n": 2, "return_text": True}
    protocol = Rerank(body)
    parsed = protocol.parse(Request(body), spec)
    assert parsed.instances == [TextPair("q", "a"), TextPair("q", "b"), TextPair("q", "c")]
    assert parsed.options is not None and parsed.options["function_to_apply"] == "none"
    logits = [-1.0, 2.0, 0.5]
    answers = [[{"label": "LABEL_0", "score": logit}] for logit in logits]
    ranking = protocol.wrap(answers, Decoded([], single=False), spec)
    assert [item["index"] for item in ranking] == [1, 2]
    assert ranking[0]["text"] == "b"
    assert ranking[0]["score"] == pytest.approx(1 / (1 + math.exp(-2.0)), abs=1e-6)
    with pytest.raises(PayloadTooLarge):  # counted before any field is validated
        Rerank({"query": "q", "texts": [0] * 9}).parse(Request(b""), spec)
    with pytest.raises(InvalidInput, match="one output"):
        Rerank(body).parse(Request(body), TaskSpec(num_labels=3))


def test_a_v2_body_parses_and_wraps_with_data_alone():
    spec = TaskSpec(model_name="m", model_version="2", option_names=("top_k",))
    body = {
        "id": "r1",
        "parameters": {"top_k": 2},
        "inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}],
    }
    protocol = V2Request(body)
    parsed = protocol.parse(Request(body=body), spec)
    assert parsed.instances == ["a", "b"] and parsed.field == "inputs[0].data"
    assert parsed.options == {"top_k": 2} and parsed.protocol is protocol
    answer = protocol.wrap([], Decoded(inputs=["a", "b"]), spec)
    assert answer == {"model_name": "m", "id": "r1", "model_version": "2", "outputs": []}


def test_a_protocol_counts_instances_against_the_task_limit():
    spec = TaskSpec(max_instances=2, instance_unit="texts", max_instances_key="key_x")
    body = {"instances": ["a", "b", "c"]}
    with pytest.raises(PayloadTooLarge, match=r"3 texts in one request; the limit is 2 \(key_x\)"):
        V1Request(body).parse(Request(body=body), spec)


def test_each_protocol_writes_its_own_error_body():
    status = HTTPStatus.BAD_REQUEST
    assert '"type": "InvalidInput"' in TASK_FORM.error_body(status, "InvalidInput", "x")
    assert V1Request({}).error_body(status, "InvalidInput", "x") == '{"error":"x"}'
    openai = OpenAIEmbeddings().error_body(status, "InvalidInput", "y" * 5000)
    assert '"invalid_request_error"' in openai and len(openai) < 1200


def test_the_task_form_unwraps_one_input():
    assert TASK_FORM.wrap([7], Decoded(inputs=[1], single=True), TaskSpec()) == 7
    assert TASK_FORM.wrap([7], Decoded(inputs=[1], single=False), TaskSpec()) == [7]


def test_openai_needs_a_task_that_embeds_text():
    with pytest.raises(NotFound, match="does not embed text"):
        OpenAIEmbeddings({"input": "a", "model": "m"}).parse(Request(body=None), TaskSpec())


def test_the_token_budget_defers_what_does_not_fit_but_always_runs_the_first():
    deferred, error = over_budget([300, 500, 300, 100], Budget(700, "max_tokens_per_batch"))
    assert deferred == [1]
    assert error.retry_after == 1 and "max_tokens_per_batch" in error.message
    assert over_budget([900], Budget(700, "k"))[0] == []
    assert over_budget([900, 900], None)[0] == []


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_scheduler_gives_predictions_as_much_time_as_explanations_took():
    clock = Clock()
    scheduler = ExplanationScheduler(clock=clock)
    budget = Budget(10, "max_explanation_token_steps")
    first = scheduler.admit([6, 6], budget, predictions=True)
    assert first.run == [0] and first.deferred == [1]
    assert "took its share" in first.error.message
    clock.now += 8  # the explanation ran 8 s
    scheduler.ran(first)
    assert scheduler.predictions_first_until == 116.0
    clock.now += 3
    second = scheduler.admit([6], budget, predictions=True)
    assert second.run == [] and second.error.retry_after == 5
    assert scheduler.admit([6], budget, predictions=False).run == [0]  # nothing to yield to
    clock.now = 117.0
    assert scheduler.admit([6], budget, predictions=True).run == [0]
