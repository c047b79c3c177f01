"""The embedded engine on the real model: mixed-adapter batches give exactly what plain
`PeftModel` gives for each adapter, aborts free their slot, adapters come and go at runtime."""

from __future__ import annotations

import asyncio
from dataclasses import replace

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
    """The stop string is taken from the same request's own output without it (so it would have
    appeared): with it, the text is exactly what came before its first occurrence, finish "stop"."""
    engine, refs, loop = engine_and_refs
    ids = chat_ids(engine, PROMPTS[0])
    text, last = loop.run_until_complete(collect(engine, "len", ids, None, SamplingParams(max_tokens=3)))
    assert last.finish_reason == "length" and last.completion_tokens == 3
    full, whole = loop.run_until_complete(collect(engine, "full", ids, None, SamplingParams(max_tokens=30)))
    word = full.split()[2]
    cut, last = loop.run_until_complete(
        collect(engine, "stop", ids, None, SamplingParams(max_tokens=30, stop=(word,))))
    assert last.finish_reason == "stop" and cut == full[: full.index(word)]
    assert last.completion_tokens < whole.completion_tokens  # it ended there, not at max_tokens


async def collect_ids(engine, request_id, ids, ref, params) -> list[int]:
    return [t async for delta in engine.generate(request_id, ids, ref, params) for t in delta.token_ids]


def test_seeded_sampling_differs_from_greedy_and_repeats_in_another_batch(engine_and_refs):
    """Temperature must matter (a seeded sample is not the greedy answer), the seed must matter (two
    seeds differ), and nothing else may: the same seed alone and in a batch beside other sampled,
    unseeded and greedy requests on other adapters gives the same tokens (each row its own generator)."""
    engine, refs, loop = engine_and_refs
    ids = chat_ids(engine, PROMPTS[1])
    seeded = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=1234)
    run = loop.run_until_complete
    greedy = run(collect_ids(engine, "s-greedy", ids, refs["beta"], SamplingParams(max_tokens=8)))
    alone = run(collect_ids(engine, "s-alone", ids, refs["beta"], seeded))
    other_seed = run(collect_ids(engine, "s-other", ids, refs["beta"], replace(seeded, seed=4321)))
    assert alone != greedy and other_seed != greedy and alone != other_seed

    async def in_a_batch() -> tuple[list[int], int]:
        neighbours = [
            asyncio.ensure_future(collect_ids(engine, f"s-n{i}", chat_ids(engine, PROMPTS[i]), refs[name], params))
            for i, (name, params) in enumerate([
                ("alpha", SamplingParams(max_tokens=12, temperature=1.0, seed=1234)),  # same seed, other row
                ("gamma", SamplingParams(max_tokens=12, temperature=0.7)),
                ("beta", SamplingParams(max_tokens=12)),
            ])
        ]
        await asyncio.sleep(0)  # the neighbours are queued first
        stream = engine.generate("s-batched", ids, refs["beta"], seeded)
        first = await anext(stream)
        running = engine.stats()["running"]
        tokens = [*first.token_ids, *[t async for delta in stream for t in delta.token_ids]]
        await asyncio.gather(*neighbours)
        return tokens, running

    batched, running = run(in_a_batch())
    assert running > 1  # it really shared its steps
    assert batched == alone


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


def test_work_that_holds_the_engine_thread_is_logged_with_what_it_was(engine_and_refs, base_model, adapter_root,
                                                                     monkeypatch, caplog):
    """Everything on the engine thread holds up every running generation: the log says what held it
    (a load, a routing prompt, a prefill and the batch it joined), so an operator can tell why streams
    paused. With the threshold at 0 every piece of work is over it."""
    from service.engine import embedded
    from tests.support import make_lora_adapter

    engine, refs, loop = engine_and_refs
    extra = AdapterRef("epsilon", 1, make_lora_adapter(base_model, adapter_root / "epsilon-engine", seed=8))
    monkeypatch.setattr(embedded, "SLOW_WORK_S", 0.0)
    caplog.set_level("WARNING", logger="service.engine.embedded")
    ids = chat_ids(engine, PROMPTS[0])

    async def scenario() -> None:
        await engine.add_adapter(extra)
        await collect(engine, "held", ids, refs["alpha"], SamplingParams(max_tokens=3))
        await engine.sequence_logprobs(ids, refs["alpha"], [[5], [6, 7]])
        await engine.remove_adapter(extra)

    loop.run_until_complete(scenario())
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine thread busy")]
    assert any(m.endswith("load epsilon@1") for m in said), said
    assert any(m.endswith("unload epsilon@1") for m in said), said
    assert any(f"prefill of 1 rows, {len(ids)} prompt tokens; decode of 1 rows" in m for m in said), said
    assert any(m.endswith(f"route {len(ids)} prompt tokens over 2 names") for m in said), said


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


