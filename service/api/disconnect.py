"""Work a request waits for, cut short when nobody will read its answer: the client went away
(its batch slot and engine time go back at once; counted as 499) or the request's deadline passed
(504). The HTTP side of the request path: `service.inference` knows nothing of connections."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.requests import Request

from service.errors import ClientDisconnectedError
from service.inference import Deadline


async def until_done(request: Request, work: Any, deadline: Deadline | None = None) -> Any:
    """Await `work` (a coroutine): cancelled with a 499 when the client disconnects first, and with
    a 504 when `deadline` passes first."""
    guarded = cancel_on_disconnect(request, work)
    return await (deadline.run(guarded) if deadline is not None else guarded)


async def cancel_on_disconnect(request: Request, work: Any) -> Any:
    """Await `work`, but cancel it as soon as the client disconnects (frees its batch slot), or when
    this await itself is cancelled (the request's deadline passed)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientDisconnectedError("client disconnected")
    finally:
        watcher.cancel()
        if not task.done():  # we were cancelled (the deadline): the work must not run on unobserved
            task.cancel()
            task.add_done_callback(_release_abandoned)


def _release_abandoned(task: asyncio.Future) -> None:
    """A result nobody will use (a routing `Choice` that finished as it was cancelled) gives back
    what it holds."""
    if not task.cancelled() and task.exception() is None and hasattr(task.result(), "release"):
        task.result().release()
