"""The official `openai` client, unchanged, against the real server: `/v1/completions` (whole and
streamed, routed and pinned, lists of prompts), logprobs in chat's and completions' formats checked
against a plain transformers forward pass, `n` choices, the sampling fields (top_k, min_p and the
penalties) changing answers as vLLM's definitions say, and refusals that name the field.
Re-run on the vLLM engine by tests/test_vllm_engine.py."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import openai
import pytest

from tests.conftest import TASK_ADAPTERS

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Turn off the bedroom lights"}]
PROMPT = "The three primary colours are"
REPETITIVE = "one, one, one, one, one, one, one, one, one, one,"  # greedy continues with more "one,"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@functools.cache
def _reference(model_path: Path) -> tuple[object, object]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return tokenizer, AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def next_token_logprobs(model_path: Path, ids: list[int]) -> list[float]:
    """The bare base model's log-probabilities of the token after `ids`: transformers alone."""
    import torch

    _, model = _reference(model_path)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1).tolist()


def chat_prompt_ids(model_path: Path) -> list[int]:
    tokenizer, _ = _reference(model_path)
    return tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)


# ---- /v1/completions -----------------------------------------------------------------------------------------
def test_completions_whole_and_streamed(client):
    whole = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.model == "alpha"
    (choice,) = whole.choices
    assert choice.text and choice.finish_reason in ("stop", "length") and choice.logprobs is None
    assert whole.usage.completion_tokens <= 8 and whole.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # no chat template: the text goes to the model as it is, so a chat of it answers differently
    chat = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.content != choice.text


def test_ignore_eos_runs_to_max_tokens(client):
    """vLLM's `ignore_eos` (what `vllm bench serve --ignore-eos` sends): an answer that ends at the
    end-of-turn token goes on to exactly max_tokens instead, its first tokens unchanged."""
    ask = functools.partial(client.chat.completions.create, model=BASE, max_tokens=40, temperature=0,
                            messages=[{"role": "user", "content": "Say hi."}])
    short = ask()
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 40
    longer = ask(extra_body={"ignore_eos": True})
    assert longer.choices[0].finish_reason == "length" and longer.usage.completion_tokens == 40
    assert longer.choices[0].message.content.startswith(short.choices[0].message.content)


def test_completions_routed_listed_and_default_length(client):
    raw = client.completions.with_raw_response.create(model="auto", prompt=PROMPT, temperature=0)
    routed = raw.parse()
    assert routed.model in TASK_ADAPTERS and raw.headers["x-loramux-route"]
    assert routed.usage.completion_tokens <= 16  # OpenAI's default max_tokens
    pinned = client.completions.create(model=routed.model, prompt=PROMPT, temperature=0)
    assert pinned.choices[0].text == routed.choices[0].text
    listed = client.completions.create(model="beta", prompt=[PROMPT, "Name a fruit:"], max_tokens=6, temperature=0)
    assert [c.index for c in listed.choices] == [0, 1]
    alone = [client.completions.create(model="beta", prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in (PROMPT, "Name a fruit:")]
    assert [c.text for c in listed.choices] == alone
    tokenizer_ids = client.completions.create(model="beta", prompt=[504, 1837], max_tokens=4, temperature=0)
    assert tokenizer_ids.choices[0].text and tokenizer_ids.usage.prompt_tokens == 2
    echoed = client.completions.create(model="beta", prompt=PROMPT, max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + alone[0]


def test_completion_logprobs_are_the_models(client, base_model):
    """The chosen token's logprob is what transformers gives for the prompt; the top dict holds the
    k most likely and the chosen one, the greedy token the most likely of them."""
    tokenizer, _ = _reference(base_model.path)
    whole = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = whole.choices[0].logprobs
    assert "".join(lp.tokens) == whole.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    reference = next_token_logprobs(base_model.path, tokenizer(PROMPT).input_ids)
    first = max(range(len(reference)), key=reference.__getitem__)
    assert lp.tokens[0] == tokenizer.decode([first])
    assert lp.token_logprobs[0] == pytest.approx(reference[first], abs=5e-3)
    for chosen, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) == pytest.approx(value) and top[chosen] == pytest.approx(value)
    streamed = list(client.completions.create(model=BASE, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                              stream=True))
    blocks = [c.choices[0].logprobs for c in streamed if c.choices[0].logprobs]
    assert [t for b in blocks for t in b.tokens] == lp.tokens
    assert [o for b in blocks for o in b.text_offset] == lp.text_offset
    assert [v for b in blocks for v in b.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-4)


# ---- chat logprobs ------------------------------------------------------------------------------------------
def test_chat_logprobs_are_the_models(client, base_model):
    whole = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=4)
    choice = whole.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    assert bytes(b for t in content for b in t.bytes).decode() == choice.message.content
    reference = next_token_logprobs(base_model.path, chat_prompt_ids(base_model.path))
    assert content[0].logprob == pytest.approx(max(reference), abs=5e-3)
    for token in content:
        values = [t.logprob for t in token.top_logprobs]
        assert len(values) == 4 and values == sorted(values, reverse=True)
        assert token.top_logprobs[0].token == token.token and values[0] == pytest.approx(token.logprob)
    chunks = list(client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=4, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)
    plain = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True)
    assert plain.choices[0].logprobs.content[0].top_logprobs == []


