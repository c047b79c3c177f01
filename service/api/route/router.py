from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.deps import InferenceAuth, State
from service.api.generate.protocol import PromptOrMessages, RouteResponse
from service.api.route.serving import serve_route

router = APIRouter(tags=["inference"], dependencies=[InferenceAuth])


@router.post("/route", response_model=RouteResponse, summary="Which adapter would answer this request")
async def route_endpoint(body: PromptOrMessages, request: Request, state: State) -> dict:
    return await serve_route(state, body, request)
