"""What `/metrics` counts about one HTTP request, noted by the code that learns it.

The HTTP layer counts every request once it is over (`service.api.request_metrics`), by endpoint,
status and adapter. The endpoint is known when the request arrives, but the adapter only once the
request path has chosen one (`service.inference`), and a stream's real outcome only when its
generation ends, long after its `200` status line went out (an error event, a client that left).
The middleware puts one mutable `RequestRecord` in a context variable; the code deeper down fills
it in. Tasks a request starts copy the context, so they fill in the same record.

No HTTP here: the request path notes what it knows without knowing about responses.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

CLIENT_CLOSED = 499  # nginx's code for a client that left before its answer, as `ClientDisconnectedError`
NO_ADAPTER = "none"  # the label of a request no adapter was chosen for (refused first, or not inference)


@dataclass
class RequestRecord:
    endpoint: str  # the route's template as a label (`v1_chat_completions`), never the raw path
    adapter: str | None = None  # a registered name or "base": never a name a client typed
    status: int | None = None  # the outcome when it is not the status line (a stream that failed or was left)

    @property
    def adapter_label(self) -> str:
        return self.adapter or NO_ADAPTER


current_record: ContextVar[RequestRecord | None] = ContextVar("loramux_request_record", default=None)


def note_adapter(name: str) -> None:
    """The adapter serving the current request (`base` for none): only names the service resolved,
    so the label's values stay the registered adapters."""
    record = current_record.get()
    if record is not None:
        record.adapter = name


def note_status(status: int) -> None:
    """The current request's real outcome, when it differs from its status line."""
    record = current_record.get()
    if record is not None:
        record.status = status
