"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import JSONResponse, Response

from service.api.deps import State

router = APIRouter(tags=["health"])


@router.get("/health", summary="The process is alive")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", summary="Model and adapters loaded, not shutting down")
async def ready(state: State) -> Response:
    body = {
        "status": "ready" if state.ready and not state.draining else ("draining" if state.draining else "loading"),
        "engine": state.engine.name,
        "base_model": state.base.name,
        "adapters_loaded": len(state.adapters.loaded),
        "adapters_failed": len(state.adapters.failed),
    }
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(state: State) -> Response:
    payload = state.metrics.render(
        state.engine.stats, state.admission.inflight, len(state.adapters.loaded), len(state.adapters.failed)
    )
    return Response(payload, media_type="text/plain; version=0.0.4; charset=utf-8")
