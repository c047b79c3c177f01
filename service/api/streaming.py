"""Server-sent events and the headers that carry a routing decision."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

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


def route_headers(choice: Choice) -> dict[str, str]:
    """`X-Loramux-Adapter` names the adapter used; `X-Loramux-Route` carries the routing decision."""
    headers = {"X-Loramux-Adapter": f"{choice.name}@{choice.version}" if choice.name else "base"}
    info = choice.route_info()
    if info is not None:
        headers["X-Loramux-Route"] = json.dumps(
            {"adapter": info["adapter"], "confidence": info["confidence"], "fallback": info["fallback"],
             "router": f"{info['router']['name']}@{info['router']['version']}"},
            separators=(",", ":"),
        )
    return headers
