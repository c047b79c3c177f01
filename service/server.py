"""Running the app under uvicorn with a graceful drain.

On SIGTERM (or Ctrl+C) the service first stops being ready: /ready fails and new inference
requests get 503, while requests in flight finish, for at most `shutdown_grace_s`. Then uvicorn
shuts down and the process exits 0. A second signal exits at once.

Connections are limited before any request reaches the app, with uvicorn's own limits set from the
settings: at most `max_connections` (uvicorn answers 503 beyond them), idle keep-alive connections
closed after `keep_alive_timeout_s`, request heads at most `max_header_bytes` (h11 answers 400).
uvicorn has no limit on how long a request head may take to arrive, so a client sending one header
line a minute (slowloris) would hold a connection, and with `max_connections` every client's, for
ever: `HeaderTimeoutH11Protocol` closes a connection whose request head is not complete
`header_timeout_s` after its first byte (or after the connection opened). Each connection's send
buffers are fixed at `send_buffer_bytes` (Linux would otherwise grow the kernel's up to 4 MiB)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from types import FrameType

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.api.app import create_app
from service.settings import Settings

log = logging.getLogger(__name__)


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head (see the module docstring)."""

    header_timeout_s = 10.0

    send_buffer_bytes = 65536

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # a fixed send buffer (no autotuning up to tcp_wmem's 4 MiB): a client that stops reading pins a
        # bounded amount of memory, and its stream's sends wait after that much instead of after megabytes
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)
        transport.set_write_buffer_limits(high=self.send_buffer_bytes)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if self._between_requests():
            self._arm_head_timer()  # the first byte of a request (the timer runs from there)
        super().data_received(data)
        if not self._between_requests():
            self._disarm_head_timer()  # the head is in: the request's own limits apply from here

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._between_requests() and not self.transport.is_closing():
            log.info("closing a connection whose request head did not arrive within %gs", self.header_timeout_s)
            self.conn.send(h11.ConnectionClosed())
            self.transport.close()


def http_protocol(settings: Settings) -> type[H11Protocol]:
    return type("LoramuxH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": settings.header_timeout_s,
                                                                    "send_buffer_bytes": settings.send_buffer_bytes})


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """uvicorn's configuration, its connection limits from the settings."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
        access_log=False,
        http=http_protocol(settings),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )


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
    server = DrainingServer(uvicorn_config(app, settings), app, settings.shutdown_grace_s)
    server.run()
    return 0
