"""Request and response models of `POST /generate` and `POST /route`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.api.common import SEED_FIELD, ChatMessage, Usage


class PromptOrMessages(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | None = Field(None, description="a single user message (the chat template is applied)")
    messages: list[ChatMessage] | None = Field(None, description="a chat, OpenAI message format")

    @model_validator(mode="after")
    def _one_of(self) -> PromptOrMessages:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    def chat(self) -> list[dict]:
        if self.messages is None:
            return [{"role": "user", "content": self.prompt or ""}]
        return [m.as_template_dict() for m in self.messages]


class GenerateRequest(PromptOrMessages):
    adapter: str | None = Field(None, description="adapter to use; omitted: the router chooses")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = SEED_FIELD
    stream: bool = False


class Candidate(BaseModel):
    adapter: str
    probability: float


class RouterRef(BaseModel):
    name: str
    version: int


class RouteResponse(BaseModel):
    adapter: str | None = Field(description="chosen adapter; null means the base model (fallback)")
    version: int | None
    confidence: float
    candidates: list[Candidate]
    fallback: bool
    router: RouterRef
    latency_ms: float


class GenerateResponse(BaseModel):
    text: str
    adapter: str | None
    version: int | None
    finish_reason: Literal["stop", "length", "abort"] | None
    usage: Usage
    routing: RouteResponse | None = None
    timings: dict[str, float]
