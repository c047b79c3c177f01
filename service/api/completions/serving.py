"""OpenAI completions (`POST /v1/completions`): the prompt tokenized as it is, no chat template.

Each prompt is routed like a chat of one user message with that text (`model="auto"`), or served by
the adapter or base model named; its `n` choices and every other prompt's run at once
(`service.api.choices`), under the request's one admission ticket and deadline, whole or streamed
through the one streaming path. `response_format` and vLLM's structured-output fields constrain every
choice, as in chat (`service.api.structured`). Choices are numbered prompt by prompt, as OpenAI numbers them."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from service.adapters import AUTO_MODEL
from service.api.choices import Generation, check_choices, plan, run_generations, usage
from service.api.common import check_limits, stop_list
from service.api.completions.protocol import CompletionRequest
from service.api.disconnect import until_done
from service.api.extra_fields import check_extra_fields
from service.api.logprobs import TokenText, completion_logprobs, next_offset
from service.api.openai.serving import choice_for_model, model_name
from service.api.streaming import header_value, route_headers, sse, stream_response
from service.api.structured import constrained, structured_output
from service.engine.base import TokenDelta
from service.inference import Choice, Deadline, RequestSlot, new_request_id, raw_prompt_ids
from service.state import ServiceState

ENDPOINT = "completions"
PARAM = "prompt"


class _CompletionChoice:
    """One choice as it is built: the text before the answer (the prompt, with `echo`), and the
    logprobs not sent yet with their text offset."""

    def __init__(self, generation: Generation, echo: str, tokens: TokenText | None):
        self.generation = generation
        self.echo = echo
        self.tokens = tokens
        self.pending: list[Any] = []
        self.offset = len(echo)

    def push(self, delta: TokenDelta) -> None:
        self.pending += delta.logprobs

    def take_logprobs(self) -> dict[str, Any] | None:
        if self.tokens is None:
            return None
        block = completion_logprobs(self.tokens, self.pending, self.offset)
        self.pending, self.offset = [], next_offset(block, self.offset)
        return block

    def whole(self) -> dict[str, Any]:
        outcome = self.generation.outcome
        return {"index": self.generation.index, "text": self.echo + outcome.text, "logprobs": self.take_logprobs(),
                "finish_reason": outcome.finish_reason}


async def serve_completion(state: ServiceState, body: CompletionRequest, request: Request):
    check_extra_fields(body.model_extra, ENDPOINT, {"add_special_tokens": (None, True)})
    body.refuse_unsupported()
    check_limits(state.settings, None, body.max_tokens, stop_list(body.stop))
    prompts = body.prompts()
    check_choices(state.settings, body.n, len(prompts))
    params = body.to_sampling_params(state.settings)
    structured = await structured_output(body)
    if structured is not None:
        params = constrained(params, structured)
    deadline = Deadline.for_request(state)
    with RequestSlot(state.ticket()) as slot:  # released on the way out, unless a stream took it over
        ids = [raw_prompt_ids(state, prompt, params.max_tokens, PARAM) for prompt in prompts]
        tokenizer = state.engine.tokenizer
        texts = [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        choices: list[Choice] = []
        for text in texts:  # each prompt is routed on its own text, as a chat of one user message
            choice = await until_done(request, choice_for_model(state, body.model, [{"role": "user", "content": text}]),
                                      deadline)
            if slot.choice is None:
                slot.choice = choice
            else:
                slot.more.append(choice)
            choices.append(choice)
        generations = plan(list(zip(ids, choices, strict=True)), params, body.n)
        tokens = TokenText(tokenizer) if body.logprobs is not None else None
        built = [_CompletionChoice(g, texts[g.prompt_index] if body.echo else "", tokens) for g in generations]
        request_id = new_request_id("cmpl")
        created = int(time.time())
        model, headers = _answered_by(state, body.model, choices)

        def deltas() -> AsyncGenerator[tuple[Generation, TokenDelta], None]:
            return run_generations(state, ENDPOINT, request_id, generations, (), deadline, PARAM)

        if not body.stream:
            async def run() -> None:
                async with contextlib.aclosing(deltas()) as stream:
                    async for generation, delta in stream:
                        built[generation.index].push(delta)

            await until_done(request, run())
            return JSONResponse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                                 "choices": [c.whole() for c in built], "usage": usage(generations)},
                                headers=headers)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index: int, text: str, logprobs: dict | None, finish: str | None = None,
                  usage_now: dict | None = None) -> str:
            payload: dict[str, Any] = {
                "id": request_id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
            if include_usage:
                payload["usage"] = usage_now
            return sse(payload)

        async def events() -> AsyncGenerator[str, None]:
            for built_choice in built:
                if built_choice.echo:
                    yield chunk(built_choice.generation.index, built_choice.echo, None)
            async with contextlib.aclosing(deltas()) as stream:
                async for generation, delta in stream:
                    built_choice = built[generation.index]
                    built_choice.push(delta)
                    if delta.text:
                        yield chunk(generation.index, delta.text, built_choice.take_logprobs())
                    if delta.finish_reason:
                        yield chunk(generation.index, "", built_choice.take_logprobs(), delta.finish_reason)
            if include_usage:
                yield sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                           "choices": [], "usage": usage(generations)})

        return stream_response(state, ENDPOINT, events(), slot, headers)


def _answered_by(state: ServiceState, asked: str, choices: list[Choice]) -> tuple[str, dict[str, str]]:
    """The response's `model` and its headers: the adapter that answered (its
    routing decision in `X-Loramux-Route`), or, when a list of routed prompts went to different
    ones, `auto` and each prompt's adapter in order in `X-Loramux-Adapter`."""
    names = {choice.name for choice in choices}
    if len(names) == 1:
        name = choices[0].name
        return name or model_name(state), route_headers(choices[0])
    adapters = ",".join(f"{c.name}@{c.version}" if c.name else "base" for c in choices)
    return AUTO_MODEL if asked == AUTO_MODEL else asked, {"X-Loramux-Adapter": header_value(adapters)}
