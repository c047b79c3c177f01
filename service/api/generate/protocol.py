"""Request and response models of `POST /generate` and `POST /route`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.api.common import SEED_FIELD, ChatMessage, SamplingFields, Usage


def _not_nullable(schema: dict[str, Any]) -> None:
    """Document an optional field as absent-or-a-value: null is refused (see `_no_null`). The
    Python type stays `X | None` so validation errors keep plain locations (`messages.0.role`)."""
    variants = [v for v in schema.pop("anyOf", []) if v.get("type") != "null"]
    if len(variants) == 1:
        schema.update(variants[0])
    elif variants:
        schema["anyOf"] = variants
    schema.pop("default", None)


class PromptOrMessages(BaseModel):
    # exactly one of the two, in the schema too (`oneOf`), so a client generated from /openapi.json
    # knows; an explicit null is refused like a wrong type (the schema has no null for either)
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [{"required": ["prompt"]},
                                                                         {"required": ["messages"]}]})
    prompt: str | None = Field(None, description="a single user message (the chat template is applied)",
                               json_schema_extra=_not_nullable)
    messages: list[ChatMessage] | None = Field(None, description="a chat, OpenAI message format",
                                               json_schema_extra=_not_nullable)

    @field_validator("prompt", "messages", mode="before")
    @classmethod
    def _no_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("omit the field instead of sending null")
        return value

    @model_validator(mode="after")
    def _one_of(self) -> PromptOrMessages:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    def chat(self) -> list[dict]:
        if self.messages is None:
            return [{"role": "user", "content": self.prompt or ""}]
        return [m.as_template_dict() for m in self.messages]


class GenerateRequest(PromptOrMessages, SamplingFields):
    """A generation on a named adapter or the router's choice, with the sampling fields chat takes
    (`SamplingFields`: penalties, top_k, min_p, ignore_eos)."""

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
    finish_reason: Literal["stop", "length"] | None
    usage: Usage
    routing: RouteResponse | None = None
    timings: dict[str, float]