# ---- n -----------------------------------------------------------------------------------------------------
def test_n_choices_whole_and_streamed(client):
    kwargs = {"model": "alpha", "messages": MESSAGES, "max_tokens": 10, "temperature": 1.0, "seed": 11, "n": 2}
    first = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    texts = [c.message.content for c in first.choices]
    assert texts[0] != texts[1]  # choice i draws with its own seed
    assert [c.message.content for c in client.chat.completions.create(**kwargs).choices] == texts
    single = client.chat.completions.create(**{**kwargs, "n": 1})
    assert single.choices[0].message.content == texts[0]  # choice 0 is the n=1 answer
    assert first.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counted once
    assert first.usage.completion_tokens > single.usage.completion_tokens
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in (0, 1)]
    assert streamed == texts
    assert sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason) == [0, 1]
    completions = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, n=2)
    again = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, n=2)
    assert [c.text for c in completions.choices] == [c.text for c in again.choices]
    assert completions.choices[0].text != completions.choices[1].text


# ---- sampling fields ----------------------------------------------------------------------------------------
def test_top_k_min_p_and_penalties_change_answers_as_defined(client):
    def text(**kwargs: object) -> str:
        body = {"model": "gamma", "prompt": REPETITIVE, "max_tokens": 12, "temperature": 0, **kwargs}
        extra = {k: body.pop(k) for k in ("top_k", "min_p", "repetition_penalty") if k in body}
        return client.completions.create(**body, extra_body=extra or None).choices[0].text

    greedy = text()
    assert greedy.count("one") >= 4  # the answer these penalties are for
    assert text(temperature=1.0, seed=3, top_k=1) == greedy  # top_k=1 leaves only the greedy token
    for penalty in ({"frequency_penalty": 2.0}, {"repetition_penalty": 1.8}):  # they grow with the repeats
        changed = text(**penalty)
        assert changed.count("one") < greedy.count("one"), penalty
    assert text(presence_penalty=2.0) != greedy  # once per token: enough to change it, not to stop it
    free = text(temperature=1.5, seed=21, max_tokens=16)
    assert text(temperature=1.5, seed=21, max_tokens=16, top_k=3) != free
    assert text(temperature=1.5, seed=21, max_tokens=16, min_p=0.3) != free
    # chat takes the same fields (vLLM's extras as top-level body fields)
    chat = client.chat.completions.create(model="gamma", messages=MESSAGES, max_tokens=8, temperature=1.0, seed=3,
                                          extra_body={"top_k": 1})
    greedy_chat = client.chat.completions.create(model="gamma", messages=MESSAGES, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == greedy_chat.choices[0].message.content


def test_generate_takes_the_same_sampling_fields(server):
    """`/generate` (the native endpoint) takes chat's sampling fields with the same meanings (one shared
    `SamplingFields`): top_k=1 leaves only the greedy token, top_k=3 changes a free sample, and a field
    out of range is a 400 that names it."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=120) as http:
        def generate(**fields: object) -> httpx.Response:
            return http.post("/generate", json={"messages": MESSAGES, "adapter": "gamma", "max_tokens": 8,
                                                "temperature": 0, **fields})

        greedy = generate().json()
        assert generate(temperature=1.0, seed=3, top_k=1).json()["text"] == greedy["text"]
        assert generate(temperature=1.5, seed=21, max_tokens=16).json()["text"] != generate(
            temperature=1.5, seed=21, max_tokens=16, top_k=3).json()["text"]
        refused = generate(top_k=-2)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "top_k"


# ---- refusals -----------------------------------------------------------------------------------------------
def _param(call) -> str | None:
    with pytest.raises(openai.BadRequestError) as refused:
        call()
    return refused.value.body["param"]


def test_refusals_name_the_field(client):
    chat = functools.partial(client.chat.completions.create, model="alpha", messages=MESSAGES, max_tokens=2)
    complete = functools.partial(client.completions.create, model="alpha", prompt=PROMPT, max_tokens=2)
    assert _param(lambda: chat(top_logprobs=2)) == "top_logprobs"  # needs logprobs: true
    assert _param(lambda: chat(logprobs=True, top_logprobs=21)) == "top_logprobs"
    assert _param(lambda: chat(n=17)) == "n"
    assert _param(lambda: chat(presence_penalty=2.5)) == "presence_penalty"
    assert _param(lambda: chat(extra_body={"repetition_penalty": 0})) == "repetition_penalty"
    assert _param(lambda: chat(extra_body={"top_k": -2})) == "top_k"
    assert _param(lambda: chat(extra_body={"min_p": 1.5})) == "min_p"
    assert _param(lambda: chat(logit_bias={"42": 5})) == "logit_bias"
    assert _param(lambda: complete(suffix="!")) == "suffix"
    assert _param(lambda: complete(best_of=3)) == "best_of"
    assert _param(lambda: complete(echo=True, logprobs=1)) == "echo"
    assert _param(lambda: complete(logprobs=21)) == "logprobs"
    assert _param(lambda: complete(prompt="")) == "prompt"
    assert _param(lambda: complete(prompt=[10**9])) == "prompt"
    assert _param(lambda: complete(prompt=[PROMPT] * 9, n=2)) == "prompt"
    assert _param(lambda: complete(prompt="word " * 600)) == "prompt"  # over the context
    assert _param(lambda: complete(extra_body={"min_tokens": 3})) == "min_tokens"
    # unknown fields are ignored (logged), and neutral values of known ones change nothing
    ok = chat(extra_body={"no_such_field": 1, "ignore_eos": False, "skip_special_tokens": True})
    assert ok.choices[0].message.content
    assert complete(extra_body={"add_special_tokens": True}).choices[0].text
    assert math.isfinite(complete(logprobs=0).choices[0].logprobs.token_logprobs[0])
