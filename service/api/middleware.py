"""Pure-ASGI guards that run before routing: API keys by path, and the request body size limit.

Auth looks at the ASGI `scope["path"]` (not a URL rebuilt from headers), denies by default when
keys are configured, and leaves only /health and /ready (and /metrics unless told otherwise)
public. The size limit refuses a declared Content-Length at once and counts a chunked body as it
arrives, so a huge body is never read into memory."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import key_matches
from service.errors import AuthenticationError, LoramuxError, PayloadTooLargeError, PermissionDeniedError, error_body
from service.settings import Settings

PUBLIC_PATHS = {"/health", "/ready"}


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


class AuthMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings
        self.public = set(PUBLIC_PATHS)
        if not settings.metrics_require_key:
            self.public.add("/metrics")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.settings.auth_enabled or scope["path"] in self.public:
            return await self.app(scope, receive, send)
        key = bearer_key(scope)
        admin_path = scope["path"] == "/admin" or scope["path"].startswith("/admin/")
        s = self.settings
        if key is None:
            return await send_error(send, AuthenticationError("a valid API key is required (Authorization: Bearer)"))
        if admin_path and not key_matches(key, s.admin_api_keys):
            if key_matches(key, s.api_keys):
                return await send_error(send, PermissionDeniedError("this key may not manage adapters"))
            return await send_error(send, AuthenticationError("a valid admin API key is required"))
        if not admin_path and not key_matches(key, [*s.api_keys, *s.admin_api_keys]):
            return await send_error(send, AuthenticationError("a valid API key is required"))
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

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

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large
            return message

        return await self.app(scope, limited_receive, send)
