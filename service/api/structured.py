"""Structured output in the API: the request fields that constrain an answer's text, as OpenAI and
vLLM clients send them, turned into the one `StructuredOutput` both engines take.

- `response_format`: OpenAI's `{"type": "text" | "json_object" | "json_schema", "json_schema":
  {"name", "schema", "strict"}}` (the schema is always enforced, `strict` or not, as on vLLM);
- `structured_outputs`: vLLM's `{"json" | "regex" | "choice" | "grammar" | "json_object"}`;
- the older vLLM extras `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`;
- and, built after routing since it depends on the answering adapter's call format,
  `tool_choice: "required"` or a named function (`forced_tool_call`).

One constraint per request: two of them (say `response_format` and `guided_regex`) are a 400, as is
a constraint that cannot be enforced, naming its field, checked before the request is routed or its
stream starts. Chat and `/v1/completions` both declare these fields (`StructuredFields`) and call
`structured_output`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.engine import grammar
from service.engine.base import SamplingParams, StructuredOutput
from service.errors import BadRequestError
from service.inference import field_named
from service.tool_calls import CallFormat, forced_call_grammar


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str | None = Field(None, max_length=256)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema", description="the JSON schema the answer follows")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(BaseModel):
    """vLLM's `structured_outputs` body field (its `StructuredOutputsParams`): one constraint."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_schema: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="EBNF (xgrammar's syntax)")
    json_object: bool | None = None
    # vLLM's options: honoured only at their defaults (refused otherwise, never silently dropped)
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None


class StructuredFields(BaseModel):
    """The constraint fields a generating endpoint declares (chat, completions)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


def _schema(value: dict[str, Any] | str, param: str) -> str:
    """A JSON schema as its text (property order kept: it is the order the answer writes them in)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise BadRequestError(f"{param}: the JSON schema is not valid JSON", param=param) from None
    if not isinstance(value, dict):
        raise BadRequestError(f"{param}: the JSON schema must be an object", param=param)
    try:
        return json.dumps(value, ensure_ascii=False)
    except (ValueError, RecursionError):
        raise BadRequestError(f"{param}: the JSON schema nests too deeply", param=param) from None


def _from_response_format(value: ResponseFormat) -> StructuredOutput | None:
    if value.type == "text":
        return None
    if value.type == "json_object":
        return StructuredOutput(json_object=True, param="response_format")
    if value.json_schema is None or value.json_schema.json_schema is None:
        raise BadRequestError("response_format: type json_schema needs json_schema.schema", param="response_format")
    return StructuredOutput(json_schema=_schema(value.json_schema.json_schema, "response_format"),
                            param="response_format")


def _from_structured_outputs(value: StructuredOutputsParams) -> StructuredOutput:
    param = "structured_outputs"
    for option, default in (("disable_any_whitespace", False), ("disable_additional_properties", False),
                            ("whitespace_pattern", None), ("structural_tag", None)):
        if getattr(value, option) != default:
            raise BadRequestError(f"{param}.{option} is not supported by this server", param=param)
    given = [name for name in ("json_schema", "regex", "choice", "grammar") if getattr(value, name) is not None]
    given += ["json_object"] if value.json_object else []
    if len(given) != 1:
        raise BadRequestError(f"{param}: give exactly one of json, regex, choice, grammar or json_object",
                              param=param)
    if value.json_schema is not None:
        return StructuredOutput(json_schema=_schema(value.json_schema, param), param=param)
    if value.choice is not None:
        return StructuredOutput(choice=tuple(value.choice), param=param)
    return StructuredOutput(regex=value.regex, grammar=value.grammar, json_object=bool(value.json_object),
                            param=param)


async def structured_output(body: StructuredFields) -> StructuredOutput | None:
    """The request's constraint on its answer (None: free text), checked: a 400 naming the field when
    there are two, or when it cannot be enforced (before routing: nothing is spent on such a request)."""
    found: list[StructuredOutput] = []
    if body.response_format is not None and (made := _from_response_format(body.response_format)) is not None:
        found.append(made)
    if body.structured_outputs is not None:
        found.append(_from_structured_outputs(body.structured_outputs))
    if body.guided_json is not None:
        found.append(StructuredOutput(json_schema=_schema(body.guided_json, "guided_json"), param="guided_json"))
    if body.guided_regex is not None:
        found.append(StructuredOutput(regex=body.guided_regex, param="guided_regex"))
    if body.guided_choice is not None:
        found.append(StructuredOutput(choice=tuple(body.guided_choice), param="guided_choice"))
    if body.guided_grammar is not None:
        found.append(StructuredOutput(grammar=body.guided_grammar, param="guided_grammar"))
    if len(found) > 1:
        raise BadRequestError(f"give one constraint on the output, not {found[0].param} and {found[1].param}",
                              param=found[1].param)
    if not found:
        return None
    with field_named(found[0].param):
        await grammar.check(found[0])
    return found[0]


def constrained(params: SamplingParams, structured: StructuredOutput) -> SamplingParams:
    """`params` with the constraint. Not with `ignore_eos`: a complete answer allows nothing but its
    end, so going on past it has no valid token to take (a 400 naming `ignore_eos`)."""
    if params.ignore_eos:
        raise BadRequestError(f"ignore_eos cannot be combined with a constraint on the output ({structured.param})",
                              param="ignore_eos")
    return replace(params, structured=structured)


async def forced_tool_call(tools: Sequence[dict[str, Any]], allowed: Sequence[str], fmt: CallFormat,
                           parallel: bool) -> StructuredOutput:
    """`tool_choice` "required" (`allowed`: every declared tool) or a named function (that one): a
    grammar of calls in the answering adapter's call format (`json` for an adapter that has none),
    so the answer comes back as `tool_calls`; a 400 naming `tools` when a schema cannot be enforced."""
    with field_named("tools"):
        for tool in tools:  # each schema within the limits before xgrammar converts it
            parameters = tool["function"].get("parameters")
            if parameters is not None:
                grammar.check_limits(StructuredOutput(json_schema=_schema(parameters, "tools"), param="tools"))

    def convert() -> str:
        try:
            return forced_call_grammar(tools, allowed, "json" if fmt == "none" else fmt, parallel)
        except ValueError as exc:
            raise BadRequestError(f"tools: a tool's parameters cannot be enforced ({exc})", param="tools") from None

    with field_named("tools"):
        ebnf = await grammar.bounded(convert, "tools")
        constraint = StructuredOutput(grammar=ebnf, param="tools")
        await grammar.check(constraint)
    return constraint
