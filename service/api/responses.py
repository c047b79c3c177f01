"""The error responses every operation documents in `/openapi.json`.

FastAPI would otherwise advertise its own 422 `HTTPValidationError` shape, which this service never
sends (validation errors are 400s in the one error shape), and leave every other error status
undocumented; clients generated from the schema, and schemathesis, rely on this list."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int | str
    request_id: str | None = None  # the response's X-Request-ID: quote it when reporting a problem


class ErrorResponse(BaseModel):
    """`{"error": {"message", "type", "param", "code", "request_id"}}`: the shape of every error."""

    error: ErrorDetail


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if headers:
        out["headers"] = headers
    return out


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("Invalid request or a limit exceeded (prompt tokens, max_tokens, messages, stop); `param` names it"),
    401: _error("Missing or invalid API key"),
    403: _error("The key may not use this route (admin routes need an admin key)"),
    404: _error("Unknown route or adapter"),
    409: _error("Conflict with the registry's state"),
    408: _error("The request body did not arrive in time"),
    413: _error("Request body too large"),
    422: _error("The adapter failed validation or failed to load"),
    429: _error("Admission queue full", {"Retry-After": {**RETRY_AFTER["Retry-After"], "required": True}}),
    500: _error("Internal error"),
    503: _error("Not ready, draining, or no router registered", RETRY_AFTER),
    504: _error("The request exceeded its deadline"),
}


# one server-sent event (OpenAPI 3.1 has the `schema` of an event stream describe each event)
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON object (delta, final response or error), "
                                                            "or [DONE] at the end"}},
}


def event_stream_response(description: str) -> dict[int | str, dict[str, Any]]:
    """The 200 of an operation that answers JSON, or server-sent events with `stream: true`."""
    return {200: {"description": description, "content": {"text/event-stream": {"schema": SSE_EVENT}}}}
