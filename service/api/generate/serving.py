"""`POST /generate`: route (unless an adapter is pinned), then generate, whole or as SSE."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from starlette.requests import Request
from starlette.responses import JSONResponse

from service.api.common import check_limits, route_info, sampling_params, stop_list
from service.api.disconnect import until_done
from service.api.generate.protocol import GenerateRequest
from service.api.streaming import route_headers, sse, stream_response
from service.inference import (
    Deadline,
    Outcome,
    RequestSlot,
    choose,
    generate_stream,
    new_request_id,
    prompt_ids,
    refuse_certain_overflow,
)
from service.multimodal import chat_images, load_chat_images
from service.state import ServiceState

ENDPOINT = "generate"


async def serve_generate(state: ServiceState, body: GenerateRequest, request: Request):
    started = time.perf_counter()
    stop = stop_list(body.stop)
    check_limits(state.settings, body.messages, body.max_tokens, stop)
    params = body.shape(sampling_params(state.settings, body.max_tokens, body.temperature, body.top_p, stop,
                                        body.seed))
    param = "prompt" if body.prompt is not None else "messages"
    deadline = Deadline.for_request(state)
    with RequestSlot(state.ticket()) as slot:  # released on the way out, unless a stream took it over
        # images are decoded once admitted, and they, routing and generation share the deadline
        messages = await until_done(request, load_chat_images(body.chat(), state.settings, state.engine.image_sizes),
                                    deadline)
        refuse_certain_overflow(state, messages, params.max_tokens, param)  # before routing costs a forward
        # routing is a forward pass too: a client that is gone must not keep the engine busy
        choice = slot.choice = await until_done(request, choose(state, messages, body.adapter), deadline)
        images = chat_images(messages)
        ids = prompt_ids(state, messages, choice.adapter, params.max_tokens, param, images)
        request_id = new_request_id("gen")
        outcome = Outcome()
        route_ms = choice.decision.latency_ms if choice.decision else 0.0
        headers = route_headers(choice)

        def body_of() -> dict:
            outcome.timings["route_ms"] = route_ms
            outcome.timings["total_ms"] = (time.perf_counter() - started) * 1000
            return {
                "text": outcome.text,
                "adapter": choice.name,
                "version": choice.version,
                "finish_reason": outcome.finish_reason,
                "usage": outcome.usage(),
                "routing": route_info(choice),
                "timings": {k: round(v, 3) for k, v in outcome.timings.items()},
            }

        if not body.stream:
            async def run() -> None:
                async for _ in generate_stream(state, ENDPOINT, request_id, ids, choice, params, outcome, images,
                                               deadline, param):
                    pass

            await until_done(request, run())
            response = JSONResponse(body_of(), headers=headers)
            return response

        async def events() -> AsyncGenerator[str, None]:
            async for delta in generate_stream(state, ENDPOINT, request_id, ids, choice, params, outcome,
                                               images, deadline, param):
                if delta.text:
                    yield sse({"text": delta.text, "completion_tokens": delta.completion_tokens})
            yield sse(body_of())

        return stream_response(state, ENDPOINT, events(), slot, headers)
