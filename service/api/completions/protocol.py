"""OpenAI completions request model (the shape of vLLM's `CompletionRequest`): a prompt string, a
list of them, or token ids; `to_sampling_params()` turns it into the engine's `SamplingParams`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.common import SEED_FIELD, SamplingFields, Usage, sampling_params, stop_list
from service.api.logprobs import MAX_TOP_LOGPROBS
from service.api.openai.protocol import StreamOptions
from service.api.structured import StructuredFields
from service.engine.base import SamplingParams
from service.errors import BadRequestError
from service.settings import Settings

TokenId = Annotated[int, Field(ge=0)]
DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for completions


class CompletionRequest(SamplingFields, StructuredFields):
    # unknown fields are ignored (logged), known ones not implemented refused (service/api/extra_fields.py)
    model_config = ConfigDict(extra="allow")
    model: str = Field(description="'auto' routes on the prompt; an adapter name pins it; the base model's name "
                                   "uses no adapter")
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="text, tokenized as it is (no chat template), a list of texts, or token ids")
    max_tokens: int | None = Field(None, ge=1, description=f"{DEFAULT_MAX_TOKENS} when omitted, as on OpenAI "
                                   "(or the server's max_tokens limit, if lower)")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="the chosen token's and the k "
                                                                              "most likely tokens' logprobs")
    stop: str | list[str] | None = None
    seed: int | None = SEED_FIELD
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    user: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a text or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt:
            raise BadRequestError("prompt must not be empty", param="prompt")
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]

    def refuse_unsupported(self) -> None:
        if self.suffix:
            raise BadRequestError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise BadRequestError("best_of is not supported (only best_of equal to n)", param="best_of")
        if self.echo and self.logprobs is not None:
            raise BadRequestError("echo with logprobs (the prompt's logprobs) is not supported", param="echo")

    def to_sampling_params(self, settings: Settings) -> SamplingParams:
        max_tokens = self.max_tokens or min(DEFAULT_MAX_TOKENS, settings.max_tokens_limit)
        params = sampling_params(settings, max_tokens, 1.0 if self.temperature is None else self.temperature,
                                 self.top_p or 1.0, stop_list(self.stop), self.seed)
        return self.shape(params, self.logprobs)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
