"""The FastAPI application factory: the same app serves locally (`loramux serve`), in tests and
on Modal (`@modal.asgi_app`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.adapters import AdapterManager
from service.api import health
from service.api.admin.router import router as admin_router
from service.api.completions.router import router as completions_router
from service.api.exceptions import install_exception_handlers
from service.api.generate.router import router as generate_router
from service.api.lora.router import router as lora_router
from service.api.middleware import AuthMiddleware, BodyLimitMiddleware
from service.api.openai.router import router as openai_router
from service.api.request_metrics import RequestMetricsMiddleware
from service.api.responses import ERROR_RESPONSES
from service.api.route.router import router as route_router
from service.base_model import resolve_base_model
from service.build_status import BuildStatusReader, share_cpu_while_building, status_path
from service.engine import create_engine
from service.engine.base import Engine
from service.metrics import Metrics
from service.registry import Registry
from service.request_ids import RequestIdMiddleware, install_log_records
from service.routing.router import Router
from service.settings import Settings
from service.state import Admission, ServiceState

log = logging.getLogger(__name__)


async def build_state(settings: Settings, engine: Engine | None = None) -> ServiceState:
    """Resolve the base model, start the engine, load the registry's adapters."""
    base = await asyncio.to_thread(
        resolve_base_model, settings.base_model, settings.cache_dir, settings.base_model_name
    )
    engine = engine or create_engine(settings, base)
    manager = AdapterManager(settings, base, engine, Registry(settings.registry))
    engine.size_lora(await asyncio.to_thread(manager.registered_ranks))
    await engine.start()
    await manager.start()
    state = ServiceState(
        settings=settings,
        base=base,
        engine=engine,
        adapters=manager,
        router=Router.for_settings(engine, settings),
        # vLLM's own series (its Prometheus stat logger) on the same /metrics, for existing vLLM dashboards
        metrics=Metrics(settings.max_model_len, "vllm:" if engine.name == "vllm" else None),
        admission=Admission(settings.max_queue),
        build=BuildStatusReader(status_path(settings.registry)),
        created=int(time.time()),
    )
    state.cpu_follower = asyncio.create_task(share_cpu_while_building(state.build, engine))
    state.ready = True
    log.info("ready: base model %s, %d adapters loaded, %d failed", base.name, len(manager.loaded),
             len(manager.failed))
    return state


async def close_state(state: ServiceState) -> None:
    state.draining = True
    if state.cpu_follower is not None:
        state.cpu_follower.cancel()
    await state.adapters.stop()
    await state.engine.shutdown()


def create_app(settings: Settings | None = None, state: ServiceState | None = None) -> FastAPI:
    """Build the app. Without `state`, the lifespan builds one from `settings` (and closes it)."""
    settings = settings or (state.settings if state else Settings())
    install_log_records()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state is not None:
            app.state.service = state
            yield
            return
        app.state.service = await build_state(settings)
        try:
            yield
        finally:
            await close_state(app.state.service)

    app = FastAPI(
        title="loramux",
        version="0.1.0",
        description="Many LoRA experts behind one endpoint; a router LoRA picks the expert for each request.",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )
    install_exception_handlers(app)
    for router in (health.router, route_router, generate_router, openai_router, completions_router, admin_router,
                   lora_router):
        app.include_router(router)
    # the last added runs first: request id, the request counter (it sees every status, the guards'
    # too), CORS (it answers preflights, and its headers reach a browser on 401s too), Host and keys,
    # body limits, then routing
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(AuthMiddleware, settings=settings)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "X-Loramux-Adapter", "X-Loramux-Route"])
    app.add_middleware(RequestMetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app
