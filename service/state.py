"""Everything a request handler needs, built once at start-up and hung on `app.state.service`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from service.adapters import AdapterManager
from service.base_model import BaseModelInfo
from service.build_status import BuildStatusReader
from service.engine.base import Engine
from service.errors import OverloadedError, ServiceUnavailableError
from service.metrics import Metrics
from service.routing.router import Router
from service.settings import Settings


class Admission:
    """A bounded admission queue: at most `limit` requests waiting or running; beyond it, 429
    with Retry-After instead of an unbounded backlog."""

    def __init__(self, limit: int):
        self.limit = limit
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def acquire(self) -> None:
        if self.inflight >= self.limit:
            raise OverloadedError(
                f"server is at capacity ({self.limit} requests in flight); retry shortly",
                headers={"Retry-After": "1"},
            )
        self.inflight += 1
        self.idle.clear()

    def release(self) -> None:
        self.inflight = max(0, self.inflight - 1)
        if self.inflight == 0:
            self.idle.set()

    def ticket(self) -> Ticket:
        """Acquire a slot (or raise 429); the ticket releases it exactly once."""
        self.acquire()
        return Ticket(self)


class Ticket:
    def __init__(self, admission: Admission):
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission.release()
            self._admission = None


@dataclass
class ServiceState:
    settings: Settings
    base: BaseModelInfo
    engine: Engine
    adapters: AdapterManager
    router: Router
    metrics: Metrics
    admission: Admission
    build: BuildStatusReader  # adapters a builder (the demo) will register soon
    ready: bool = False
    draining: bool = False
    created: int = 0
    shadow_stats: dict = field(default_factory=dict)
    shadow_tasks: set = field(default_factory=set)  # shadow decisions running beside the requests
    cpu_follower: asyncio.Task | None = None  # build_status.share_cpu_while_building

    def ticket(self) -> Ticket:
        """Admission for one inference request: 503 while draining or loading, 429 when full."""
        self.check_accepting()
        return self.admission.ticket()

    def check_accepting(self) -> None:
        if self.draining:
            raise ServiceUnavailableError("server is shutting down", headers={"Retry-After": "5"})
        if not self.ready:
            raise ServiceUnavailableError("server is not ready yet", headers={"Retry-After": "5"})
