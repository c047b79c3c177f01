"""The official `openai` client, unchanged, against the real server: models, pinned and routed
chat (sync and async, streaming and not), and errors raised as the client's own exceptions."""

from __future__ import annotations

import asyncio
import functools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.conftest import TASK_ADAPTERS

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Turn off the bedroom lights"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(server):
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_list_with_lineage(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, "auto", "router", *TASK_ADAPTERS}
    assert models[BASE].parent is None
    for name in (*TASK_ADAPTERS, "router"):
        assert models[name].parent == BASE and models[name].root.endswith(name)


def test_pinned_chat(client):
    raw = client.chat.completions.with_raw_response.create(model="beta", messages=MESSAGES, max_tokens=8,
                                                           temperature=0)
    completion = raw.parse()
    assert completion.model == "beta" and raw.headers["x-loramux-adapter"] == "beta@1"
    assert completion.choices[0].message.content and completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 8


def test_routed_chat_names_the_adapter_used(client):
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES, max_tokens=4,
                                                           temperature=0)
    completion = raw.parse()
    route = json.loads(raw.headers["x-loramux-route"])
    assert completion.model == route["adapter"] and completion.model in TASK_ADAPTERS
    pinned = client.chat.completions.create(model=completion.model, messages=MESSAGES, max_tokens=4, temperature=0)
    assert pinned.choices[0].message.content == completion.choices[0].message.content


@functools.cache
def bare_base_greedy(model_path: Path, max_tokens: int) -> str:
    """What the bare base model answers to MESSAGES, greedy: transformers alone, no peft anywhere."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_base_model_chat(client, base_model):
    """The base model's name serves the bare model, no adapter applied: exactly the text transformers
    gives without peft, and not what the adapters answer to the same chat."""
    def answer(model: str) -> str:
        return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                              temperature=0).choices[0].message.content

    completion = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=8, temperature=0)
    assert completion.model == BASE
    assert completion.choices[0].message.content == bare_base_greedy(base_model.path, 8)
    assert completion.choices[0].message.content not in {answer(name) for name in TASK_ADAPTERS}


def test_streaming_with_usage(client):
    stream = client.chat.completions.create(model="gamma", messages=MESSAGES, max_completion_tokens=6,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1].usage.completion_tokens == 6 or finishes == ["stop"]
    whole = client.chat.completions.create(model="gamma", messages=MESSAGES, max_tokens=6, temperature=0)
    assert text == whole.choices[0].message.content


def test_async_client_concurrent_and_streaming(aclient):
    async def scenario():
        results = await asyncio.gather(*[
            aclient.chat.completions.create(model=name, messages=MESSAGES, max_tokens=5, temperature=0)
            for name in (*TASK_ADAPTERS, "auto")
        ])
        stream = await aclient.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=5,
                                                       temperature=0, stream=True)
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        return results, "".join(pieces)

    results, streamed = asyncio.run(scenario())
    assert [r.model for r in results[:3]] == list(TASK_ADAPTERS)
    assert results[3].model in TASK_ADAPTERS
    assert streamed == results[3].choices[0].message.content


def test_seeded_sampling_is_reproducible(client):
    """`temperature` and `seed` reach the engine: a seeded sample is not the greedy answer, another seed
    gives another sample, and the same seed repeats its text while other requests run beside it."""
    kwargs = {"model": "alpha", "messages": MESSAGES, "max_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 7}

    def text(**changes: object) -> str:
        return client.chat.completions.create(**{**kwargs, **changes}).choices[0].message.content

    a = text()
    assert a != text(temperature=0) and a != text(seed=8)
    with ThreadPoolExecutor(4) as pool:
        neighbours = [pool.submit(text, model=name, seed=None, max_tokens=16) for name in TASK_ADAPTERS]
        b = pool.submit(text).result()
        assert all(n.result() for n in neighbours)
    assert a == b


def test_errors_are_the_clients_exceptions(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-adapter", messages=MESSAGES)
    assert missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad_n:
        client.chat.completions.create(model="alpha", messages=MESSAGES, n=17)  # over LORAMUX_MAX_CHOICES
    assert bad_n.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="alpha", messages=[])
    with pytest.raises(openai.BadRequestError) as forced:  # a named function that is not among the tools
        client.chat.completions.create(model="alpha", messages=MESSAGES, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            tool_choice={"type": "function", "function": {"name": "g"}})
    assert forced.value.body["param"] == "tool_choice"
