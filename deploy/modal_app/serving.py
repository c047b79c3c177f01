"""A serving container's life, apart from Modal's decorators: start, serve, stop.

Why apart: the `Server` class (`server.py`) is only Modal's shell around these three steps, and the
steps are the local server's own. The state is built once per container by the same `build_state` the
`loramux serve` lifespan uses (the vLLM engine starts once, not per request, on the event loop that
then serves every request of the container), and the app is the same `create_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deploy.modal_app import resources
from deploy.modal_app.config import CONFIG, REGISTRY_FILE
from deploy.modal_app.volume_sync import VolumeRefresher, commit, guard_registry_writes, reload, running_in_modal

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.settings import Settings
    from service.state import ServiceState


def service_settings() -> Settings:
    """The service settings of a serving container, from its environment. The Modal endpoint is public, so the
    rule for binding a public address applies: without LORAMUX_API_KEYS (from the secret) the container
    refuses to start instead of serving an open endpoint."""
    from service.settings import Settings

    return Settings(host="0.0.0.0")


@dataclass
class ServingContainer:
    """The service of one container: its state and the task that keeps its volumes current."""

    state: ServiceState
    refresher: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls) -> ServingContainer:
        """Download (first time) and load the base model, start vLLM, load the registered adapters."""
        from service.api.app import build_state

        # Modal's blocking volume calls go to a thread: this runs on the container's event loop
        await asyncio.to_thread(reload, resources.adapters_volume, resources.registry_volume)
        guard_registry_writes()  # admin writes from this replica: one writer across all containers
        state = await build_state(service_settings())
        await asyncio.to_thread(commit, resources.models_volume)  # the first download serves later cold starts
        refresher = None
        if running_in_modal():
            sync = VolumeRefresher(Path(REGISTRY_FILE), resources.adapters_volume, resources.registry_volume)
            refresher = asyncio.create_task(sync.run(CONFIG.volume_reload_s), name="volume-refresh")
        return cls(state, refresher)

    def app(self) -> FastAPI:
        """The same FastAPI app as `loramux serve`, over the state built in `start`."""
        from service.api.app import create_app

        return create_app(self.state.settings, self.state)

    async def stop(self) -> None:
        """Drain: stop watching, unload, shut the engine down (Modal sends SIGTERM first, then waits)."""
        from service.api.app import close_state

        if self.refresher is not None:
            self.refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.refresher
        await close_state(self.state)
