"""One id per HTTP request, in its response header, its error body and every log line it causes.

A client (or the proxy in front) may send `X-Request-ID`; a well-formed one is kept, so one id
follows the request through every hop, and anything else (missing, too long, characters that do not
belong in a header or a log line) is replaced by a fresh `req-<hex>`. The id lives in a context
variable for the length of the request: asyncio tasks started by the request copy it, the error
body reads it (`service.errors.error_body`) and the log record factory installed by
`install_log_records` stamps it on every record as `%(request_id)s` ("-" outside any request).
The id a client chose never names engine requests: those stay unique whatever clients send.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}")
NO_REQUEST = "-"

current_request_id: ContextVar[str | None] = ContextVar("loramux_request_id", default=None)
# when the request's first byte reached the app (time.perf_counter): its deadline starts there
request_arrival: ContextVar[float | None] = ContextVar("loramux_request_arrival", default=None)


def new_id() -> str:
    return f"req-{uuid.uuid4().hex[:24]}"


def request_id_from(scope: Scope) -> str:
    """The client's `X-Request-ID` when it is a short token of safe characters, else a new id."""
    for name, value in scope.get("headers", []):
        if name == HEADER:
            text = value.decode("latin-1").strip()
            return text if VALID_ID.fullmatch(text) else new_id()
    return new_id()


class RequestIdMiddleware:
    """Outermost ASGI layer: sets the request's id before anything can fail (auth, body limit,
    validation) and adds `X-Request-ID` to whatever response goes out; notes its arrival time, from
    which its deadline runs (`service.inference.Deadline`)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = request_id_from(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        token = current_request_id.set(request_id)
        arrival = request_arrival.set(time.perf_counter())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_arrival.reset(arrival)
            current_request_id.reset(token)


_installed = False


def install_log_records() -> None:
    """Give every log record a `request_id` attribute (the current request's, or "-"), so a log
    format can print it and no handler fails on a record made outside a request."""
    global _installed
    if _installed:
        return
    _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = current_request_id.get() or NO_REQUEST
        return record

    logging.setLogRecordFactory(factory)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
