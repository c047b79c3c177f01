"""One error vocabulary for the whole service.

Every failure becomes a `LoramuxError` subclass carrying its HTTP status, an OpenAI-style `type`
and the offending `param`; `error_body` renders the single error shape the API promises:
`{"error": {"message", "type", "param", "code", "request_id"}}`.

What a client reads must not tell it about the machine: `public_message` takes memory addresses
(`<_io.BytesIO object at 0x7f...>`) and absolute filesystem paths out of every message on its way
into a body, whatever raised it. The sources avoid them too (a path is named relative to the adapter
root, a library's exception text goes to the log, never into a message); this is the last line.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.engine.errors import EngineError


class LoramuxError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, param: str | None = None, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class BadRequestError(LoramuxError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(LoramuxError):
    status_code = 401
    error_type = "authentication_error"


class PermissionDeniedError(LoramuxError):
    status_code = 403
    error_type = "permission_error"


class NotFoundError(LoramuxError):
    status_code = 404
    error_type = "not_found_error"


class AdapterNotFoundError(NotFoundError):
    """The request names an adapter the registry does not hold (or that failed to load)."""


class ConflictError(LoramuxError):
    status_code = 409
    error_type = "conflict_error"


class PayloadTooLargeError(LoramuxError):
    status_code = 413
    error_type = "invalid_request_error"


class AdapterValidationError(LoramuxError):
    """An adapter on disk is unusable: wrong type, rank, base model, format or location."""

    status_code = 422
    error_type = "invalid_adapter_error"


class OverloadedError(LoramuxError):
    status_code = 429
    error_type = "rate_limit_error"


class ServiceUnavailableError(LoramuxError):
    status_code = 503
    error_type = "service_unavailable"


class DeadlineExceededError(LoramuxError):
    status_code = 504
    error_type = "timeout_error"


class ClientDisconnectedError(LoramuxError):
    """The client went away before the answer was ready (nginx's 499): the work is cancelled and
    its slot freed; the response goes nowhere, but the error is counted instead of logged as a crash."""

    status_code = 499
    error_type = "client_disconnected"


class EngineFailedError(LoramuxError):
    status_code = 500
    error_type = "engine_error"


def from_engine(exc: EngineError, param: str | None = None) -> LoramuxError:
    """An engine's report (`service.engine.errors`) as the service's error: its status and type,
    `param` the request field the refused input came from (for a constraint: the constraint's own
    field, when the caller knows it)."""
    from service.engine import errors as engine_errors  # engines import this module's neighbours

    if isinstance(exc, engine_errors.InputRefusedError):
        return BadRequestError(exc.message, param)
    if isinstance(exc, engine_errors.AdapterRefusedError):
        return AdapterValidationError(exc.message, param)
    if isinstance(exc, engine_errors.EngineUnavailableError):
        return ServiceUnavailableError(exc.message, headers={"Retry-After": str(exc.retry_after_s)})
    return EngineFailedError(exc.message)


# ` at 0x7f3a...` (a repr's address) and any long hex address left on its own
_ADDRESS = re.compile(r"\s+at\s+0x[0-9a-fA-F]+|\b0x[0-9a-fA-F]{6,}\b")
# an absolute POSIX path of two or more parts, not the tail of a URL or a MIME type ("image/png")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])~?/(?:[\w.@+-]+/)+[\w.@+-]*")


def public_message(message: str) -> str:
    """`message` without memory addresses and absolute paths (each path becomes `<path>`)."""
    return _ABSOLUTE_PATH.sub("<path>", _ADDRESS.sub("", message))


def error_body(message: str, error_type: str, status: int, param: str | None = None,
               request_id: str | None = None) -> dict[str, Any]:
    """The one error shape. `request_id` defaults to the current request's (`service.request_ids`)."""
    from service.request_ids import current_request_id

    return {"error": {"message": public_message(message), "type": error_type, "param": param, "code": status,
                      "request_id": request_id or current_request_id.get()}}


def error_from_exception(exc: LoramuxError) -> dict[str, Any]:
    return error_body(exc.message, exc.error_type, exc.status_code, exc.param)
