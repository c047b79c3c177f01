"""OpenAI-compatible chat completions and model listing.

`model="auto"` routes with the router LoRA, an adapter's name pins that adapter, the base
model's name uses no adapter. The response's `model` names what actually answered, and the
`X-Loramux-Route` header carries the routing decision."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from service.adapters import AUTO_MODEL
from service.api.common import check_limits, sampling_params, stop_list
from service.api.disconnect import until_done
from service.api.openai.protocol import ChatCompletionRequest, ModelCard, ModelList, NamedToolChoice
from service.api.streaming import route_headers, sse, stream_response
from service.errors import BadRequestError
from service.inference import (
    Choice,
    Deadline,
    Outcome,
    RequestSlot,
    call_format_for,
    choose,
    generate_stream,
    new_request_id,
    prompt_ids,
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
    if isinstance(body.tool_choice, NamedToolChoice) or body.tool_choice == "required":
        # enforcing a call needs constrained decoding, which this service does not do yet: refused,
        # never served as if it were "auto"
        raise BadRequestError("tool_choice 'required' and a named function are not supported yet; use 'auto'",
                              param="tool_choice")
    return tools, [] if body.tool_choice == "none" else names


def _refuse_unsupported(body: ChatCompletionRequest) -> None:
    if body.n != 1:
        raise BadRequestError("only n=1 is supported", param="n")
    if body.logprobs:
        raise BadRequestError("logprobs are not supported", param="logprobs")
    if body.presence_penalty or body.frequency_penalty:
        raise BadRequestError("presence/frequency penalties are not supported", param="presence_penalty")
    extra = body.model_extra or {}
    for name in ("functions", "response_format", "logit_bias", "best_of"):
        if extra.get(name) not in (None, [], {}, "none", "auto") and not (
            name == "response_format" and extra[name] == {"type": "text"}
        ):
            raise BadRequestError(f"'{name}' is not supported", param=name)


async def serve_chat(state: ServiceState, body: ChatCompletionRequest, request: Request):
    _refuse_unsupported(body)
    tools, callable_names = _declared_tools(body)
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise BadRequestError("give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    max_tokens = body.max_completion_tokens or body.max_tokens
    max_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    stop = stop_list(body.stop)
    check_limits(state.settings, body.messages, max_tokens, stop, max_param)
    params = sampling_params(state.settings, max_tokens, body.temperature, body.top_p, stop, body.seed)
    deadline = Deadline.for_request(state)
    slot = RequestSlot(state.ticket())
    handed_over = False  # True once the stream owns the release

    try:
        # images are decoded once admitted, and they, routing and generation share the deadline
        messages = await until_done(request, load_chat_images(
            [m.as_template_dict() for m in body.messages], state.settings, state.engine.image_sizes), deadline)
        images = chat_images(messages)
        choice = slot.choice = await until_done(request, _choice_for_model(state, body.model, messages), deadline)
        ids = prompt_ids(state, messages, choice.adapter, params.max_tokens, "messages", images, tools)
        calls = CallCollector(call_format_for(state, choice.adapter), callable_names)
        request_id = new_request_id("chatcmpl")
        created = int(time.time())
        model = choice.name or model_name(state)
        outcome = Outcome()
        headers = route_headers(choice)
        label = choice.name or "base"

        if not body.stream:
            sent: list[str] = []

            async def run() -> None:
                async for delta in generate_stream(state, ENDPOINT, request_id, ids, choice, params, outcome, images,
                                                   deadline):
                    sent.append(calls.push(delta.text))

            await until_done(request, run())
            held, found = calls.finish()
            message: dict[str, Any] = {"role": "assistant", "content": outcome.text}
            if found:
                if not body.parallel_tool_calls:
                    found = found[:1]
                message = {"role": "assistant", "content": "".join(sent) + held or None,
                           "tool_calls": [call.to_openai() for call in found]}
            response = JSONResponse(
                {
                    "id": request_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": message,
                            "finish_reason": "tool_calls" if found else outcome.finish_reason,
                            "logprobs": None,
                        }
                    ],
                    "usage": outcome.usage(),
                },
                headers=headers,
            )
            state.metrics.requests.labels(ENDPOINT, label, "200").inc()
            return response

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict, finish: str | None, usage: dict | None = None, choices: bool = True) -> str:
            payload = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
                       if choices else []}
            if include_usage:
                payload["usage"] = usage
            return sse(payload)

        async def events() -> AsyncGenerator[str, None]:
            yield chunk({"role": "assistant", "content": ""}, None)
            async for delta in generate_stream(state, ENDPOINT, request_id, ids, choice, params, outcome,
                                               images, deadline):
                text = calls.push(delta.text)
                if text:
                    yield chunk({"content": text}, None)
            held, found = calls.finish()
            if held:
                yield chunk({"content": held}, None)
            if not body.parallel_tool_calls:
                found = found[:1]
            for index, call in enumerate(found):  # as OpenAI streams them: id and name, then the arguments
                yield chunk({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                             "function": {"name": call.name, "arguments": ""}}]}, None)
                yield chunk({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}, None)
            yield chunk({}, "tool_calls" if found else outcome.finish_reason)
            if include_usage:
                yield chunk({}, None, outcome.usage(), choices=False)

        stream = stream_response(state, ENDPOINT, label, events(), slot, headers)
        handed_over = True
        return stream
    finally:
        if not handed_over:
            slot.release()


def model_name(state: ServiceState) -> str:
    return state.settings.base_model_name or state.base.name


async def _choice_for_model(state: ServiceState, model: str, messages: list[dict]) -> Choice:
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
