from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.completions.protocol import CompletionRequest, CompletionResponse
from service.api.completions.serving import serve_completion
from service.api.deps import InferenceAuth, State
from service.api.responses import event_stream_response

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[InferenceAuth])


@router.post("/completions", response_model=CompletionResponse,
             summary="OpenAI completions: the prompt as it is, no chat template; model='auto' routes",
             responses=event_stream_response("The completion; with `stream: true`, text_completion events"))
async def completions(body: CompletionRequest, request: Request, state: State):
    return await serve_completion(state, body, request)
