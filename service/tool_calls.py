"""Tool calls: how an adapter writes a call, and turning its text into OpenAI `tool_calls` (the
job of vLLM's tool parsers), for both engines alike since it reads only the generated text.

An adapter's call format is a property of the adapter (recorded in its `loramux.json` and in the
registry): `json`, the demo experts' bare `{"name": ..., "arguments": {...}}` object (or a list of
them for parallel calls); `hermes`, the `<tool_call>{...}</tool_call>` blocks Qwen models write;
`none`, an adapter that never calls tools. The same module renders calls back into text, for a
conversation's history on a chat template that has no tool section (SmolLM2's), and describes the
declared tools in the system turn there: training and serving use the same rendering.

Parsing never raises: text that is not a call of a declared tool stays plain content.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

CallFormat = Literal["json", "hermes", "none"]
CALL_FORMATS: tuple[CallFormat, ...] = ("json", "hermes", "none")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = ""

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_format(value: Any, default: CallFormat = "none") -> CallFormat:
    """A recorded call format, or `default` for anything that is not one (absent, misspelt)."""
    return value if value in CALL_FORMATS else default


def detect_call_format(answers: Iterable[str]) -> CallFormat:
    """The format the calls among these training answers are written in (most of them): `hermes`
    for `<tool_call>` blocks, `json` for bare call objects; `none` when no answer is a call (an
    expert also answers in text, after a tool's result)."""
    hermes = json_calls = 0
    for answer in answers:
        if _hermes_calls(answer) is not None:
            hermes += 1
        elif _json_calls(answer) is not None:
            json_calls += 1
    if not (hermes or json_calls):
        return "none"
    return "hermes" if hermes > json_calls else "json"


def _call(value: Any) -> tuple[str, dict[str, Any]] | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict) or set(value) - {"name", "arguments", "parameters"}:
        return None
    return value["name"], arguments


def _json_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    items = value if isinstance(value, list) and value else [value]
    calls = [_call(item) for item in items]
    return None if any(c is None for c in calls) else calls  # type: ignore[return-value]


def _hermes_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    if HERMES_OPEN not in text:
        return None
    calls = []
    rest = text[text.index(HERMES_OPEN):]
    while rest.strip():
        if not rest.lstrip().startswith(HERMES_OPEN) or HERMES_CLOSE not in rest:
            return None
        body, _, rest = rest.lstrip()[len(HERMES_OPEN):].partition(HERMES_CLOSE)
        try:
            call = _call(json.loads(body.strip()))
        except ValueError:
            return None
        if call is None:
            return None
        calls.append(call)
    return calls or None


def parse_tool_calls(text: str, fmt: CallFormat, declared: Collection[str]) -> tuple[str, list[ToolCall]] | None:
    """The calls in a generated text when it is nothing but calls (hermes: text before the first
    block is kept as content) of tools in `declared`; None otherwise, and the text stays content."""
    if fmt == "json":
        content, found = "", _json_calls(text)
    elif fmt == "hermes" and HERMES_OPEN in text:
        content, found = text[: text.index(HERMES_OPEN)].strip(), _hermes_calls(text)
    else:
        return None
    if not found or any(name not in declared for name, _ in found):
        return None
    return content, [ToolCall(name, json.dumps(args, ensure_ascii=False), f"call_{uuid.uuid4().hex[:24]}")
                     for name, args in found]


def may_become_call(text: str, fmt: CallFormat) -> bool:
    """Whether a generation that so far reads `text` can still turn out to be a call: a stream holds
    such text back instead of sending it as content."""
    head = text.lstrip()
    if fmt == "json":
        return not head or head[0] in "{["
    if fmt == "hermes":
        return HERMES_OPEN in text or any(text.endswith(HERMES_OPEN[:i]) for i in range(1, len(HERMES_OPEN)))
    return False


