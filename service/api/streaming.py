"""Server-sent events and the headers that carry a routing decision."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.inference import Choice

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends, even when the client disconnects
    before the first event (when the body generator never starts and its `finally` never runs)."""

    def __init__(self, content: Any, on_close: Callable[[], None], headers: dict[str, str] | None = None):
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


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
    info = choice.route_info()
    if info is not None:
        # json.dumps escapes every non-ASCII character, so this value is ASCII already
        headers["X-Loramux-Route"] = header_value(json.dumps(
            {"adapter": info["adapter"], "confidence": info["confidence"], "fallback": info["fallback"],
             "router": f"{info['router']['name']}@{info['router']['version']}"},
            separators=(",", ":"),
        ))
    return headers
