"""The one context-length rule: a prompt (after tokenization, its images expanded) and the tokens
asked for must fit the context, or the request is refused with a 400 before any forward pass.

Every place that learns a prompt's final length applies it: the request path for text prompts
(`service.inference.prompt_ids`, before the engine queue) and routing (the router's prompt and its
longest answer, within `Router.max_prompt_tokens`) with `ensure_fits`, each engine on the ids it will
run with `overflow` (the same words, raised as the engine's own `InputRefusedError`; vLLM's refusal
after expanding images is mapped to that error too). One rule means one message and one number for
the same condition everywhere, and no engine runs a generation that the context cannot hold:
neither engine truncates `max_tokens` silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from service.errors import BadRequestError

if TYPE_CHECKING:
    from service.engine.vision import ImageSizes


def refusal(prompt_tokens: int | None, new_tokens: int, limit: int, what: str = "prompt",
            limit_name: str = "the context length") -> str:
    """The one wording of a context-length refusal."""
    size = f"has {prompt_tokens} tokens" if prompt_tokens is not None else "is too long"
    asked = f" and {new_tokens} new tokens were asked for" if new_tokens else ""
    return f"{what} {size}{asked}; {limit_name} is {limit}"


def overflow(prompt_tokens: int, new_tokens: int, limit: int) -> str | None:
    """The refusal when a prompt of `prompt_tokens` leaves no room for `new_tokens` within `limit`,
    else None: for the engines, which raise it as their own error."""
    return refusal(prompt_tokens, new_tokens, limit) if prompt_tokens + new_tokens > limit else None


class ContextLengthError(BadRequestError):
    """The prompt and the new tokens do not fit the context: the request path's refusal (400), which
    names the field the prompt came from."""

    def __init__(self, prompt_tokens: int | None, new_tokens: int, limit: int, *, what: str = "prompt",
                 limit_name: str = "the context length", param: str | None = None):
        super().__init__(refusal(prompt_tokens, new_tokens, limit, what, limit_name), param=param)
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