def format_calls(calls: Sequence[tuple[str, Any]], fmt: CallFormat) -> str:
    """Calls (name, arguments) as an adapter of this format writes them: a conversation's earlier
    assistant calls, on a template with no tool section. Argument keys sorted, as in training."""
    objects = [{"name": name, "arguments": dict(sorted(_arguments(args).items()))} for name, args in calls]
    if fmt == "hermes":
        return "\n".join(f"{HERMES_OPEN}\n{json.dumps(o, ensure_ascii=False)}\n{HERMES_CLOSE}" for o in objects)
    return json.dumps(objects[0] if len(objects) == 1 else objects, ensure_ascii=False)


def _arguments(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def tools_instructions(tools: Sequence[dict[str, Any]], fmt: CallFormat) -> str:
    """The declared tools described in the system turn, for chat templates without a tool section:
    one documented rendering, the same in training and serving."""
    how = ('put each call in <tool_call></tool_call> tags as {"name": <tool>, "arguments": <object>}'
           if fmt == "hermes" else 'reply with only {"name": <tool>, "arguments": <object>}')
    lines = [json.dumps(tool.get("function", tool), ensure_ascii=False, sort_keys=True) for tool in tools]
    return "\n".join([f"Tools you can call; to call one, {how}:", *lines])


def forced_call_grammar(tools: Sequence[dict[str, Any]], allowed: Sequence[str], fmt: CallFormat,
                        parallel: bool) -> str:
    """An EBNF grammar whose every sentence is a call of one of the `allowed` tools with arguments that
    match its JSON schema, written in the adapter's format (`none` writes `json`), so that
    `CallCollector` reads it back as `tool_calls`: `tool_choice` "required" or a named function,
    enforced by structured output, the same grammar on both engines. `json`: the bare call object,
    or with `parallel` also a non-empty list of them; `hermes`: one `<tool_call>` block, or with
    `parallel` one or more. The JSON is compact, as `format_calls` and training write it. Raises
    ValueError when a tool's schema cannot be enforced."""
    from service.engine.grammar import json_schema_ebnf, wrapped_ebnf

    schemas = {tool["function"]["name"]: tool["function"].get("parameters") or {"type": "object"} for tool in tools}
    calls = [{"type": "object", "properties": {"name": {"const": name},
                                               "arguments": {"type": "object", **schemas[name]}},
              "required": ["name", "arguments"]} for name in allowed]
    one: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if fmt == "hermes":
        return wrapped_ebnf(json_schema_ebnf(one), f"{HERMES_OPEN}\n", f"\n{HERMES_CLOSE}", "\n" if parallel else None)
    return json_schema_ebnf({"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]} if parallel else one)


class CallCollector:
    """A generation's text in, the content to send out as it comes, and at the end its calls: the
    one rule for streamed and whole answers. Text that may still become a call is held back (a
    bare-JSON expert's whole answer while it reads as an object; a Qwen answer from `<tool_call>`
    on), and released as content the moment it cannot, or at the end when it is not a call of a
    declared tool."""

    def __init__(self, fmt: CallFormat, declared: Collection[str]):
        self.fmt = fmt
        self.declared = declared
        self.held = ""
        self.released = fmt == "none" or not declared

    def push(self, text: str) -> str:
        """Content that can be sent now."""
        if self.released:
            return text
        self.held += text
        if self.fmt == "hermes":
            if HERMES_OPEN in self.held:
                start = self.held.index(HERMES_OPEN)
            else:  # keep only what could be the start of a tag
                start = next((len(self.held) - i for i in range(len(HERMES_OPEN) - 1, 0, -1)
                              if self.held.endswith(HERMES_OPEN[:i])), len(self.held))
            out, self.held = self.held[:start], self.held[start:]
            return out
        if may_become_call(self.held, self.fmt):
            return ""
        self.released = True
        out, self.held = self.held, ""
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content still held (empty when it was calls) and the calls."""
        held, self.held = self.held, ""
        parsed = parse_tool_calls(held, self.fmt, self.declared) if held else None
        if parsed is None:
            return held, []
        return parsed
