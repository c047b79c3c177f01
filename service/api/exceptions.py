"""The one function that maps exceptions to status codes and the error body.

Errors are counted in `/metrics` by route template (`/admin/adapters/{name}`), never by the raw
path: a client requesting random paths must not create a time series per path (unbounded label
cardinality is a memory leak in every Prometheus client and server). Requests that match no route
count as `unmatched`. 5xx errors are logged (with the request id, like every log line)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from service.engine.errors import EngineError
from service.errors import LoramuxError, error_body, error_from_exception, from_engine

log = logging.getLogger(__name__)

HTTP_TYPES = {404: "not_found_error", 405: "invalid_request_error", 401: "authentication_error"}


UNMATCHED = "unmatched"


def template_label(template: object) -> str:
    """A route template as a label (`/admin/adapters/{name}` -> `admin_adapters_{name}`), or `unmatched`."""
    if not isinstance(template, str):
        return UNMATCHED
    return template.strip("/").replace("/", "_") or "root"


def endpoint_label(request: Request) -> str:
    """The matched route's template as a label (`admin_adapters_{name}`), or `unmatched`."""
    return template_label(getattr(request.scope.get("route"), "path", None))


def _count(request: Request, error_type: str) -> None:
    state = getattr(request.app.state, "service", None)
    if state is not None:
        state.metrics.errors.labels(endpoint_label(request), error_type).inc()


def validation_param(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", "body"
    message = first.get("msg", "invalid value")
    return (f"{param}: {message}" if param else message), param


def install_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoramuxError)
    async def loramux_error(request: Request, exc: LoramuxError) -> JSONResponse:
        _count(request, exc.error_type)
        if exc.status_code >= 500:
            log.warning("%s %s: %d %s", request.method, endpoint_label(request), exc.status_code, exc.message)
        return JSONResponse(error_from_exception(exc), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        """An engine's report the request path did not map (it maps those of generation and
        routing, naming the field): the same status, without a field."""
        return await loramux_error(request, from_engine(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_param(exc)
        _count(request, "invalid_request_error")
        return JSONResponse(error_body(message, "invalid_request_error", 400, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, LoramuxError):
            # FastAPI turns any error raised while reading the body into a 400 "error parsing the
            # body"; one of ours (the body limit counting a chunked body) keeps its own status (413)
            return await loramux_error(request, exc.__cause__)
        error_type = HTTP_TYPES.get(exc.status_code, "invalid_request_error")
        _count(request, error_type)
        return JSONResponse(
            error_body(str(exc.detail), error_type, exc.status_code), status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, endpoint_label(request))
        _count(request, "internal_error")
        return JSONResponse(error_body("internal server error", "internal_error", 500), status_code=500)