def test_requests_joining_mid_decode_equal_plain_peft(engine_and_refs, base_model, task_adapters):
    """Joins forced by the order of events, not by timing: B is submitted once A's stream has
    produced JOIN tokens, C once it has produced 2 * JOIN. B's prompt is longer than A's cache then
    (the running rows get left-padded), C's shorter (C gets padded), each on another adapter. Every
    greedy answer must be plain peft's `generate` for that request alone, token for token."""
    engine, refs, loop = engine_and_refs
    join, max_tokens = 3, 20
    params = SamplingParams(max_tokens=max_tokens)
    prompts = {"a": PROMPTS[1], "b": PROMPTS[3] + " Also, what should I cook with the pasta?", "c": "Hi"}
    adapters = {"a": "alpha", "b": "beta", "c": None}
    ids = {key: chat_ids(engine, text) for key, text in prompts.items()}
    assert len(ids["b"]) > len(ids["a"]) + join and len(ids["c"]) < len(ids["a"])

    async def scenario() -> tuple[dict[str, list[int]], list[int]]:
        tokens: dict[str, list[int]] = {"a": []}
        joined: dict[str, asyncio.Future] = {}
        running_at_join: list[int] = []

        async def late(key: str) -> list[int]:
            stream = engine.generate(f"join-{key}", ids[key], refs.get(adapters[key] or ""), params)
            first = await anext(stream)
            running_at_join.append(engine.stats()["running"])
            return [*first.token_ids, *[t async for delta in stream for t in delta.token_ids]]

        async for delta in engine.generate("join-a", ids["a"], refs["alpha"], params):
            tokens["a"].extend(delta.token_ids)
            for key, after in (("b", join), ("c", 2 * join)):
                if len(tokens["a"]) >= after and key not in joined:
                    joined[key] = asyncio.ensure_future(late(key))
        for key, future in joined.items():
            tokens[key] = await future
        return tokens, running_at_join

    tokens, running_at_join = loop.run_until_complete(scenario())
    assert all(n >= 2 for n in running_at_join), running_at_join  # each joined while A was decoding

    model = AutoModelForCausalLM.from_pretrained(base_model.path, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(model, str(task_adapters["alpha"]), adapter_name="alpha").eval()
    model.load_adapter(str(task_adapters["beta"]), adapter_name="beta")
    for key, name in adapters.items():
        prompt = torch.tensor([ids[key]])
        with torch.no_grad():
            if name is None:
                with model.disable_adapter():
                    out = model.generate(prompt, max_new_tokens=max_tokens, do_sample=False)
            else:
                model.set_adapter(name)
                out = model.generate(prompt, max_new_tokens=max_tokens, do_sample=False)
        assert tokens[key] == out[0, len(ids[key]):].tolist(), key
    assert len(tokens["a"]) == max_tokens  # A outlived both joins (no early end of sequence)


def test_an_adapter_the_engine_refuses_leaves_no_trace(base_model, task_adapters, tmp_path):
    """The engine checks the tensors it will run (an adapter whose files changed after validation):
    a refused one installs nothing, neither as the first adapter of an engine (it would act in the
    base model's own answers) nor next to others (whose answers it would change)."""
    import shutil

    from service.engine.errors import AdapterRefusedError
    from tests.support import make_wrong_shape

    shutil.copytree(task_adapters["alpha"], tmp_path / "wrong")
    make_wrong_shape(tmp_path / "wrong")  # engines are given validated adapters; this one skips validation
    wrong = [AdapterRef("wrong", version, tmp_path / "wrong") for version in (1, 2)]
    alpha = AdapterRef("alpha", 1, task_adapters["alpha"])
    engine = EmbeddedEngine(Settings(cache_dir=tmp_path / "cache"), base_model)
    loop = asyncio.new_event_loop()
    params = SamplingParams(max_tokens=12)
    try:
        loop.run_until_complete(engine.start())
        ids = chat_ids(engine, PROMPTS[2])
        base_before, _ = loop.run_until_complete(collect(engine, "b0", ids, None, params))
        with pytest.raises(AdapterRefusedError, match="failed to load"):
            loop.run_until_complete(engine.add_adapter(wrong[0]))
        assert loop.run_until_complete(collect(engine, "b1", ids, None, params))[0] == base_before
        loop.run_until_complete(engine.add_adapter(alpha))
        alpha_before, _ = loop.run_until_complete(collect(engine, "a0", ids, alpha, params))
        with pytest.raises(AdapterRefusedError, match="failed to load"):
            loop.run_until_complete(engine.add_adapter(wrong[1]))
        assert loop.run_until_complete(collect(engine, "a1", ids, alpha, params))[0] == alpha_before
        assert loop.run_until_complete(collect(engine, "b2", ids, None, params))[0] == base_before
        assert engine.loaded_adapters() == ["alpha@1"]
    finally:
        loop.run_until_complete(engine.shutdown())
        loop.close()
