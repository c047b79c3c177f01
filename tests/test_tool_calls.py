"""Tool calls as agent frameworks use them: `tools` in, `message.tool_calls` out (whole and
streamed), a history with an assistant call and the tool's result, on a real server with a real
expert trained to call a tool, through the official `openai` client. The parsing and the prompt
rendering are checked on their own first, with the real tokenizers (SmolLM2's template has no tool
section, Qwen's has one). `test_vllm_engine.py` runs the same client suite on the vLLM engine."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from service.base_model import BaseModelInfo
from service.prompts import chat_for_template, prompt_ids, template_has_tools
from service.tool_calls import CallCollector, detect_call_format, format_calls, parse_tool_calls
from tests.conftest import CACHE_DIR
from tests.support import OTHER_TOOL, WEATHER_CALL, WEATHER_TOOL, ServerProcess, weather_answer

ASK = [{"role": "user", "content": "What's the weather in Paris?"}]
CALL_TEXT = json.dumps(WEATHER_CALL)


# ---- parsing: text in, calls out, never an exception ------------------------------------------
@pytest.mark.parametrize(("text", "fmt", "expected"), [
    (CALL_TEXT, "json", [("get_weather", {"city": "Paris"})]),
    (f"  {CALL_TEXT}\n", "json", [("get_weather", {"city": "Paris"})]),
    (json.dumps([WEATHER_CALL, WEATHER_CALL]), "json", [("get_weather", {"city": "Paris"})] * 2),
    (f"<tool_call>\n{CALL_TEXT}\n</tool_call>", "hermes", [("get_weather", {"city": "Paris"})]),
    (f"<tool_call>{CALL_TEXT}</tool_call>\n<tool_call>{CALL_TEXT}</tool_call>", "hermes",
     [("get_weather", {"city": "Paris"})] * 2),
    ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}', "json", [("get_weather", {"city": "Paris"})]),
    ('{"name": "get_time", "arguments": {}}', "json", None),  # not a declared tool
    ('{"name": "get_weather", "arguments": {"city": "Paris"}, "x": 1}', "json", None),
    ('{"name": "get_weather", "arguments": [1]}', "json", None),
    ('{"name": "get_weather", "arguments": {"city": "Par', "json", None),  # cut by max_tokens
    ("It is sunny in Paris.", "json", None),
    ("[]", "json", None),
    (CALL_TEXT, "none", None),
    (CALL_TEXT, "hermes", None),  # a Qwen expert's bare JSON is text
    (f"<tool_call>{CALL_TEXT}", "hermes", None),
    (f"<tool_call>{CALL_TEXT}</tool_call> and more", "hermes", None),
    ("\x00\ud800{", "json", None),
])
def test_parse_tool_calls(text: str, fmt: Any, expected: list | None) -> None:
    parsed = parse_tool_calls(text, fmt, {"get_weather"})
    if expected is None:
        assert parsed is None
        return
    assert parsed is not None
    content, calls = parsed
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected
    assert len({c.id for c in calls}) == len(calls) and all(c.id.startswith("call_") for c in calls)


def test_hermes_text_before_the_call_is_content() -> None:
    parsed = parse_tool_calls(f"Let me look.\n<tool_call>{CALL_TEXT}</tool_call>", "hermes", {"get_weather"})
    assert parsed is not None and parsed[0] == "Let me look." and parsed[1][0].name == "get_weather"


@pytest.mark.parametrize("fmt", ["json", "hermes"])
@pytest.mark.parametrize("answer", [CALL_TEXT, "It is sunny.", '{"a": 1} is JSON', "<tool_c", "a <b> c",
                                    "Sure.<tool_call>" + CALL_TEXT + "</tool_call>"])
def test_streamed_pieces_give_what_the_whole_text_gives(fmt: Any, answer: str) -> None:
    """The stream's rule and the whole answer's rule are one: however the text is cut into deltas,
    the content sent (as it comes, then at the end) and the calls are the same."""
    text = answer
    whole = CallCollector(fmt, {"get_weather"})
    sent_whole = whole.push(text)
    held, calls = whole.finish()
    for size in (1, 2, 5):
        pieces = CallCollector(fmt, {"get_weather"})
        sent = "".join(pieces.push(text[i:i + size]) for i in range(0, len(text), size))
        rest, got = pieces.finish()
        assert sent + rest == sent_whole + held
        assert [(c.name, c.arguments) for c in got] == [(c.name, c.arguments) for c in calls]
    if calls:  # nothing of a call was ever sent as content
        assert (fmt, answer) == ("json", CALL_TEXT) or (fmt == "hermes" and answer.startswith("Sure."))
        assert sent_whole + held == ("" if fmt == "json" else "Sure.")
    else:
        assert sent_whole + held == text


def test_plain_text_is_released_as_soon_as_it_cannot_be_a_call() -> None:
    stream = CallCollector("json", {"get_weather"})
    assert stream.push("  ") == "" and stream.push("It") == "  It" and stream.push(" is") == " is"
    qwen = CallCollector("hermes", {"get_weather"})
    assert qwen.push("Sure <tool") == "Sure " and qwen.push("s>") == "<tools>"


def test_the_call_format_is_detected_from_training_answers() -> None:
    assert detect_call_format([CALL_TEXT, CALL_TEXT, "hello"]) == "json"
    assert detect_call_format([f"<tool_call>{CALL_TEXT}</tool_call>"] * 2 + [CALL_TEXT]) == "hermes"
    assert detect_call_format(["hello", "world", CALL_TEXT]) == "json"  # answers after a tool's result are text
    assert detect_call_format(["hello", '{"a": 1}']) == detect_call_format([]) == "none"


# ---- prompts: the tools and the history reach the template ------------------------------------
HISTORY = [
    *ASK,
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees"},
]


def test_a_template_without_tools_gets_them_in_the_system_turn(base_model: BaseModelInfo) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model.path)
    assert not template_has_tools(tokenizer)
    text = tokenizer.decode(prompt_ids(tokenizer, HISTORY, "You answer weather questions.", [WEATHER_TOOL]))
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou answer weather questions.")
    assert '"name": "get_weather"' in system and '"required": ["city"]' in system
    # the earlier call is the assistant's text in the expert's own format, and the result follows it
    assert f"<|im_start|>assistant\n{format_calls([('get_weather', {'city': 'Paris'})], 'json')}<|im_end|>" in text
    assert "<|im_start|>tool\nSunny, 21 degrees<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # no tools, no history: exactly the prompt training builds
    assert prompt_ids(tokenizer, ASK) == list(tokenizer.apply_chat_template(ASK, add_generation_prompt=True,
                                                                           return_dict=False))


def test_a_template_with_tools_renders_them_itself(tiny_vl: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_vl)
    assert template_has_tools(tokenizer)
    chat, extra = chat_for_template(tokenizer, HISTORY, None, [WEATHER_TOOL], "hermes")
    assert extra == {"tools": [WEATHER_TOOL]}
    assert chat[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # an object, as templates want
    text = tokenizer.decode(prompt_ids(tokenizer, HISTORY, None, [WEATHER_TOOL], "hermes"))
    assert "<tools>" in text and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nSunny, 21 degrees\n</tool_response>" in text


# ---- a real server, a real expert, the official client ----------------------------------------
@pytest.fixture(scope="module")
def tool_server(weather_expert: Path, task_adapters: dict[str, Path], adapter_root: Path, base_model: BaseModelInfo,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The weather expert, another expert (`alpha`: lights requests, random weights) and a router
    trained for a few steps to tell their requests apart, on a real embedded-engine server."""
    from service.registration import register_adapter
    from service.settings import Settings
    from training.data.chats import write_jsonl
    from training.data.routing_dataset import build_routing_dataset
    from training.train.sft import TrainConfig, train_adapter

    root = tmp_path_factory.mktemp("tools")
    lights = [{"messages": [{"role": "user", "content": f"{verb} the {room} lights"},
                            {"role": "assistant", "content": "ok"}], "metadata": {"adapter": "alpha"}}
              for verb in ("Turn on", "Switch off", "Dim", "Brighten") for room in ("kitchen", "hall", "attic", "den")]
    write_jsonl(root / "alpha.jsonl", lights)
    routing = build_routing_dataset({"weather": adapter_root / "weather-data.jsonl", "alpha": root / "alpha.jsonl"},
                                    root / "routing").path
    settings = Settings(registry=root / "loras.json", adapter_root=adapter_root, cache_dir=CACHE_DIR)
    router = train_adapter(TrainConfig(kind="router", dataset=routing, run_name="tools-router",
                                       runs_dir=adapter_root / "runs", max_steps=8, batch_size=8, learning_rate=3e-3,
                                       early_stopping=False, calibrate=False, dropout=0.0, save_steps=1000,
                                       progress=False, eval_examples=0), settings, base_model).final_dir
    register_adapter(settings, base_model, "task", "weather", weather_expert)
    # the same weights, recorded as an expert trained on bare requests (as the demo experts are)
    bare = adapter_root / "weather-bare"
    shutil.copytree(weather_expert, bare, dirs_exist_ok=True)
    meta = json.loads((bare / "loramux.json").read_text())
    (bare / "loramux.json").write_text(json.dumps({**meta, "tools_in_prompt": False}))
    register_adapter(settings, base_model, "task", "weather-bare", bare)
    register_adapter(settings, base_model, "task", "alpha", task_adapters["alpha"])
    register_adapter(settings, base_model, "router", "router", router, labels=("weather", "alpha"))
    env = {"LORAMUX_REGISTRY": str(settings.registry), "LORAMUX_ADAPTER_ROOT": str(adapter_root),
           "LORAMUX_CACHE_DIR": str(CACHE_DIR), "LORAMUX_MAX_MODEL_LEN": "512"}
    proc = ServerProcess(env).start(root / "server.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def tool_client(tool_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 32)
    return client.chat.completions.create(model="weather", messages=kwargs.pop("messages", ASK), temperature=0,
                                          **kwargs)


def test_the_expert_card_shows_its_tools(tool_client: openai.OpenAI) -> None:
    card = {m.id: m for m in tool_client.models.list().data}["weather"]
    assert card.tools == ["get_weather"] and card.tool_call_format == "json"


def test_a_call_of_a_declared_tool_comes_back_as_tool_calls(tool_client: openai.OpenAI) -> None:
    plain = _ask(tool_client).choices[0]
    assert json.loads(plain.message.content) == WEATHER_CALL  # what the expert writes, without tools
    assert not plain.message.tool_calls and plain.finish_reason == "stop"

    choice = _ask(tool_client, tools=[WEATHER_TOOL, OTHER_TOOL]).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == WEATHER_CALL["arguments"]


def test_a_streamed_call_arrives_as_tool_call_deltas(tool_client: openai.OpenAI) -> None:
    chunks = list(_ask(tool_client, tools=[WEATHER_TOOL], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not "".join(d.content or "" for d in deltas)
    parts = [tc for d in deltas for tc in d.tool_calls or []]
    assert parts[0].index == 0 and parts[0].id.startswith("call_") and parts[0].function.name == "get_weather"
    assert all(p.index == 0 and p.id is None for p in parts[1:])  # then only argument fragments
    assert json.loads("".join(p.function.arguments or "" for p in parts)) == WEATHER_CALL["arguments"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_an_expert_trained_without_tools_is_served_without_them(tool_client: openai.OpenAI) -> None:
    """An expert whose training prompts carried tools reads them (its prompt grows by their schemas);
    one trained on bare requests gets the same prompt with or without them, so its answer cannot
    change, and its call of a declared tool still comes back as `tool_calls`."""
    def asked(model: str, **kwargs: Any) -> Any:
        return tool_client.chat.completions.create(model=model, messages=ASK, max_tokens=32, temperature=0, **kwargs)

    reads, plain = asked("weather", tools=[WEATHER_TOOL, OTHER_TOOL]), asked("weather")
    assert reads.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    bare, bare_plain = asked("weather-bare", tools=[WEATHER_TOOL, OTHER_TOOL]), asked("weather-bare")
    assert bare.usage.prompt_tokens == bare_plain.usage.prompt_tokens == plain.usage.prompt_tokens
    assert json.loads(bare_plain.choices[0].message.content) == WEATHER_CALL
    assert bare.choices[0].finish_reason == "tool_calls"
    assert bare.choices[0].message.tool_calls[0].function.name == WEATHER_CALL["name"]
    assert json.loads(bare.choices[0].message.tool_calls[0].function.arguments) == WEATHER_CALL["arguments"]


def test_a_call_of_an_undeclared_tool_stays_text(tool_client: openai.OpenAI) -> None:
    for kwargs in ({"tools": [OTHER_TOOL]}, {"tools": [WEATHER_TOOL], "tool_choice": "none"}):
        choice = _ask(tool_client, **kwargs).choices[0]
        assert not choice.message.tool_calls and choice.finish_reason == "stop", kwargs
        assert json.loads(choice.message.content)["name"] == "get_weather"
        streamed = list(_ask(tool_client, stream=True, **kwargs))
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == choice.message.content
        assert streamed[-1].choices[0].finish_reason == "stop"


TIMER_TOOL = {"type": "function", "function": {"name": "set_timer", "parameters": {
    "type": "object", "properties": {"minutes": {"type": "integer"}}, "required": ["minutes"],
    "additionalProperties": False}}}


def test_a_forced_call_is_a_valid_call_even_of_a_tool_the_expert_never_learned(tool_client: openai.OpenAI) -> None:
    """`tool_choice` named, or "required" with only that tool declared: structured output makes the
    expert call `set_timer`, which it never learned (unconstrained it writes get_weather's call, and with
    `tool_choice` "auto" that stays text), with arguments its schema allows; whole and streamed."""
    import jsonschema

    schema = TIMER_TOOL["function"]["parameters"]
    free = _ask(tool_client, tools=[TIMER_TOOL]).choices[0]
    assert free.finish_reason == "stop" and json.loads(free.message.content)["name"] == "get_weather"
    for tools, tool_choice in (([WEATHER_TOOL, TIMER_TOOL], {"type": "function", "function": {"name": "set_timer"}}),
                               ([TIMER_TOOL], "required")):
        choice = _ask(tool_client, tools=tools, tool_choice=tool_choice).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, tool_choice
        (call,) = choice.message.tool_calls
        assert call.function.name == "set_timer"
        jsonschema.validate(json.loads(call.function.arguments), schema)
        chunks = list(_ask(tool_client, tools=tools, tool_choice=tool_choice, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        parts = [tc for d in deltas for tc in d.tool_calls or []]
        assert not "".join(d.content or "" for d in deltas) and parts[0].function.name == "set_timer"
        assert "".join(p.function.arguments or "" for p in parts) == call.function.arguments
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the tool it knows, required: the call it makes anyway, now certain
    choice = _ask(tool_client, tools=[WEATHER_TOOL, TIMER_TOOL], tool_choice="required",
                  parallel_tool_calls=False).choices[0]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", WEATHER_CALL["arguments"])]


def test_a_history_with_a_call_and_its_result_reaches_the_model(tool_client: openai.OpenAI) -> None:
    def prompt_tokens(city: str, result: str) -> int:
        call = {**HISTORY[1]["tool_calls"][0], "function": {"name": "get_weather",
                                                           "arguments": json.dumps({"city": city})}}
        history = [ASK[0], {**HISTORY[1], "tool_calls": [call]}, {**HISTORY[2], "content": result}]
        return _ask(tool_client, messages=history, tools=[WEATHER_TOOL], max_tokens=1).usage.prompt_tokens

    short = prompt_tokens("Paris", "Sunny")
    assert prompt_tokens("Paris", "Sunny" + " and warm" * 20) - short >= 40  # the tool's result is in the prompt
    assert prompt_tokens("Paris" + " Paris" * 20, "Sunny") - short >= 20  # and so is the assistant's call


def test_given_the_tools_result_the_expert_answers_in_text(tool_client: openai.OpenAI) -> None:
    """The second turn of an agent's loop: the tool's result is back, the answer is text using it."""
    choice = _ask(tool_client, messages=HISTORY, tools=[WEATHER_TOOL]).choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content == weather_answer("Paris", "Sunny, 21 degrees")


def test_tool_requests_the_service_cannot_honour_are_refused(tool_client: openai.OpenAI) -> None:
    cases = [({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
              "tool_choice"),  # a named function that is not declared
             ({"tool_choice": "required"}, "tool_choice"),
             ({"tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
              "tool_choice"),  # two constraints on one answer
             ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
               "tool_choice": "required"}, "tools"),  # a schema that cannot be enforced
             ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools")]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            _ask(tool_client, **kwargs)
        assert caught.value.body["param"] == param, kwargs
    with pytest.raises(openai.BadRequestError):  # a malformed tool: a 400, not a 500
        _ask(tool_client, tools=[{"type": "function", "function": {"name": "no spaces allowed"}}])


def test_an_agent_framework_runs_its_tool_loop_on_auto(tool_server: ServerProcess) -> None:
    """The OpenAI Agents SDK with its chat-completions model, unchanged, against `model="auto"`: the
    router sends the request to the weather expert, which calls the SDK's tool; the SDK runs it,
    sends the result back, and the expert answers with it."""
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # the SDK would export traces to OpenAI
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather forecast for a city."""
        asked.append(city)
        return "Sunny, 21 degrees"

    def routed_to_weather() -> float:
        text = httpx.get(f"{tool_server.url}/metrics", timeout=30).text
        found = re.search(r'^loramux_routing_decisions_total\{adapter="weather"\} (\S+)$', text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    before = routed_to_weather()
    client = openai.AsyncOpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    agent = Agent(name="assistant", tools=[get_weather],
                  model=OpenAIChatCompletionsModel(model="auto", openai_client=client),
                  model_settings=ModelSettings(temperature=0, max_tokens=32))
    result = Runner.run_sync(agent, ASK[0]["content"], max_turns=4)
    assert asked == ["Paris"]
    assert result.final_output == weather_answer("Paris", "Sunny, 21 degrees")
    assert len(result.raw_responses) == 2  # two requests: the call, then the answer
    assert routed_to_weather() - before == 2  # both routed to the weather expert
