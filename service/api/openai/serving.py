"""OpenAI-compatible chat completions and model listing.

`model="auto"` routes with the router LoRA, an adapter's name pins that adapter, the base
model's name uses no adapter. The response's `model` names what actually answered, and the
`X-Loramux-Route` header carries the routing decision."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from service.adapters import AUTO_MODEL
from service.api.choices import Generation, check_choices, plan, run_generations, usage
from service.api.common import check_limits, sampling_params, stop_list
from service.api.disconnect import until_done
from service.api.extra_fields import check_extra_fields
from service.api.logprobs import TokenText, chat_content
from service.api.openai.protocol import ChatCompletionRequest, ModelCard, ModelList, NamedToolChoice
from service.api.streaming import route_headers, sse, stream_response
from service.api.structured import constrained, forced_tool_call, structured_output
from service.engine.base import TokenDelta
from service.errors import BadRequestError
from service.inference import (
    Choice,
    Deadline,
    RequestSlot,
    call_format_for,
    choose,
    new_request_id,
    prompt_ids,
    refuse_certain_overflow,
)
from service.multimodal import chat_images, load_chat_images
from service.state import ServiceState
from service.tool_calls import CallCollector

ENDPOINT = "chat_completions"


def _declared_tools(body: ChatCompletionRequest) -> tuple[list[dict[str, Any]] | None, list[str]]:
    """The tools to show the model, and the names whose calls become `tool_calls` (none with
    `tool_choice: "none"`: the model still sees the tools, as with vLLM, but answers in text)."""
    if not body.tools:
        if isinstance(body.tool_choice, NamedToolChoice) or body.tool_choice == "required":
            raise BadRequestError("tool_choice needs tools", param="tool_choice")
        return None, []
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    names = [tool.function.name for tool in body.tools]
    if len(set(names)) != len(names):
        raise BadRequestError("tool names must be unique", param="tools")
    return tools, [] if body.tool_choice == "none" else names


def _forced_tools(body: ChatCompletionRequest) -> list[str] | None:
    """The tools one of which the answer must call (`tool_choice` "required": any declared tool; a
    named function: that one), enforced by structured output; None when the model may answer text."""
    if body.tool_choice == "required":
        return [tool.function.name for tool in body.tools or []]
    if isinstance(body.tool_choice, NamedToolChoice):
        name = body.tool_choice.function.name
        if name not in {tool.function.name for tool in body.tools or []}:
            raise BadRequestError(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return [name]
    return None


def _refuse_unsupported(body: ChatCompletionRequest) -> int | None:
    """Check the fields this endpoint does not declare, and logprobs; the number of top tokens to
    report per token (None: no logprobs)."""
    check_extra_fields(body.model_extra, ENDPOINT)
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


class _ChatChoice:
    """One choice as it is built: its text through its own tool-call collector, and the logprobs
    not sent yet (a stream sends them with the next text, so they arrive in order and none is lost
    to text held back)."""

    def __init__(self, generation: Generation, calls: CallCollector, tokens: TokenText | None):
        self.generation = generation
        self.calls = calls
        self.tokens = tokens
        self.sent: list[str] = []
        self.logprobs: list[dict[str, Any]] = []

    def push(self, delta: TokenDelta) -> str:
        if self.tokens is not None:
            self.logprobs += chat_content(self.tokens, delta.logprobs)
        text = self.calls.push(delta.text)
        self.sent.append(text)
        return text

    def take_logprobs(self) -> dict[str, Any] | None:
        if self.tokens is None:
            return None
        content, self.logprobs = self.logprobs, []
        return {"content": content}

    def finish(self, parallel: bool) -> tuple[str, list[Any]]:
        held, found = self.calls.finish()
        return held, found if parallel else found[:1]

    def message(self, parallel: bool) -> dict[str, Any]:
        held, found = self.finish(parallel)
        outcome = self.generation.outcome
        message: dict[str, Any] = {"role": "assistant", "content": outcome.text}
        if found:
            message = {"role": "assistant", "content": "".join(self.sent) + held or None,
                       "tool_calls": [call.to_openai() for call in found]}
        return {"index": self.generation.index, "message": message,
                "finish_reason": "tool_calls" if found else outcome.finish_reason, "logprobs": self.take_logprobs()}


async def serve_chat(state: ServiceState, body: ChatCompletionRequest, request: Request):
    top_logprobs = _refuse_unsupported(body)
    tools, callable_names = _declared_tools(body)
    forced = _forced_tools(body)
    structured = await structured_output(body)
    if forced is not None and structured is not None:
        raise BadRequestError(f"a forced tool call (tool_choice) and {structured.param} cannot both constrain "
                              "the answer", param="tool_choice")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise BadRequestError("give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    max_tokens = body.max_completion_tokens or body.max_tokens
    max_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    stop = stop_list(body.stop)
    check_limits(state.settings, body.messages, max_tokens, stop, max_param)
    check_choices(state.settings, body.n)
    params = body.shape(sampling_params(state.settings, max_tokens, body.temperature, body.top_p, stop, body.seed),
                        top_logprobs)
    if structured is not None:
        params = constrained(params, structured)
    deadline = Deadline.for_request(state)
    with RequestSlot(state.ticket()) as slot:  # released on the way out, unless a stream took it over
        # images are decoded once admitted, and they, routing and generation share the deadline
        messages = await until_done(request, load_chat_images(
            [m.as_template_dict() for m in body.messages], state.settings, state.engine.image_sizes), deadline)
        images = chat_images(messages)
        refuse_certain_overflow(state, messages, params.max_tokens, "messages")  # before routing costs a forward
        choice = slot.choice = await until_done(request, choice_for_model(state, body.model, messages), deadline)
        ids = prompt_ids(state, messages, choice.adapter, params.max_tokens, "messages", images, tools)
        call_format = call_format_for(state, choice.adapter)
        if forced is not None and tools is not None:  # a call in the answering adapter's format (none: json)
            call_format = "json" if call_format == "none" else call_format
            params = constrained(params, await forced_tool_call(tools, forced, call_format,
                                                                body.parallel_tool_calls))
        generations = plan([(ids, choice)], params, body.n)
        tokens = TokenText(state.engine.tokenizer) if top_logprobs is not None else None
        built = [_ChatChoice(g, CallCollector(call_format, callable_names), tokens) for g in generations]
        request_id = new_request_id("chatcmpl")
        created = int(time.time())
        model = choice.name or model_name(state)
        headers = route_headers(choice)

        def deltas() -> AsyncGenerator[tuple[Generation, TokenDelta], None]:
            return run_generations(state, ENDPOINT, request_id, generations, images, deadline)

        if not body.stream:
            async def run() -> None:
                async with contextlib.aclosing(deltas()) as stream:
                    async for generation, delta in stream:
                        built[generation.index].push(delta)

            await until_done(request, run())
            return JSONResponse(
                {
                    "id": request_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [c.message(body.parallel_tool_calls) for c in built],
                    "usage": usage(generations),
                },
                headers=headers,
            )

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> str:
            payload: dict[str, Any] = {
                "id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}
            if include_usage:
                payload["usage"] = None
            return sse(payload)

        def ending(built_choice: _ChatChoice) -> list[str]:
            index = built_choice.generation.index
            held, found = built_choice.finish(body.parallel_tool_calls)
            out = [chunk(index, {"content": held}, None, built_choice.take_logprobs())] if held else []
            for number, call in enumerate(found):  # as OpenAI streams them: id and name, then the arguments
                out.append(chunk(index, {"tool_calls": [{"index": number, "id": call.id, "type": "function",
                                                         "function": {"name": call.name, "arguments": ""}}]}))
                out.append(chunk(index, {"tool_calls": [{"index": number, "function": {"arguments": call.arguments}}]}))
            finish = "tool_calls" if found else built_choice.generation.outcome.finish_reason
            out.append(chunk(index, {}, finish, built_choice.take_logprobs()))
            return out

        async def events() -> AsyncGenerator[str, None]:
            for built_choice in built:
                yield chunk(built_choice.generation.index, {"role": "assistant", "content": ""})
            async with contextlib.aclosing(deltas()) as stream:
                async for generation, delta in stream:
                    built_choice = built[generation.index]
                    text = built_choice.push(delta)
                    if text:
                        yield chunk(generation.index, {"content": text}, None, built_choice.take_logprobs())
                    if delta.finish_reason:
                        for event in ending(built_choice):
                            yield event
            if include_usage:
                yield sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": usage(generations)})

        return stream_response(state, ENDPOINT, events(), slot, headers)


def model_name(state: ServiceState) -> str:
    return state.settings.base_model_name or state.base.name


async def choice_for_model(state: ServiceState, model: str, messages: list[dict]) -> Choice:
    """What an OpenAI `model` asks for (chat and completions alike): `auto` routes on the messages,
    the base model's name uses no adapter, any other name pins that adapter."""
    if model == AUTO_MODEL:
        return await choose(state, messages, None, "model")
    if model == model_name(state):
        return Choice(None)
    return await choose(state, messages, model, "model")


def list_models(state: ServiceState) -> dict:
    """The adapter manager's served models as OpenAI model cards, then the names a live builder is
    still training (`status: "building"`: asking for one is a 503 with Retry-After, not a 404)."""
    cards = [ModelCard(id=m.id, created=state.created, root=m.root, parent=m.parent, max_model_len=m.max_model_len,
                       tools=list(m.tools) if m.tool_call_format else None, tool_call_format=m.tool_call_format)
             for m in state.adapters.models(model_name(state))]
    building = state.build.current()
    if building is not None:
        listed = {card.id for card in cards}
        coming = list(building.pending)
        if any(p.kind == "router" for p in building.pending.values()):
            coming.insert(0, AUTO_MODEL)  # routed requests wait for the router
        cards += [ModelCard(id=name, created=state.created, root=name, parent=model_name(state), status="building")
                  for name in coming if name not in listed]
    return ModelList(data=cards).model_dump()
