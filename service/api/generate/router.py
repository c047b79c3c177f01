from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.deps import InferenceAuth, State
from service.api.generate.protocol import GenerateRequest, GenerateResponse
from service.api.generate.serving import serve_generate
from service.api.responses import event_stream_response

router = APIRouter(tags=["inference"], dependencies=[InferenceAuth])


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses=event_stream_response("The generation; with `stream: true`, SSE text deltas, the response, [DONE]"),
    summary="Generate with an adapter (routed when none is named); `stream` for SSE",
)
async def generate_endpoint(body: GenerateRequest, request: Request, state: State):
    return await serve_generate(state, body, request)
