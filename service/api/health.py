"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.responses import JSONResponse, PlainTextResponse, Response

from service.api.deps import State

router = APIRouter(tags=["health"])


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    status: Literal["ready", "loading", "draining"]
    engine: str
    base_model: str
    adapters_loaded: int
    adapters_failed: int
    building: dict[str, Any] | None = None  # what a live build (loramux demo --serve) has still to register


@router.get("/health", summary="The process is alive", response_model=HealthResponse)
async def health() -> dict:
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="Model and adapters loaded, not shutting down",
    response_model=ReadyResponse,
    # a load balancer reads the status code; the body says why (loading or draining)
    responses={503: {"model": ReadyResponse, "description": "Loading, or draining after SIGTERM"}},
)
async def ready(state: State) -> Response:
    body = {
        "status": "ready" if state.ready and not state.draining else ("draining" if state.draining else "loading"),
        "engine": state.engine.name,
        "base_model": state.base.name,
        "adapters_loaded": len(state.adapters.loaded),
        "adapters_failed": len(state.adapters.failed),
        "building": None if (build := state.build.current()) is None else build.to_json(),
    }
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(state: State) -> Response:
    payload = state.metrics.render(
        state.engine.stats, state.admission.inflight, len(state.adapters.loaded), len(state.adapters.failed)
    )
    return Response(payload, media_type="text/plain; version=0.0.4; charset=utf-8")
