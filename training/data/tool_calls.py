"""The experts' answer format: one JSON tool call, `{"name": ..., "arguments": {...}}`.

Training targets are rendered by `format_tool_call` (argument keys sorted, so one call has one
spelling) and evaluation parses the model's text back with `parse_tool_call`, so "exact match"
compares meaning (the parsed objects), not whitespace. `is_valid_tool_call` is the stricter
check behind the valid-tool-call rate: it parses, names a tool the expert knows, and its
arguments are well-formed (for the calendar: ISO-8601 values that are real dates and times).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from datetime import date, datetime, time
from typing import Any

CALENDAR_TOOL = "resolve_time"


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    return json.dumps({"name": name, "arguments": dict(sorted(arguments.items()))}, ensure_ascii=False)


def parse_tool_call(text: str) -> dict[str, Any] | None:
    """The tool call in a model's answer, or None if it is not one JSON object with a string `name`
    and an object `arguments`."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    if not isinstance(value, dict) or set(value) != {"name", "arguments"}:
        return None
    if not isinstance(value["name"], str) or not isinstance(value["arguments"], dict):
        return None
    return value


_YEAR = re.compile(r"^\d{4}$")
_YEAR_MONTH = re.compile(r"^\d{4}-\d{2}$")
_DURATION = re.compile(r"^P(?!$)(\d+Y)?(\d+M)?(\d+W)?(\d+D)?(T(?=\d)(\d+H)?(\d+M)?(\d+S)?)?$")


def is_iso8601(value: Any) -> bool:
    """Year, year-month, date, date-time (minutes) or time of day, each a real calendar value."""
    if not isinstance(value, str):
        return False
    try:
        if _YEAR.match(value):
            return 1 <= int(value) <= 9999
        if _YEAR_MONTH.match(value):
            datetime.strptime(value, "%Y-%m")
            return True
        if "T" in value:
            datetime.fromisoformat(value)
            return True
        if len(value) == 10:
            date.fromisoformat(value)
            return True
        time.fromisoformat(value)
        return True
    except ValueError:
        return False


def is_iso_duration(value: Any) -> bool:
    return isinstance(value, str) and bool(_DURATION.match(value))


def is_valid_tool_call(text: str, tools: Collection[str] | None = None) -> bool:
    """Parses as a tool call naming one of `tools` (any name if None); calendar calls must carry
    ISO-8601 values."""
    call = parse_tool_call(text)
    if call is None or (tools is not None and call["name"] not in tools):
        return False
    if call["name"] == CALENDAR_TOOL:
        return calendar_arguments_valid(call["arguments"])
    return all(isinstance(k, str) for k in call["arguments"])


def calendar_arguments_valid(arguments: dict[str, Any]) -> bool:
    if not arguments:
        return False
    for key, value in arguments.items():
        if key in ("value", "start", "end"):
            if not is_iso8601(value):
                return False
        elif key == "duration":
            if not is_iso_duration(value):
                return False
        elif key == "part_of_day":
            if not isinstance(value, str):
                return False
        else:
            return False
    return True


def same_tool_call(predicted: str, expected: str) -> bool:
    """Exact match of meaning: both parse and are equal as JSON values."""
    got, want = parse_tool_call(predicted), parse_tool_call(expected)
    return got is not None and want is not None and got == want
