"""The request counter: every HTTP request counted once, when it is over, by route template,
adapter and status, whatever answered it (a handler, a validation error, the auth or body-size
guards, a 429, a 5xx), so that an error ratio is errors over all requests of an endpoint.

The endpoint is the route template the path matches, found here before the app runs (the guards
refuse some requests before routing, and the request path labels its histograms with it too); a
path that matches no route is `unmatched`, so random paths add no time series. The adapter and a
stream's real outcome come from the request path through `service.request_record`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.exceptions import UNMATCHED, template_label
from service.request_record import CLIENT_CLOSED, RequestRecord, current_record


def route_template_label(app: Any, scope: Scope) -> str:
    """The label of the route Starlette will pick for this request: the first full match, else the
    first partial one (the right path, another method: a 405), else `unmatched`."""
    partial = None
    for route in getattr(getattr(app, "router", None), "routes", ()):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return template_label(getattr(route, "path", None))
        if match is Match.PARTIAL and partial is None:
            partial = route
    return template_label(getattr(partial, "path", None)) if partial is not None else UNMATCHED


class RequestMetricsMiddleware:
    """Inside the request-id layer (the arrival time is noted there), outside every guard."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        application = scope.get("app")  # Starlette sets it before its middleware runs
        record = RequestRecord(route_template_label(application, scope))
        token = current_record.set(record)
        status = 500  # an app that fails before answering: Starlette's error layer sends a 500

        async def noting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        except asyncio.CancelledError:
            record.status = record.status or CLIENT_CLOSED
            raise
        except Exception:
            record.status = record.status or 500
            raise
        finally:
            current_record.reset(token)
            # no service state yet (a request before start-up finished, a test's stand-in): nothing to count in
            metrics = getattr(getattr(getattr(application, "state", None), "service", None), "metrics", None)
            if metrics is not None:
                metrics.http_requests.labels(record.endpoint, record.adapter_label,
                                             str(record.status or status)).inc()
