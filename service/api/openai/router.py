from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.deps import InferenceAuth, State
from service.api.openai.protocol import ChatCompletionRequest, ChatCompletionResponse, ModelList
from service.api.openai.serving import list_models, serve_chat
from service.api.responses import event_stream_response

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[InferenceAuth])


@router.post("/chat/completions", response_model=ChatCompletionResponse,
             summary="OpenAI chat completions; model='auto' routes",
             responses=event_stream_response("The completion; with `stream: true`, chat.completion.chunk events"))
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State):
    return await serve_chat(state, body, request)


@router.get("/models", response_model=ModelList, summary="The base model, 'auto', the router and every adapter")
async def models(state: State) -> dict:
    return list_models(state)
