"""Pure-ASGI guards that run before routing: the Host check, API keys by path, and the request
body's size and time limits.

Auth looks at the ASGI `scope["path"]` (not a URL rebuilt from headers), denies by default when
keys are configured, and leaves only /health and /ready public (and /metrics with
`LORAMUX_METRICS_PUBLIC`). A CORS preflight (`OPTIONS` with `Origin` and
`Access-Control-Request-Method`) carries no credentials by design, so it is never a 401: it passes
to the CORS layer (which answers it) or, without CORS, to routing (405). A keyless server on a
loopback address has no key to check, so it checks the `Host` header instead: a page that DNS-
rebinds its own name to 127.0.0.1 sends its name, not ours, and is refused before any route runs.
The size limit refuses a declared Content-Length at once and counts a chunked body as it arrives,
so a huge body is never read into memory; a body that trickles in slower than `body_timeout_s` is
a 408."""

from __future__ import annotations

import asyncio
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.authorization import access_for_path, authorize
from service.errors import BadRequestError, LoramuxError, PayloadTooLargeError, error_body
from service.settings import LOOPBACK_HOSTS, Settings


class RequestTimeoutError(LoramuxError):
    status_code = 408
    error_type = "timeout_error"


async def send_error(send: Send, exc: LoramuxError) -> None:
    body = json.dumps(error_body(exc.message, exc.error_type, exc.status_code, exc.param)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if exc.status_code == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def bearer_key(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            return key.strip() if scheme.lower() == "bearer" and key.strip() else None
    return None


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def is_preflight(scope: Scope) -> bool:
    return (scope["method"] == "OPTIONS" and header(scope, b"origin") is not None
            and header(scope, b"access-control-request-method") is not None)


def host_name(value: str) -> str:
    """The name in a Host header, without its port: `127.0.0.1:8000` -> `127.0.0.1`, `[::1]:80` -> `::1`."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


class AuthMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings
        self.hosts = LOOPBACK_HOSTS | {h.lower() for h in settings.allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.settings.checks_host and host_name(header(scope, b"host") or "") not in self.hosts:
            return await send_error(send, BadRequestError(
                "this server answers only requests addressed to localhost, 127.0.0.1 or [::1] "
                "(or a name in LORAMUX_ALLOWED_HOSTS)", param="host"))
        if not is_preflight(scope):
            try:
                authorize(self.settings, bearer_key(scope), access_for_path(scope["path"], self.settings))
            except LoramuxError as exc:
                return await send_error(send, exc)
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = PayloadTooLargeError(f"request body is larger than {self.max_bytes} bytes", param="body")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    return await send_error(send, too_large)
        seen = 0
        complete = False
        deadline = time.monotonic() + self.timeout_s
        too_slow = RequestTimeoutError(f"the request body did not arrive within {self.timeout_s:g}s", param="body")

        async def limited_receive() -> Message:
            nonlocal seen, complete
            if complete:  # the body is in: what follows is the wait for a disconnect, not limited
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise too_slow from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large
                complete = not message.get("more_body", False)
            return message

        return await self.app(scope, limited_receive, send)
