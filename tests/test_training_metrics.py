"""Evaluation numbers on tiny sets, checked against values worked out by hand."""

from __future__ import annotations

import pytest

from training.data.tool_calls import (
    format_tool_call,
    is_iso8601,
    is_iso_duration,
    is_valid_tool_call,
    parse_tool_call,
    same_tool_call,
)
from training.evaluate import metrics as m

# 6 routing decisions over labels a, b, c, one of them not a label at all
GOLD = ["a", "a", "a", "b", "b", "c"]
PRED = ["a", "a", "b", "b", "c", "zzz"]
LABELS = ["a", "b", "c"]


def test_accuracy_and_invalid_rate() -> None:
    assert m.accuracy(GOLD, PRED) == pytest.approx(3 / 6)
    assert m.invalid_rate(PRED, LABELS) == pytest.approx(1 / 6)


def test_per_class_precision_recall_f1() -> None:
    report = m.per_class(GOLD, PRED, LABELS)
    # a: predicted twice, both right; 3 gold -> P 1, R 2/3, F1 = 2*(2/3)/(5/3) = 0.8
    assert report["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    # b: predicted twice (one right), 2 gold (one found) -> P 1/2, R 1/2, F1 1/2
    assert report["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    # c: predicted once, wrongly; its one gold example went to zzz -> all 0
    assert report["c"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert m.macro_f1(report) == pytest.approx((0.8 + 0.5 + 0.0) / 3)


def test_confusion_matrix_with_an_invalid_column() -> None:
    confusion = m.confusion_matrix(GOLD, PRED, LABELS)
    assert confusion["labels"] == ["a", "b", "c"]
    assert confusion["columns"] == ["a", "b", "c", m.INVALID]
    assert confusion["matrix"] == [
        [2, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 0, 0, 1],
    ]


def test_expected_calibration_error_by_hand() -> None:
    confidences = [0.95, 0.95, 0.65, 0.62, 0.35]
    correct = [True, False, True, True, False]
    result = m.expected_calibration_error(confidences, correct, bins=5)
    # bins of width 0.2: (0.2,0.4]: {0.35: wrong}; (0.6,0.8]: {0.65, 0.62: both right}; (0.8,1]: {0.95 x2: 1 of 2}
    # ECE = 1/5*|0-0.35| + 2/5*|1-0.635| + 2/5*|0.5-0.95| = 0.07 + 0.146 + 0.18 = 0.396
    assert result["ece"] == pytest.approx(0.396)
    counts = [b["count"] for b in result["bins"]]
    assert counts == [0, 1, 0, 2, 2]
    assert result["bins"][3]["accuracy"] == 1.0
    assert result["bins"][3]["confidence"] == pytest.approx(0.635)


def test_perfectly_calibrated_and_edges() -> None:
    assert m.expected_calibration_error([1.0, 1.0], [True, True])["ece"] == 0.0
    assert m.expected_calibration_error([0.0], [False], bins=4)["bins"][0]["count"] == 1
    assert m.expected_calibration_error([], [])["ece"] == 0.0


def test_brier_score_by_hand() -> None:
    probabilities = [{"a": 0.8, "b": 0.2}, {"a": 0.4, "b": 0.6}]
    # (0.2^2 + 0.2^2) + (0.4^2 + 0.4^2) = 0.08 + 0.32 -> mean 0.2
    assert m.brier_score(probabilities, ["a", "b"]) == pytest.approx(0.2)


def test_length_mismatch_is_refused() -> None:
    with pytest.raises(ValueError):
        m.accuracy(["a"], [])


def test_tool_call_exact_match_and_validity() -> None:
    expected = format_tool_call("HassTurnOn", {"name": "desk lamp", "area": "office"})
    assert expected == '{"name": "HassTurnOn", "arguments": {"area": "office", "name": "desk lamp"}}'
    reordered = '{"arguments": {"name": "desk lamp", "area": "office"}, "name": "HassTurnOn"}'
    assert same_tool_call(reordered, expected)
    assert not same_tool_call('{"name": "HassTurnOn", "arguments": {"area": "office"}}', expected)
    assert not same_tool_call('{"name": "HassTurnOn", "arguments": {', expected)
    outputs = [expected, reordered, '{"name": "HassTurnOff", "arguments": {}}', "turn on the lamp",
               '{"name": "HassTurnOn"}']
    flags = [is_valid_tool_call(o, ["HassTurnOn"]) for o in outputs]
    assert flags == [True, True, False, False, False]
    assert m.rate(flags) == pytest.approx(2 / 5)
    assert parse_tool_call('["not", "an", "object"]') is None


@pytest.mark.parametrize(
    ("value", "ok"),
    [("2019", True), ("2019-02", True), ("2019-02-28", True), ("2019-02-29", False), ("2019-01-01T19:25", True),
     ("19:25", True), ("25:00", False), ("tomorrow", False), ("2019-13", False), (2019, False)],
)
def test_iso8601(value: object, ok: bool) -> None:
    assert is_iso8601(value) is ok


def test_calendar_tool_calls() -> None:
    assert is_iso_duration("PT30M") and is_iso_duration("P3D")
    assert not is_iso_duration("P") and not is_iso_duration("PT")
    good = '{"name": "resolve_time", "arguments": {"start": "2018-03-11", "end": "2018-03-12T09:00"}}'
    bad_date = '{"name": "resolve_time", "arguments": {"value": "2018-02-30"}}'
    unknown_key = '{"name": "resolve_time", "arguments": {"when": "2018-02-03"}}'
    assert is_valid_tool_call(good, ["resolve_time"])
    assert not is_valid_tool_call(bad_date, ["resolve_time"])
    assert not is_valid_tool_call(unknown_key, ["resolve_time"])
