"""Running the app under uvicorn with a graceful drain.

On SIGTERM (or Ctrl+C) the service first stops being ready: /ready fails and new inference
requests get 503, while requests in flight finish, for at most `shutdown_grace_s`. Then uvicorn
shuts down and the process exits 0. A second signal exits at once."""

from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.api.app import create_app
from service.settings import Settings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float):
        super().__init__(config)
        self.app = app
        self.grace_s = grace_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False

    async def serve(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining or self.loop is None:
            self.force_exit = self.draining
            self.should_exit = True
            return
        self.draining = True
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        state = getattr(self.app.state, "service", None)
        if state is not None:
            state.draining = True
            log.info("draining: %d requests in flight, grace %.0fs", state.admission.inflight, self.grace_s)
            try:
                await asyncio.wait_for(state.admission.idle.wait(), timeout=self.grace_s)
            except TimeoutError:
                log.warning("grace period over with %d requests still in flight", state.admission.inflight)
        self.should_exit = True


def run_server(settings: Settings) -> int:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
        access_log=False,
    )
    server = DrainingServer(config, app, settings.shutdown_grace_s)
    server.run()
    return 0
