"""The routing decision: which registered task adapter should answer this request.

The router is a LoRA trained to answer with an adapter's name. Instead of letting it generate
free text (which could be any string), we score only the names it may choose: each candidate's
score is the log-probability of its whole answer, the name's tokens and the chat template's
end-of-turn token, computed for all candidates together from one pass over the prompt and the
names' prefix tree (`Engine.sequence_logprobs`). The same rule holds for every label set,
so names that share tokens, names that are token prefixes of each other and long names change
nothing about what a probability means. A softmax over the scores divided by the router's fitted
temperature (`training.train.calibration`) gives a calibrated probability for each candidate, so the
answer is always a registered adapter, with a confidence that a threshold can send to a fallback.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.context_window import ensure_fits, prompt_length
from service.engine.base import AdapterRef, Engine
from service.multimodal import chat_images
from service.prompts import answer_tokens, prompt_ids, router_messages
from service.settings import Settings


@dataclass(frozen=True)
class RouteDecision:
    adapter: str | None  # chosen task adapter; None means the base model (fallback)
    confidence: float  # probability of the router's top candidate
    probabilities: dict[str, float]  # every candidate, summing to 1
    fallback: bool
    top: str  # the router's top candidate, even when a fallback was taken
    latency_ms: float


def softmax(scores: Sequence[float], temperature: float = 1.0) -> list[float]:
    scaled = [s / temperature for s in scores]
    peak = max(scaled)
    if peak == -math.inf:
        raise ValueError("every candidate scored -inf")
    exps = [math.exp(s - peak) for s in scaled]
    total = sum(exps)
    return [e / total for e in exps]


class Router:
    """Decisions on any engine: it needs only the tokenizer and the two scoring primitives."""

    def __init__(self, engine: Engine, max_tokens: int = 256, max_prompt_tokens: int = 2048):
        self.engine = engine
        self.max_tokens = max_tokens  # of the last user turn's text (cut, `_bounded`)
        self.max_prompt_tokens = max_prompt_tokens  # of the whole prompt, images expanded, and the answer (refused)
        self._answers: dict[str, list[int]] = {}
        self._prefix_len: int | None = None

    @classmethod
    def for_settings(cls, engine: Engine, settings: Settings) -> Router:
        """The service's router: its budgets from the settings, never more than the context."""
        return cls(engine, settings.router_max_tokens, min(settings.max_model_len, settings.router_max_prompt_tokens))

    def prompt(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[Any]]:
        """The router's prompt: its token ids, and the images its placeholders stand for."""
        routed = router_messages(messages)
        routed[-1]["content"] = self._bounded(routed[-1]["content"])
        return prompt_ids(self.engine.tokenizer, routed), chat_images(routed)

    def _bounded(self, content: Any) -> Any:
        """The user's text cut to its first `max_tokens` tokens (each text part, with images). The
        start of a request says what it is about, and a bounded router prompt bounds the forward pass
        every routed request costs before any generation limit applies: a megabyte of text is routed
        on its first tokens instead of stalling the engine (training examples are far shorter, so the
        router never meets a cut it was not trained on)."""
        if isinstance(content, list):
            return [{**p, "text": self._bounded(p["text"])} if isinstance(p, dict) and p.get("type") == "text" else p
                    for p in content]
        if not isinstance(content, str) or len(content.encode()) <= self.max_tokens:  # bytes >= byte-level tokens
            return content
        tokenizer = self.engine.tokenizer
        ids = tokenizer.encode(content[: self.max_tokens * 32], add_special_tokens=False)
        return content if len(ids) <= self.max_tokens else tokenizer.decode(ids[: self.max_tokens])

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.prompt(messages)[0]

    def prefix_len(self) -> int:
        """Tokens every router prompt starts with (template + system prompt), found once by
        comparing the prompts of two different requests."""
        if self._prefix_len is None:
            a = self.prompt_ids([{"role": "user", "content": "a"}])
            b = self.prompt_ids([{"role": "user", "content": "zzz qqq"}])
            common = 0
            while common < min(len(a), len(b)) and a[common] == b[common]:
                common += 1
            self._prefix_len = common
        return self._prefix_len

    def answer_tokens(self, name: str) -> list[int]:
        """What the router writes to choose `name`: its tokens, then the end of the turn."""
        if name not in self._answers:
            self._answers[name] = answer_tokens(self.engine.tokenizer, name)
        return self._answers[name]

    async def scores(self, router: AdapterRef, candidates: Sequence[str], prompt_ids: list[int],
                     images: Sequence[Any] = ()) -> list[float]:
        """Log-probability of each candidate's whole answer (`answer_tokens`), before temperature.
        A prompt whose images would take it past `max_prompt_tokens` is refused before any forward
        pass (`ContextLengthError`): text alone is cut to fit, an image cannot be."""
        answers = [self.answer_tokens(c) for c in candidates]
        ensure_fits(prompt_length(len(prompt_ids), images, self.engine.image_sizes), max(map(len, answers)),
                    self.max_prompt_tokens, what="the router's prompt", limit_name="the router's budget")
        return await self.engine.sequence_logprobs(prompt_ids, router, answers, images, self.prefix_len())

    async def decide(
        self,
        router: AdapterRef,
        candidates: Sequence[str],
        messages: list[dict[str, Any]],
        threshold: float = 0.0,
        fallback: str | None = None,
        temperature: float = 1.0,
    ) -> RouteDecision:
        """Choose among `candidates` (registered task adapters). Below `threshold`, answer with
        `fallback` (an adapter name, or None for the base model). `temperature` is the router's
        fitted calibration temperature: it changes the confidence, never the choice."""
        started = time.perf_counter()
        if not candidates:
            raise ValueError("no candidates to route among")
        if len(candidates) == 1:
            probabilities = [1.0]
        else:
            probabilities = softmax(await self.scores(router, candidates, *self.prompt(messages)), temperature)
        best = max(range(len(candidates)), key=lambda i: probabilities[i])
        confidence = probabilities[best]
        use_fallback = confidence < threshold
        return RouteDecision(
            adapter=fallback if use_fallback else candidates[best],
            confidence=confidence,
            probabilities=dict(zip(candidates, probabilities, strict=True)),
            fallback=use_fallback,
            top=candidates[best],
            latency_ms=(time.perf_counter() - started) * 1000,
        )
