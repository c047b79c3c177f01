"""Structured output (issue 15): `response_format`, vLLM's `structured_outputs` and `guided_*` extras,
and `tool_choice` "required" or a named function, through the official `openai` client on a real
server with the real base model (SmolLM2, which left to itself answers these questions in prose).
A constrained answer follows its constraint; an unconstrained request decoding beside it is
untouched; a constraint that cannot be enforced is a 400 naming its field. `test_vllm_engine.py`
re-runs the server tests on the vLLM engine. The grammars of forced calls are checked on their own
first, with xgrammar's matcher and the real tokenizer."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest

from service.tool_calls import CallCollector, forced_call_grammar
from tests.support import OTHER_TOOL, WEATHER_TOOL

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "What's the weather in Paris today?"}]
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "temperature": {"type": "integer"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "sunny": {"type": "boolean"},
    },
    "required": ["city", "temperature", "unit", "sunny"],
    "additionalProperties": False,
}


# ---- the grammar of a forced call, without a model ----------------------------------------------
def _accepts(ebnf: str, text: str) -> bool:
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from tests.conftest import CACHE_DIR

    tokenizer = AutoTokenizer.from_pretrained(CACHE_DIR / "models" / "smollm2-135m-instruct")
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, stop_token_ids=[tokenizer.eos_token_id])
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_grammar(ebnf))
    return matcher.accept_string(text) and matcher.is_completed()


CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TIME = '{"name": "get_time", "arguments": {}}'


@pytest.mark.parametrize(("fmt", "parallel", "text", "ok"), [
    ("json", False, CALL, True),
    ("json", False, TIME, True),
    ("json", False, f"[{CALL}]", False),  # a list only when parallel calls are allowed
    ("json", True, f"[{CALL}, {TIME}]", True),
    ("json", False, '{"name": "get_weather", "arguments": {"town": "Paris"}}', False),  # not its schema
    ("json", False, '{"name": "get_weather", "arguments": {}}', False),  # city is required
    ("json", False, '{"name": "get_weather"}', False),
    ("json", False, "It is sunny.", False),
    ("hermes", False, f"<tool_call>\n{CALL}\n</tool_call>", True),
    ("hermes", False, CALL, False),
    ("hermes", False, f"<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>", False),
    ("hermes", True, f"<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>", True),
])
def test_a_forced_call_grammar_allows_calls_of_the_tools_only(fmt: Any, parallel: bool, text: str, ok: bool) -> None:
    grammar = forced_call_grammar([WEATHER_TOOL, OTHER_TOOL], ["get_weather", "get_time"], fmt, parallel)
    assert _accepts(grammar, text) is ok
    if ok:  # and what it allows is what the collector reads as calls
        collector = CallCollector(fmt, {"get_weather", "get_time"})
        assert collector.push(text) == ""
        held, calls = collector.finish()
        assert held == "" and calls and {c.name for c in calls} <= {"get_weather", "get_time"}


def test_a_named_function_allows_that_function_only() -> None:
    grammar = forced_call_grammar([WEATHER_TOOL, OTHER_TOOL], ["get_time"], "json", False)
    assert _accepts(grammar, TIME) and not _accepts(grammar, CALL)


# ---- a real server, the base model, the official client ----------------------------------------
@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 64)
    kwargs.setdefault("model", BASE)
    return client.chat.completions.create(messages=kwargs.pop("messages", ASK), temperature=0, **kwargs)


def test_json_schema_answers_validate(client: openai.OpenAI) -> None:
    """The bare model answers the question in prose; with a strict json_schema its answer is an object
    that validates against the schema, whole and streamed alike."""
    assert not _ask(client, max_tokens=16).choices[0].message.content.lstrip().startswith("{")
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA, "strict": True}}
    choice = _ask(client, response_format=response_format).choices[0]
    assert choice.finish_reason == "stop"
    answer = json.loads(choice.message.content)
    jsonschema.validate(answer, WEATHER_SCHEMA)
    chunks = list(_ask(client, response_format=response_format, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_object_and_vllm_extras(client: openai.OpenAI) -> None:
    """json_object gives a JSON object; vLLM's `structured_outputs` and the older `guided_*` fields
    give what they ask for (a regex, a choice, a grammar, a schema)."""
    answer = json.loads(_ask(client, response_format={"type": "json_object"}).choices[0].message.content)
    assert isinstance(answer, dict)

    def text(**extra: Any) -> str:
        choice = _ask(client, max_tokens=24, extra_body=extra).choices[0]
        assert choice.finish_reason == "stop", extra
        return choice.message.content

    degrees, place = r"\d{1,2} degrees (celsius|fahrenheit)", r"[A-Z][a-z]{1,12}, [a-z]{1,12}"
    assert re.fullmatch(degrees, text(guided_regex=degrees))
    assert re.fullmatch(place, text(structured_outputs={"regex": place}))
    assert text(guided_choice=["sunny", "rainy", "snowy"]) in {"sunny", "rainy", "snowy"}
    assert text(structured_outputs={"choice": ["yes", "no"]}) in {"yes", "no"}
    assert text(guided_grammar='root ::= "It is " ("warm" | "cold") "."') in {"It is warm.", "It is cold."}
    small = {"type": "object", "properties": {"sunny": {"type": "boolean"}}, "required": ["sunny"]}
    jsonschema.validate(json.loads(text(guided_json=small)), small)
    jsonschema.validate(json.loads(text(structured_outputs={"json": json.dumps(small)})), small)


def test_completions_take_the_same_constraints(client: openai.OpenAI) -> None:
    """`/v1/completions` declares the same fields as chat: a schema and a choice constrain every
    choice of a plain-text prompt, whole and streamed."""
    prompt = "The weather in Paris today is"
    plain = client.completions.create(model=BASE, prompt=prompt, max_tokens=16, temperature=0)
    assert not plain.choices[0].text.lstrip().startswith("{")
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA}}
    whole = client.completions.create(model=BASE, prompt=prompt, max_tokens=64, temperature=0,
                                      extra_body={"response_format": response_format})
    assert whole.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(whole.choices[0].text), WEATHER_SCHEMA)
    streamed = client.completions.create(model=BASE, prompt=prompt, max_tokens=64, temperature=0, stream=True,
                                         extra_body={"response_format": response_format})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
    picked = client.completions.create(model=BASE, prompt="Is it raining? Answer:", max_tokens=8, n=2, seed=3,
                                       temperature=1.0, extra_body={"guided_choice": [" yes", " no"]})
    assert [c.text in {" yes", " no"} for c in picked.choices] == [True, True]


def test_a_constrained_row_leaves_its_neighbour_untouched(client: openai.OpenAI) -> None:
    """A constrained and an unconstrained request decoding at the same time, in one batch: the free
    one's greedy answer is exactly its answer alone, and the constrained one follows its schema."""
    free = {"model": "alpha", "messages": [{"role": "user", "content": "Write a haiku about the sea."}],
            "max_tokens": 24}
    alone = _ask(client, **free).choices[0].message.content
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA}}
    with ThreadPoolExecutor(2) as pool:  # the constrained one first: the free one joins its batch
        constrained = pool.submit(_ask, client, response_format=response_format)
        beside = pool.submit(_ask, client, **free)
        assert beside.result().choices[0].message.content == alone
        jsonschema.validate(json.loads(constrained.result().choices[0].message.content), WEATHER_SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_and_named_give_valid_calls(client: openai.OpenAI, stream: bool) -> None:
    """The bare model, which answers in prose, must call a tool: `required` gives a call of a declared
    tool whose arguments validate against its schema; a named function gives a call of that one."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, OTHER_TOOL)}
    for tool_choice, names in (("required", set(schemas)),
                               ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
                               ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})):
        kwargs = {"tools": [WEATHER_TOOL, OTHER_TOOL], "tool_choice": tool_choice, "parallel_tool_calls": False}
        if stream:
            chunks = list(_ask(client, stream=True, **kwargs))
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            assert not "".join(d.content or "" for d in deltas)
            parts = [tc for d in deltas for tc in d.tool_calls or []]
            calls = [(parts[0].function.name, "".join(p.function.arguments or "" for p in parts))]
            finish = chunks[-1].choices[0].finish_reason
        else:
            choice = _ask(client, **kwargs).choices[0]
            assert choice.message.content is None
            calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
            finish = choice.finish_reason
        assert finish == "tool_calls" and len(calls) == 1, tool_choice
        name, arguments = calls[0]
        assert name in names, tool_choice
        jsonschema.validate(json.loads(arguments), schemas[name])


def test_constraints_that_cannot_be_enforced_are_refused(client: openai.OpenAI) -> None:
    """A 400 naming the field, before anything runs (a stream too: the client gets the error, not a
    200 that breaks off)."""
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"response_format": bad_schema}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"extra_body": {"guided_regex": "(ab"}}, "guided_regex"),
        ({"extra_body": {"guided_grammar": "root ::= missing"}}, "guided_grammar"),
        ({"extra_body": {"guided_json": "{not json"}}, "guided_json"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, "structured_outputs"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "disable_any_whitespace": True}}}, "structured_outputs"),
        ({"extra_body": {"guided_json": {"type": "object", "properties": {"a": {"type": "string",
                                                                              "maxLength": 100000}}}}}, "guided_json"),
        ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}}, "guided_regex"),
        ({"extra_body": {"guided_choice": ["a", "b"], "ignore_eos": True}}, "ignore_eos"),  # nothing after the end
    ]
    for kwargs, param in cases:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as caught:
                _ask(client, stream=stream, **kwargs)
            assert caught.value.body["param"] == param, (kwargs, caught.value.body)
            assert "/" not in caught.value.body["message"], caught.value.body  # no library file paths
    # nested deeper than any schema needs: refused before xgrammar sees it
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(80):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(openai.BadRequestError) as caught:
        _ask(client, response_format={"type": "json_schema", "json_schema": {"name": "deep", "schema": deep}})
    assert caught.value.body["param"] == "response_format"
