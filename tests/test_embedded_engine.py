"""The embedded engine on the real model: mixed-adapter batches give exactly what plain
`PeftModel` gives for each adapter, aborts free their slot, adapters come and go at runtime."""

from __future__ import annotations

import asyncio

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from service.engine.base import AdapterRef, SamplingParams
from service.engine.embedded import EmbeddedEngine
from service.settings import Settings

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Turn on the kitchen lights",
    "Set a timer for ten minutes, please, I am cooking pasta tonight",
]


@pytest.fixture(scope="module")
def engine_and_refs(base_model, task_adapters, tmp_path_factory):
    settings = Settings(cache_dir=tmp_path_factory.mktemp("cache"), max_batch_size=32)
    engine = EmbeddedEngine(settings, base_model)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    refs = {name: AdapterRef(name, 1, path) for name, path in task_adapters.items()}
    for ref in refs.values():
        loop.run_until_complete(engine.add_adapter(ref))
    yield engine, refs, loop
    loop.run_until_complete(engine.shutdown())
    loop.close()


def chat_ids(engine, prompt: str) -> list[int]:
    return engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


async def collect(engine, request_id, ids, ref, params):
    text, last = "", None
    async for delta in engine.generate(request_id, ids, ref, params):
        text += delta.text
        last = delta
    return text, last


def test_mixed_batch_equals_plain_peft(engine_and_refs, base_model, task_adapters):
    engine, refs, loop = engine_and_refs
    params = SamplingParams(max_tokens=20)
    jobs = [(p, name) for p in PROMPTS for name in (None, "alpha", "beta", "gamma")]

    async def run_all():
        return await asyncio.gather(*[
            collect(engine, f"r{i}", chat_ids(engine, p), refs.get(name) if name else None, params)
            for i, (p, name) in enumerate(jobs)
        ])

    results = loop.run_until_complete(run_all())
    assert engine.batch_size > 1  # they really ran together
    outputs = {job: text for job, (text, _) in zip(jobs, results, strict=True)}
    assert len({outputs[(PROMPTS[0], n)] for n in (None, "alpha", "beta", "gamma")}) > 1  # adapters matter
    for name in (None, "alpha", "beta", "gamma"):
        model = AutoModelForCausalLM.from_pretrained(base_model.path, dtype=torch.float32).eval()
        if name:
            model = PeftModel.from_pretrained(model, str(task_adapters[name])).eval()
        for prompt in PROMPTS:
            ids = chat_ids(engine, prompt)
            out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)
            expected = engine.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
            assert outputs[(prompt, name)] == expected, (prompt, name)


def test_finish_reasons_and_stop(engine_and_refs):
    engine, refs, loop = engine_and_refs
    ids = chat_ids(engine, PROMPTS[0])
    text, last = loop.run_until_complete(collect(engine, "len", ids, None, SamplingParams(max_tokens=3)))
    assert last.finish_reason == "length" and last.completion_tokens == 3
    full, _ = loop.run_until_complete(collect(engine, "full", ids, None, SamplingParams(max_tokens=30)))
    word = full.split()[2]
    cut, last = loop.run_until_complete(
        collect(engine, "stop", ids, None, SamplingParams(max_tokens=30, stop=(word,))))
    assert last.finish_reason == "stop" and word not in cut and full.startswith(cut)


def test_sampling_with_seed_is_reproducible(engine_and_refs):
    engine, refs, loop = engine_and_refs
    ids = chat_ids(engine, PROMPTS[1])
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    a, _ = loop.run_until_complete(collect(engine, "s1", ids, refs["beta"], params))
    b, _ = loop.run_until_complete(collect(engine, "s2", ids, refs["beta"], params))
    assert a == b


def test_abort_frees_the_slot(engine_and_refs):
    engine, refs, loop = engine_and_refs

    async def scenario():
        gen = engine.generate("long", chat_ids(engine, PROMPTS[1]), refs["alpha"], SamplingParams(max_tokens=400))
        await anext(gen)
        assert engine.stats()["running"] == 1
        await gen.aclose()  # the client went away
        for _ in range(100):
            if engine.stats()["running"] == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert loop.run_until_complete(scenario())


def test_scoring_primitives_agree(engine_and_refs):
    engine, refs, loop = engine_and_refs
    ids = chat_ids(engine, PROMPTS[2])
    tokens = [engine.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("lights", "timer", "weather")]
    first = loop.run_until_complete(engine.next_token_logprobs(ids, refs["gamma"], tokens))
    seq = loop.run_until_complete(engine.sequence_logprobs(ids, refs["gamma"], [[t] for t in tokens]))
    assert first == pytest.approx(seq, abs=1e-4)


