"""Request pieces shared by the native and the OpenAI-compatible API: chat messages, sampling
fields and their limits, and conversion to the engine's `SamplingParams`."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.engine.base import SamplingParams
from service.errors import BadRequestError
from service.inference import Choice
from service.settings import Settings


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="a data URL (data:image/png;base64,...), or http(s) when the server allows it")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    """An image for a vision-language base model (OpenAI's content part); decoded and checked in
    `service.multimodal` before anything else sees it."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field("", max_length=65536, description="a JSON object, as the model wrote it")


class MessageToolCall(BaseModel):
    """A call an earlier assistant turn made (OpenAI's shape), sent back in the history."""

    id: str | None = Field(None, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = Field(None, max_length=128, description="assistant turns")
    tool_call_id: str | None = Field(None, max_length=128, description="tool turns: the call this answers")

    def as_template_dict(self) -> dict[str, Any]:
        """Text-only content becomes one string (what every chat template takes); content with
        images keeps its parts, in order, for `service.multimodal.load_chat_images`. An assistant
        turn's `tool_calls` and a tool turn's `tool_call_id` go with it (`prompts.chat_for_template`
        renders them for the template at hand)."""
        from service.prompts import message_text

        role = "system" if self.role == "developer" else self.role
        content = self.model_dump()["content"]
        out: dict[str, Any] = {"role": role, "content": message_text(content)}
        if isinstance(content, list) and any(part["type"] == "image_url" for part in content):
            out["content"] = content
        if self.tool_calls and role == "assistant":
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None and role == "tool":
            out["tool_call_id"] = self.tool_call_id
        return out


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


class SamplingFields(BaseModel):
    """The sampling fields chat and completions share beyond temperature and top_p: OpenAI's two
    penalties and the ones vLLM takes as top-level body fields (`top_k`, `min_p`,
    `repetition_penalty`), with vLLM's meanings and limits; null means the default, as on vLLM."""

    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="once per token in the output")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="times the token's count in the output")
    repetition_penalty: float | None = Field(None, gt=0.0, allow_inf_nan=False,
                                             description="over the prompt's and the output's tokens; 1 is off")
    top_k: int | None = Field(None, ge=-1, description="the k most likely tokens; 0 or -1 is off")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="relative to the most likely token; 0 is off")
    ignore_eos: bool | None = Field(None, description="vLLM's: generate past end-of-sequence tokens until "
                                                      "max_tokens or a stop string (benchmarks)")

    def shape(self, params: SamplingParams, logprobs: int | None = None) -> SamplingParams:
        """`params` with these fields, and `logprobs` (None: none; k: the chosen token's and the top k)."""
        return replace(
            params,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            logprobs=logprobs,
            ignore_eos=bool(self.ignore_eos),
        )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


SEED_FIELD = Field(None, ge=-(2**63), le=2**63 - 1)


def route_info(choice: Choice) -> dict[str, Any] | None:
    """The routing decision as the API shows it (`/route`'s body, `routing` in `/generate`, the
    `X-Loramux-Route` header); None for a pinned adapter."""
    if choice.decision is None or choice.router is None:
        return None
    d = choice.decision
    return {
        "adapter": choice.name,
        "version": choice.version,
        "confidence": round(d.confidence, 6),
        "candidates": [
            {"adapter": name, "probability": p}
            for name, p in sorted(d.probabilities.items(), key=lambda kv: -kv[1])
        ],
        "fallback": d.fallback,
        "router": {"name": choice.router.version.name, "version": choice.router.version.version},
        "latency_ms": round(d.latency_ms, 3),
    }
