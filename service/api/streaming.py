"""Server-sent events and the headers that carry a routing decision.

A stream's generation never waits for its client. Were the generation driven by the response body
(each event generated when the previous one was sent), a client that stops reading would block
the send once the socket buffers are full, and with it the generation, its deadline check, its
batch slot and its admission ticket, for as long as the connection stays open. Here a task of its
own runs the generation into a queue under the request's deadline and releases the request's slot
the moment the generation ends; sending takes from the queue at the client's pace, and a client
still holding events `stream_drain_timeout_s` after the generation ended has its connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.common import route_info
from service.engine.errors import EngineError
from service.errors import LoramuxError, error_from_exception, from_engine
from service.inference import Choice
from service.request_record import CLIENT_CLOSED, current_record, note_status

if TYPE_CHECKING:
    from service.inference import RequestSlot
    from service.state import ServiceState

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
_END = object()


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """An SSE response whose events are produced by their own task (see the module docstring).
    `on_close` (the release of the request's slot) runs when the generation ends, however it ends,
    or when the response does, even if the client disconnects before the first event."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None], drain_timeout_s: float,
                 headers: dict[str, str] | None = None):
        self.events = events
        self.on_close = on_close
        self.drain_timeout_s = drain_timeout_s
        self.queue: asyncio.Queue[Any] = asyncio.Queue()  # bounded by the generation's max_tokens
        super().__init__(self._from_queue(), media_type="text/event-stream", headers=headers)

    async def _produce(self) -> None:
        try:
            async for event in self.events:
                self.queue.put_nowait(event)
        finally:
            self.queue.put_nowait(_END)
            self.on_close()

    async def _from_queue(self) -> AsyncIterator[str]:
        while (event := await self.queue.get()) is not _END:
            yield event

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        producer = asyncio.ensure_future(self._produce())
        sender = asyncio.ensure_future(super().__call__(scope, receive, send))
        try:
            await asyncio.wait({producer, sender}, return_when=asyncio.FIRST_COMPLETED)
            if sender.done() and not producer.done():  # the client left before its stream ended
                note_status(CLIENT_CLOSED)
            if not sender.done():  # generated: the client has a while to read the rest
                await asyncio.wait({sender}, timeout=self.drain_timeout_s)
            if not sender.done():
                log.warning("the client left %d events of its stream unread %gs after the generation ended; "
                            "closing the connection", self.queue.qsize(), self.drain_timeout_s)
        finally:
            # the client left (closing the events aborts the generation) or was too slow to read
            for task in (sender, producer):
                task.cancel()
            sent, produced = await asyncio.gather(sender, producer, return_exceptions=True)
            self.on_close()
        if isinstance(produced, Exception):
            log.error("stream producer failed", exc_info=produced)
        if isinstance(sent, Exception):
            raise sent


def stream_response(state: ServiceState, endpoint: str, events: AsyncGenerator[str, None],
                    slot: RequestSlot, headers: dict[str, str]) -> EventStream:
    """The one way a generation becomes an SSE response, for every streaming endpoint: `events`
    (the endpoint's own chunks) run under the request's slot, which the stream takes over and
    releases when it closes; an error after the status line (long sent) becomes one error event in
    the one error body; either way the stream ends with `[DONE]`, so a client waiting for it is
    never left hanging."""
    async def guarded() -> AsyncIterator[str]:
        async with contextlib.aclosing(events):  # a stream closed early aborts its generation at once
            try:
                async for event in events:
                    yield event
            except (LoramuxError, EngineError) as exc:
                if isinstance(exc, EngineError):  # one the request path did not map (it maps them all)
                    exc = from_engine(exc)
                record = current_record.get()  # the route template, as every other error is counted by
                state.metrics.errors.labels(record.endpoint if record else endpoint, exc.error_type).inc()
                note_status(exc.status_code)  # the request counter counts the error, not the 200 sent first
                log.warning("stream ended by %d %s", exc.status_code, exc.message)
                yield sse(error_from_exception(exc))
        yield DONE

    response = EventStream(guarded(), on_close=slot.release, drain_timeout_s=state.settings.stream_drain_timeout_s,
                           headers=headers)
    slot.handed_over = True
    return response


def header_value(text: str) -> str:
    """A header value that is always valid: printable ASCII (HTTP headers are Latin-1 bytes, and a
    control character would split the header). Names follow `service.names` and pass unchanged;
    anything else is percent-encoded rather than failing the response."""
    if text.isascii() and text.isprintable():
        return text
    return quote(text, safe="@:,{}\"'")


def route_headers(choice: Choice) -> dict[str, str]:
    """`X-Loramux-Adapter` names the adapter used; `X-Loramux-Route` carries the routing decision."""
    headers = {"X-Loramux-Adapter": header_value(f"{choice.name}@{choice.version}") if choice.name else "base"}
    info = route_info(choice)
    if info is not None:
        # json.dumps escapes every non-ASCII character, so this value is ASCII already
        headers["X-Loramux-Route"] = header_value(json.dumps(
            {"adapter": info["adapter"], "confidence": info["confidence"], "fallback": info["fallback"],
             "router": f"{info['router']['name']}@{info['router']['version']}"},
            separators=(",", ":"),
        ))
    return headers
