"""Scoring one expert answer against its reference, with the metric of the expert that owns the request.

A stacked evaluation (`training.evaluate.stacked`) scores answers written by whichever expert the router chose,
but always against the reference of the expert the request belongs to, and with that expert's metric:
a calendar request answered by the lights expert is judged as a calendar answer. Two metrics:

- `tool_call` (the demo experts, whose answers are one JSON tool call, `training.data.tool_calls`): right only
  when the answer is a valid call of one of the expert's tools (for the calendar: real ISO-8601 values),
  names the reference's tool and has exactly its arguments. The three parts are kept, so a report can
  say whether an expert fails on the format, the tool or the arguments.
- `exact_match` (text experts): the answer equals the reference once case and whitespace are folded
  (`training.data.chats.normalize_text`, the rule that also decides when two user texts are the same).

The metric comes from the expert's `loramux.json` (`metric`) when it records one; otherwise an expert
with tool names, or a reference that parses as a tool call, is scored as `tool_call`, anything else as
`exact_match`. Scores are 0 or 1, so means are rates and every request is either right or wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from training.data.chats import normalize_text
from training.data.tool_calls import is_valid_tool_call, parse_tool_call, same_tool_call

Metric = Literal["tool_call", "exact_match"]
METRICS: tuple[Metric, ...] = ("tool_call", "exact_match")


@dataclass(frozen=True)
class ExpertMetric:
    """How one expert's answers are judged: the metric and, for tool calls, the tool names it may call
    (empty: any name)."""

    metric: Metric
    tools: tuple[str, ...] = ()

    @classmethod
    def of(cls, metadata: Mapping[str, Any], reference: str) -> ExpertMetric:
        """The metric recorded in the expert's `loramux.json`, else the one its tools or the reference imply."""
        tools = tuple(str(t) for t in metadata.get("tools") or ())
        recorded = metadata.get("metric")
        if recorded in METRICS:
            return cls(recorded, tools)
        if tools or parse_tool_call(reference) is not None:
            return cls("tool_call", tools)
        return cls("exact_match")


@dataclass(frozen=True)
class AnswerScore:
    score: float  # 1.0 right, 0.0 wrong
    exact: bool  # tool_call: same parsed call; exact_match: same folded text
    valid: bool | None = None  # tool_call only: a well-formed call of one of the expert's tools
    right_tool: bool | None = None  # tool_call only: the reference's tool name

    def to_json(self) -> dict[str, Any]:
        return {"score": self.score, "exact": self.exact, "valid": self.valid, "right_tool": self.right_tool}


def score_answer(answer: str, reference: str, metric: ExpertMetric) -> AnswerScore:
    if metric.metric == "exact_match":
        exact = normalize_text(answer) == normalize_text(reference)
        return AnswerScore(float(exact), exact)
    call, wanted = parse_tool_call(answer), parse_tool_call(reference)
    valid = is_valid_tool_call(answer, metric.tools or None)
    right_tool = call is not None and wanted is not None and call["name"] == wanted["name"]
    exact = same_tool_call(answer, reference)
    return AnswerScore(float(valid and exact), exact, valid, right_tool)


def mean(scores: Sequence[AnswerScore]) -> float:
    return sum(s.score for s in scores) / len(scores) if scores else 0.0
