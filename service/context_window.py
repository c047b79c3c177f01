"""The one context-length rule: a prompt (after tokenization, its images expanded) and the tokens
asked for must fit the context, or the request is refused with a 400 before any forward pass.

Every place that learns a prompt's final length calls `ensure_fits`: the request path for text
prompts (`service.inference.prompt_ids`, before the engine queue), each engine once images are
expanded (the embedded engine's image processor; vLLM's own processor, whose refusal is mapped to
this error), and routing (the router's prompt and its longest answer, within `Router.max_prompt_tokens`). One
function means one message and one number for the same condition everywhere, and no engine runs a
generation that the context cannot hold: neither engine truncates `max_tokens` silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from service.errors import BadRequestError

if TYPE_CHECKING:
    from service.engine.vision import ImageSizes


class ContextLengthError(BadRequestError):
    """The prompt and the new tokens do not fit the context. Engines raise it without a `param`
    (they do not know the API's field names); the request path names the field."""

    def __init__(self, prompt_tokens: int | None, new_tokens: int, limit: int, *, what: str = "prompt",
                 limit_name: str = "the context length", param: str | None = None):
        size = f"has {prompt_tokens} tokens" if prompt_tokens is not None else "is too long"
        asked = f" and {new_tokens} new tokens were asked for" if new_tokens else ""
        super().__init__(f"{what} {size}{asked}; {limit_name} is {limit}", param=param)
        self.prompt_tokens = prompt_tokens
        self.new_tokens = new_tokens
        self.limit = limit


def ensure_fits(prompt_tokens: int, new_tokens: int, limit: int, *, what: str = "prompt",
                limit_name: str = "the context length", param: str | None = None) -> None:
    """Refuse (`ContextLengthError`) a prompt of `prompt_tokens` that leaves no room for
    `new_tokens` within `limit`."""
    if prompt_tokens + new_tokens > limit:
        raise ContextLengthError(prompt_tokens, new_tokens, limit, what=what, limit_name=limit_name, param=param)


def prompt_length(prompt_tokens: int, images: Sequence[Any], sizes: ImageSizes | None) -> int:
    """A prompt's length once each image's one placeholder token is expanded to the image's tokens
    (known from the image's size alone, as the model's processor will resize it)."""
    if not images or sizes is None:
        return prompt_tokens
    return prompt_tokens + sum(sizes.tokens(*image.size) - 1 for image in images)