def test_runtime_add_and_remove(engine_and_refs, base_model, adapter_root):
    from tests.support import make_lora_adapter

    engine, refs, loop = engine_and_refs
    extra = AdapterRef("delta", 1, make_lora_adapter(base_model, adapter_root / "delta-engine", seed=7))
    ids = chat_ids(engine, PROMPTS[0])

    async def scenario():
        running = asyncio.ensure_future(collect(engine, "bg", ids, refs["alpha"], SamplingParams(max_tokens=30)))
        await engine.add_adapter(extra)
        with_extra, _ = await collect(engine, "x", ids, extra, SamplingParams(max_tokens=8))
        await engine.remove_adapter(extra)
        text, last = await running
        return with_extra, last

    with_extra, last = loop.run_until_complete(scenario())
    assert with_extra and last.finish_reason in ("length", "stop")
    assert "delta@1" not in engine.loaded_adapters()


def test_cached_prefix_gives_the_same_logprobs(engine_and_refs):
    from service.routing.router import Router

    engine, refs, loop = engine_and_refs
    router = Router(engine)
    tokens = [engine.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("alpha", "beta", "gamma")]
    for text in ("Turn on the lights", "What is the weather like in Paris tomorrow afternoon?"):
        ids = router.prompt_ids([{"role": "user", "content": text}])
        assert 0 < router.prefix_len() < len(ids)
        plain = loop.run_until_complete(engine.next_token_logprobs(ids, refs["beta"], tokens))
        for _ in range(2):  # a miss that fills the prefix cache, then a hit
            cached = loop.run_until_complete(engine.next_token_logprobs(ids, refs["beta"], tokens, router.prefix_len()))
            assert cached == pytest.approx(plain, abs=1e-4)


COLLIDING_NAMES = ("calendar", "calendar-read", "calendar-write", "light", "lights", "a-rather-long-adapter-name-v2")


def plain_peft_scores(base_model, adapter_path, prompt_ids, answers) -> list[float]:
    """The reference: each whole answer scored with a full forward pass of its own, on plain peft."""
    model = AutoModelForCausalLM.from_pretrained(base_model.path, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(model, str(adapter_path)).eval()
    scores = []
    with torch.no_grad():
        for answer in answers:
            logits = model(input_ids=torch.tensor([[*prompt_ids, *answer]])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            start = len(prompt_ids)
            scores.append(float(sum(logprobs[start - 1 + i, t] for i, t in enumerate(answer))))
    return scores


def test_colliding_names_score_in_one_batched_pass(engine_and_refs, base_model, task_adapters):
    """Names that share tokens or are token prefixes of each other: one forward over the user's part
    of the prompt and the names' prefix tree, and the same totals as scoring every full name on its own."""
    from service.prompts import end_of_turn_id
    from service.routing.router import Router

    engine, refs, loop = engine_and_refs
    router = Router(engine)
    tokens = [engine.tokenizer.encode(n, add_special_tokens=False) for n in COLLIDING_NAMES]
    assert tokens[1][: len(tokens[0])] == tokens[0] and tokens[1][0] == tokens[2][0]  # they do collide
    answers = [router.answer_tokens(n) for n in COLLIDING_NAMES]
    assert all(a[-1] == end_of_turn_id(engine.tokenizer) for a in answers)
    ids = router.prompt_ids([{"role": "user", "content": "what is on my calendar on friday?"}])
    calls: list[int] = []
    hook = engine._model.register_forward_hook(lambda module, args, kwargs: calls.append(1))
    try:
        loop.run_until_complete(router.scores(refs["alpha"], COLLIDING_NAMES, ids))  # fills the prefix cache
        calls.clear()
        batched = loop.run_until_complete(router.scores(refs["alpha"], COLLIDING_NAMES, ids))
    finally:
        hook.remove()
    assert len(calls) == 1  # the user's part of the prompt and every name together
    expected = plain_peft_scores(base_model, task_adapters["alpha"], ids, answers)
    assert batched == pytest.approx(expected, abs=2e-4)
    # adding a colliding name leaves the other names' scores as they were
    fewer = loop.run_until_complete(router.scores(refs["alpha"], COLLIDING_NAMES[3:], ids))
    assert fewer == pytest.approx(batched[3:], abs=2e-4)
