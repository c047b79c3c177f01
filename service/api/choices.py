"""Several generations for one request, as chat (`n`) and completions (`n`, and a list of prompts)
ask for them: each runs through the one request path (`generate_stream`: adapter hold, deadline,
metrics), all of them at once so the engine batches them, their deltas merged as they come.

A request's route is chosen before this (once per prompt), so its `n` choices are answered by the
same adapter. With a seed, choice `i` draws with `seed + i` (vLLM's rule for its parallel sampling):
the choices differ from each other, the request repeats, and choice 0 is what `n=1` would answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from service.engine.base import SamplingParams, TokenDelta
from service.errors import BadRequestError
from service.inference import Choice, Deadline, Outcome, generate_stream
from service.settings import Settings
from service.state import ServiceState

_INT64 = 2**64


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index`'s sampling: the request's, with `seed + index` (kept within int64) when seeded."""
    if index == 0 or params.seed is None:
        return params
    return replace(params, seed=(params.seed + index + _INT64 // 2) % _INT64 - _INT64 // 2)


def check_choices(settings: Settings, n: int, prompts: int = 1) -> None:
    """At most `LORAMUX_MAX_CHOICES` generations per request (`n` times the prompts): one request
    must not take the whole batch."""
    if n * prompts > settings.max_choices:
        what = "n" if prompts == 1 else "n times the number of prompts"
        raise BadRequestError(f"{what} must be at most {settings.max_choices}", param="n" if prompts == 1 else "prompt")


@dataclass
class Generation:
    """One choice of a request: choice `index` of prompt `prompt_index`, its prompt ids, the route
    chosen for that prompt and its own sampling; `outcome` fills as it runs."""

    index: int
    prompt_index: int
    ids: list[int]
    choice: Choice
    params: SamplingParams
    outcome: Outcome = field(default_factory=Outcome)


def plan(prompts: Sequence[tuple[list[int], Choice]], params: SamplingParams, n: int) -> list[Generation]:
    """`n` generations per prompt, numbered as OpenAI numbers choices (prompt by prompt)."""
    return [Generation(p * n + i, p, ids, choice, choice_params(params, i))
            for p, (ids, choice) in enumerate(prompts) for i in range(n)]


def usage(generations: Sequence[Generation]) -> dict[str, int]:
    """The request's usage: each prompt counted once (as OpenAI and vLLM count it, images as the
    tokens they expand to), every choice's completion tokens summed."""
    prompt = sum({g.prompt_index: g.outcome.prompt_tokens for g in generations}.values())
    completion = sum(g.outcome.completion_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def run_generations(state: ServiceState, endpoint: str, request_id: str, generations: Sequence[Generation],
                          images: Sequence[Any] = (), deadline: Deadline | None = None,
                          param: str = "messages") -> AsyncGenerator[tuple[Generation, TokenDelta], None]:
    """Every generation's deltas, merged in the order they arrive. The adapters stay held until the
    last one ends (each generation releases its route's hold when it ends; its siblings may still
    run). The first error ends them all and is raised; closing this iterator aborts them all."""
    if len(generations) == 1:
        (only,) = generations
        async for delta in generate_stream(state, endpoint, request_id, only.ids, only.choice, only.params,
                                           only.outcome, images, deadline, param):
            yield only, delta
        return
    queue: asyncio.Queue[tuple[Generation, TokenDelta | BaseException | None]] = asyncio.Queue()

    async def pump(generation: Generation) -> None:
        try:
            async for delta in generate_stream(state, endpoint, f"{request_id}-{generation.index}", generation.ids,
                                               generation.choice, generation.params, generation.outcome, images,
                                               deadline, param):
                queue.put_nowait((generation, delta))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the reader, which raises it
            queue.put_nowait((generation, exc))
            return
        queue.put_nowait((generation, None))

    async with contextlib.AsyncExitStack() as holds:
        for choice in {id(g.choice): g.choice for g in generations}.values():
            await holds.enter_async_context(state.adapters.use(choice.adapter))
        tasks = [asyncio.ensure_future(pump(g)) for g in generations]
        try:
            running = len(tasks)
            while running:
                generation, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield generation, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for generation in generations:
                generation.choice.release()
