"""OpenAI tool schemas for an expert, read off its own training answers.

An agent framework declares the tools it offers (`tools` in the request), and an expert trained on
bare `{"name", "arguments"}` calls must answer the same whether that list is there or not. The demo
experts' data comes from intent templates, not from a tool API, so their schemas are derived from
what the answers actually call: one function per tool name, one property per argument any answer
passes, typed by the JSON values seen. A schema derived this way never declares an argument the
expert was not trained to fill, and every reference answer validates against it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from training.data.tool_calls import parse_tool_call

_JSON_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
               (dict, "object"))


def json_type(value: Any) -> str:
    """The JSON schema type of a JSON value (bool before int: in Python a bool is an int)."""
    for kind, name in _JSON_TYPES:
        if isinstance(value, kind):
            return name
    return "null"


def describe(name: str) -> str:
    """A readable description from a tool name: `HassLightSet` -> `Light set`, `resolve_time` -> `Resolve time`."""
    words = re.sub(r"^Hass", "", name).replace("_", " ")
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", words).strip().lower()
    return words[:1].upper() + words[1:] if words else name


def tool_schemas(answers: Iterable[str], descriptions: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """OpenAI `tools` (type function, name, description, parameters) for the calls among `answers`,
    sorted by name; an argument seen with several JSON types (an integer here, a number there) gets
    all of them. Answers that are not a call are skipped."""
    seen: dict[str, dict[str, set[str]]] = {}
    for answer in answers:
        call = parse_tool_call(answer)
        if call is None:
            continue
        properties = seen.setdefault(call["name"], {})
        for key, value in call["arguments"].items():
            properties.setdefault(key, set()).add(json_type(value))
    tools = []
    for name, properties in sorted(seen.items()):
        schema = {key: {"type": sorted(kinds)[0] if len(kinds) == 1 else sorted(kinds)}
                  for key, kinds in sorted(properties.items())}
        description = (descriptions or {}).get(name) or describe(name)
        tools.append({"type": "function", "function": {
            "name": name, "description": description,
            "parameters": {"type": "object", "properties": schema}}})
    return tools
