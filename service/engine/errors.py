"""What an engine reports when it cannot do what it was asked, in the engine's own terms.

No HTTP status and no request field here: an engine does not know which API field its input came
from, nor what status the API gives a refusal. The request path maps each of these to the service's
error (`service.errors.from_engine`, called where the field is known: `inference.field_named`), and
the API's handlers map any that arrive otherwise, so both engines' refusals reach clients in the one
error body with the same status.
"""

from __future__ import annotations

from service.context_window import overflow


class EngineError(Exception):
    """Base of every engine report; `message` is safe to show a client (no paths, no library text)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InputRefusedError(EngineError):
    """The request's input cannot run on this engine: images on a text model, an image's shape, a
    prompt too long once its images are expanded."""


class ConstraintError(InputRefusedError):
    """An output constraint (structured output, a forced tool call) that cannot be enforced; the
    request path names the field the constraint came from (`StructuredOutput.param`)."""


class AdapterRefusedError(EngineError):
    """An adapter's weights cannot be loaded: the engine installed nothing, the others serve on."""


class EngineUnavailableError(EngineError):
    """Not serving now (not started, stopping, restarting, busy); the client may retry after
    `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GenerationInterruptedError(EngineUnavailableError):
    """The engine stopped a generation before the model finished it (its adapter was unloaded, the
    engine aborted it or shut down). Both engines end such a request with this error, never with a
    finish reason: "abort" is not an OpenAI finish reason, and "stop" would pass a cut-off answer
    for a complete one. The client may retry."""


class EngineFailureError(EngineError):
    """A step failed for a reason of the engine's own (the server log has the details)."""


def refuse_overflow(prompt_tokens: int, new_tokens: int, limit: int) -> None:
    """The shared context rule (`context_window.overflow`, its one wording) as an engine's refusal:
    each engine's own guarantee, on the ids it will run, that no sequence outgrows the context."""
    problem = overflow(prompt_tokens, new_tokens, limit)
    if problem is not None:
        raise InputRefusedError(problem)
