"""The stacked evaluation's answer scores, checked by hand on small cases (no model)."""

from __future__ import annotations

from training.data.tool_calls import format_tool_call
from training.evaluate.answer_scores import ExpertMetric, score_answer

LIGHTS = ExpertMetric("tool_call", ("HassTurnOn", "HassTurnOff"))
REFERENCE = format_tool_call("HassTurnOn", {"area": "kitchen", "domain": "light"})


def test_a_tool_call_is_right_only_when_valid_with_the_right_tool_and_exact_arguments() -> None:
    reordered = '{"arguments": {"domain": "light", "area": "kitchen"}, "name": "HassTurnOn"}'
    same = score_answer(reordered, REFERENCE, LIGHTS)
    assert same.score == 1.0 and same.exact and same.valid and same.right_tool  # key order is not meaning
    wrong_args = score_answer(format_tool_call("HassTurnOn", {"area": "office", "domain": "light"}), REFERENCE, LIGHTS)
    assert wrong_args.score == 0.0 and wrong_args.valid and wrong_args.right_tool and not wrong_args.exact
    wrong_tool = score_answer(format_tool_call("HassTurnOff", {"area": "kitchen", "domain": "light"}), REFERENCE,
                              LIGHTS)
    assert wrong_tool.score == 0.0 and wrong_tool.valid and not wrong_tool.right_tool
    unknown = score_answer(format_tool_call("resolve_time", {"value": "2024-01-01"}), REFERENCE, LIGHTS)
    assert unknown.score == 0.0 and not unknown.valid  # not one of this expert's tools
    prose = score_answer("Sure, turning on the kitchen lights!", REFERENCE, LIGHTS)
    assert prose.score == 0.0 and prose.valid is False and prose.right_tool is False


def test_a_calendar_call_must_carry_real_dates_even_when_it_equals_the_reference() -> None:
    calendar = ExpertMetric("tool_call", ("resolve_time",))
    bad = format_tool_call("resolve_time", {"value": "2024-02-30"})  # no such day
    score = score_answer(bad, bad, calendar)
    assert score.exact and not score.valid and score.score == 0.0


def test_text_answers_match_after_folding_case_and_whitespace() -> None:
    text = ExpertMetric("exact_match")
    assert score_answer("  Paris\n", "paris", text).score == 1.0
    assert score_answer("Paris, France", "paris", text).score == 0.0
    assert score_answer("Paris", "paris", text).valid is None  # tool-call parts do not apply


def test_the_metric_is_the_recorded_one_else_what_the_expert_or_reference_implies() -> None:
    assert ExpertMetric.of({"metric": "exact_match", "tools": ["HassTurnOn"]}, REFERENCE).metric == "exact_match"
    assert ExpertMetric.of({"tools": ["HassTurnOn"]}, "some text") == ExpertMetric("tool_call", ("HassTurnOn",))
    assert ExpertMetric.of({}, REFERENCE) == ExpertMetric("tool_call")
    assert ExpertMetric.of({"metric": "bleu"}, "some text") == ExpertMetric("exact_match")
