"""Request pieces shared by the native and the OpenAI-compatible API: chat messages, sampling
fields and their limits, and conversion to the engine's `SamplingParams`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.engine.base import SamplingParams
from service.errors import BadRequestError
from service.settings import Settings


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        from service.prompts import message_text

        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": message_text(self.model_dump()["content"])}


def stop_list(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def check_limits(
    settings: Settings,
    messages: list[ChatMessage] | None,
    max_tokens: int | None,
    stop: tuple[str, ...],
    max_tokens_param: str = "max_tokens",
) -> None:
    if messages is not None:
        if not messages:
            raise BadRequestError("messages must not be empty", param="messages")
        if len(messages) > settings.max_messages:
            raise BadRequestError(f"at most {settings.max_messages} messages are allowed", param="messages")
        if not any(m.role == "user" for m in messages):
            raise BadRequestError("messages need at least one user message", param="messages")
    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise BadRequestError(f"{max_tokens_param} must be at most {settings.max_tokens_limit}", param=max_tokens_param)
    if len(stop) > settings.max_stop:
        raise BadRequestError(f"at most {settings.max_stop} stop strings are allowed", param="stop")
    if any(not s or len(s) > 256 for s in stop):
        raise BadRequestError("stop strings must be 1 to 256 characters", param="stop")


def sampling_params(
    settings: Settings,
    max_tokens: int | None,
    temperature: float,
    top_p: float,
    stop: tuple[str, ...],
    seed: int | None,
) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens or settings.default_max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        seed=seed,
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


SEED_FIELD = Field(None, ge=-(2**63), le=2**63 - 1)
