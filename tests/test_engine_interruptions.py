"""A generation the engine cuts short ends the same way on both engines (issue 13, item 8).

Its adapter unloaded while it runs, or the request aborted: the stream raises
`GenerationInterruptedError` (503, Retry-After), on the embedded engine here and on vLLM in
`test_vllm_engine.py` (same scenario, `interruptions`). Never a finish reason: vLLM ended such a
request with finish reason "abort", which the OpenAI API has no value for and which reached OpenAI
responses; the embedded engine raised a 500 for the removal and, for an explicit abort, left the
stream waiting for ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from service.engine.base import AdapterRef, SamplingParams
from service.engine.embedded import EmbeddedEngine
from service.engine.errors import GenerationInterruptedError
from service.errors import from_engine
from service.settings import Settings

pytestmark = pytest.mark.slow

LONG = SamplingParams(max_tokens=400, temperature=2.0, seed=3)


def chat_ids(engine: Any, prompt: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)


async def interruptions(engine: Any, ref: AdapterRef) -> list[tuple[str, int, int]]:
    """(how it was cut, the error's status, tokens seen) for a removal of the adapter mid-generation
    and an explicit abort; `ref` is loaded first and is gone afterwards."""
    out = []
    for how in ("adapter removed", "aborted"):
        await engine.add_adapter(ref)
        request_id = f"cut-{how.replace(' ', '-')}"
        stream = engine.generate(request_id, chat_ids(engine, "Tell a very long story."), ref, LONG)
        seen = (await anext(stream)).completion_tokens
        if how == "aborted":
            await engine.abort(request_id)
        else:
            await engine.remove_adapter(ref)
        with pytest.raises(GenerationInterruptedError) as raised:
            async with asyncio.timeout(60):  # never a hang
                async for delta in stream:
                    assert delta.finish_reason in (None, "stop", "length")
                    seen = delta.completion_tokens
        assert seen < LONG.max_tokens
        served = from_engine(raised.value)  # what a client gets: the status and header the API sends
        out.append((how, served.status_code, served.headers.get("Retry-After") is not None))
    await engine.remove_adapter(ref)
    return out


EXPECTED = [("adapter removed", 503, True), ("aborted", 503, True)]


@pytest.fixture(scope="module")
def embedded(base_model, tmp_path_factory) -> Iterator[tuple[EmbeddedEngine, asyncio.AbstractEventLoop]]:
    engine = EmbeddedEngine(Settings(cache_dir=tmp_path_factory.mktemp("cache")), base_model)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    yield engine, loop
    loop.run_until_complete(engine.shutdown())
    loop.close()


def test_the_embedded_engine_ends_a_cut_generation_with_an_interruption(embedded, task_adapters):
    engine, loop = embedded
    ref = AdapterRef("cut", 1, task_adapters["alpha"])
    assert loop.run_until_complete(interruptions(engine, ref)) == EXPECTED
    assert engine.stats()["running"] == 0


def test_shutdown_ends_every_queued_command(base_model, task_adapters, tmp_path_factory):
    """Adapter loads and removals and scoring calls queued for the engine thread while it decodes, when
    the shutdown begins, and others sent while it runs and after it: each one completes or raises,
    none waits for ever (a caller awaiting a command the stopped thread never runs would hang its
    request, and the server's own shutdown with it)."""
    engine = EmbeddedEngine(Settings(cache_dir=tmp_path_factory.mktemp("cache")), base_model)
    loop = asyncio.new_event_loop()
    alpha, beta = AdapterRef("alpha", 1, task_adapters["alpha"]), AdapterRef("beta", 1, task_adapters["beta"])

    def commands(ids: list[int]) -> list[Any]:
        return [engine.add_adapter(beta), engine.next_token_logprobs(ids, alpha, [1, 2]),
                engine.sequence_logprobs(ids, None, [[1], [2, 3]]), engine.remove_adapter(alpha)]

    async def scenario() -> tuple[list[Any], BaseException | None]:
        await engine.start()
        await engine.add_adapter(alpha)
        ids = chat_ids(engine, "Tell a very long story.")
        stream = engine.generate("busy", ids, alpha, LONG)
        await anext(stream)  # the thread is decoding: commands wait for the end of its step
        queued = [asyncio.ensure_future(c) for c in commands(ids)]
        await asyncio.sleep(0)  # all four are queued...
        stopping = asyncio.ensure_future(engine.shutdown())  # ...when the shutdown begins
        await asyncio.sleep(0)
        during = [asyncio.ensure_future(c) for c in commands(ids)]
        await stopping
        after = [asyncio.ensure_future(c) for c in commands(ids)]
        futures = [*queued, *during, *after]
        await asyncio.wait(futures, timeout=20)  # one deadline for all: a hang costs 20 s, not 20 s each
        outcomes = [("hung" if not f.done() else f.exception() or f.result()) for f in futures]
        try:
            async with asyncio.timeout(20):
                async for _ in stream:
                    pass
            ended = None
        except BaseException as exc:
            ended = exc
        return outcomes, ended

    try:
        outcomes, ended = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert "hung" not in outcomes, outcomes
    assert isinstance(ended, GenerationInterruptedError), ended  # the running generation is told, too
