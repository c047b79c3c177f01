"""The request path shared by /generate, /route and /v1/chat/completions: build the prompt,
choose the adapter (pinned, or routed by the router LoRA), and run the generation under the
admission limit, the deadline and the metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from service import prompts
from service.adapters import AdapterHold, ResolvedAdapter
from service.context_window import ContextLengthError, ensure_fits, prompt_length
from service.engine.base import SamplingParams, StructuredOutput, TokenDelta
from service.engine.errors import ConstraintError, EngineError
from service.errors import (
    AdapterNotFoundError,
    AdapterValidationError,
    BadRequestError,
    DeadlineExceededError,
    LoramuxError,
    ServiceUnavailableError,
    from_engine,
)
from service.request_ids import request_arrival
from service.request_record import current_record, note_adapter
from service.routing.router import RouteDecision
from service.state import ServiceState
from service.tool_calls import CallFormat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deadline:
    """A request's deadline, `LORAMUX_REQUEST_TIMEOUT_S` after it arrived: image loading, admission,
    routing, queueing in the engine and generation all spend from the same budget, so no stage can
    hold a request past it (a slow image URL, a long router prefill)."""

    at: float  # time.perf_counter() value
    timeout_s: float

    @classmethod
    def for_request(cls, state: ServiceState) -> Deadline:
        arrived = request_arrival.get()
        timeout = state.settings.request_timeout_s
        return cls((arrived if arrived is not None else time.perf_counter()) + timeout, timeout)

    def remaining(self) -> float:
        return self.at - time.perf_counter()

    def exceeded(self) -> DeadlineExceededError:
        return DeadlineExceededError(f"request exceeded the {self.timeout_s:g}s deadline")

    async def run(self, work: Any) -> Any:
        """Await `work` (a coroutine), cancelled with a 504 when the deadline passes first."""
        remaining = self.remaining()
        if remaining <= 0:
            if asyncio.iscoroutine(work):
                work.close()
            raise self.exceeded()
        try:
            return await asyncio.wait_for(work, timeout=remaining)
        except TimeoutError:
            raise self.exceeded() from None


@dataclass
class Choice:
    """The adapter a request will be served by, and the routing decision that chose it, if any.
    `hold` keeps the adapter resident from the moment it was chosen: `release` it when the request
    ends (generation over, or an error before it began); releasing twice is harmless."""

    adapter: ResolvedAdapter | None
    decision: RouteDecision | None = None
    router: ResolvedAdapter | None = None
    hold: AdapterHold | None = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        if self.hold is not None:
            self.hold.release()

    @property
    def name(self) -> str | None:
        return self.adapter.version.name if self.adapter else None

    @property
    def version(self) -> int | None:
        return self.adapter.version.version if self.adapter else None


@dataclass
class Outcome:
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@contextlib.contextmanager
def field_named(param: str, structured: StructuredOutput | None = None) -> Iterator[None]:
    """Engines report in their own terms (`service.engine.errors`: no status, no API field); the
    request path knows which field the input came from, so an engine's report becomes the service's
    error here (`errors.from_engine`) naming `param`, or for a refused output constraint
    (`ConstraintError`) the field the constraint came from (`structured.param`). A service refusal
    without a field (the context check) gets `param` too."""
    try:
        yield
    except EngineError as exc:
        constraint = isinstance(exc, ConstraintError) and structured is not None and structured.param
        raise from_engine(exc, constraint or param) from exc
    except BadRequestError as exc:
        if exc.param is None:
            exc.param = param
        raise


def template_refused(exc: TemplateError, param: str) -> BadRequestError:
    """A chat template that raises (`raise_exception("roles must alternate ...")`, an undefined
    field) refuses that conversation: the client's to fix, a 400, with the template's own words
    (they are the rule the conversation broke; the exception's repr goes to the log)."""
    log.info("chat template refused the conversation: %r", exc)
    reason = getattr(exc, "message", None) or "the chat template refused this conversation"
    return BadRequestError(f"the model's chat template refused these messages: {reason}", param=param)


def prompt_ids(state: ServiceState, messages: list[dict[str, Any]], adapter: ResolvedAdapter | None,
               max_tokens: int, param: str, images: Sequence[Any] = (),
               tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
    """The generation prompt's token ids, refused (400) unless it fits the context with
    `max_tokens` new tokens, its images counted as the tokens they expand to: the request's
    context-length check (`service.context_window`), before the engine queue. `tools`: the
    OpenAI tools declared, rendered for the adapter's call format when it reads them
    (`prompts.tools_to_show`)."""
    tokenizer = state.engine.tokenizer
    tools = prompts.tools_to_show(tools, adapter is None or adapter.version.tools_in_prompt)
    refuse_certain_overflow(state, messages, max_tokens, param, tools)
    try:
        ids = prompts.prompt_ids(tokenizer, messages, adapter.system_prompt if adapter else None, tools,
                                 call_format_for(state, adapter))
    except TemplateError as exc:
        raise template_refused(exc, param) from None
    with field_named(param):
        ensure_fits(prompt_length(len(ids), images, state.engine.image_sizes), max_tokens,
                    state.settings.max_model_len)
    return ids


def refuse_certain_overflow(state: ServiceState, messages: list[dict[str, Any]], max_tokens: int, param: str,
                            tools: Sequence[dict[str, Any]] | None = None) -> None:
    """Refuse (400) a chat whose text alone cannot fit the context with `max_tokens`, without
    tokenizing it (a lower bound, in microseconds). Called before routing too: a megabyte prompt
    would otherwise cost a router forward pass (about a second of the engine thread on one core,
    which every running generation waits for) before its certain refusal."""
    least = prompts.fewest_prompt_tokens(state.engine.tokenizer, messages, tools)
    if least + max_tokens > state.settings.max_model_len:
        raise ContextLengthError(None, max_tokens, state.settings.max_model_len, param=param)


def raw_prompt_ids(state: ServiceState, prompt: str | list[int], max_tokens: int, param: str) -> list[int]:
    """A completions prompt's token ids, the text tokenized as it is (no chat template; the
    tokenizer's own special tokens, as vLLM adds them) or the ids as given (each must be a token of
    the vocabulary), under the same context-length rule as `prompt_ids`."""
    tokenizer = state.engine.tokenizer
    limit = state.settings.max_model_len
    if isinstance(prompt, str):
        if len(prompt.encode()) // prompts.longest_token_bytes(tokenizer) + max_tokens > limit:
            raise ContextLengthError(None, max_tokens, limit, param=param)  # certain without tokenizing it
        ids = list(tokenizer(prompt, add_special_tokens=True).input_ids)
    else:
        ids, vocab = list(prompt), len(tokenizer)
        if any(i >= vocab for i in ids):
            raise BadRequestError(f"token ids must be below the vocabulary's size, {vocab}", param=param)
    if not ids:
        raise BadRequestError("the prompt must not be empty", param=param)
    ensure_fits(len(ids), max_tokens, limit, param=param)
    return ids


def call_format_for(state: ServiceState, adapter: ResolvedAdapter | None) -> CallFormat:
    """How the answering model writes a tool call: the adapter's recorded format; the bare base
    model writes Qwen's `<tool_call>` blocks when its template has a tool section, else the
    documented JSON form it is told about in the system turn."""
    if adapter is not None:
        return adapter.version.tool_call_format
    return "hermes" if prompts.template_has_tools(state.engine.tokenizer) else "json"


class RequestSlot:
    """A request's admission ticket and, once chosen, its adapter hold: the one release path for
    both, in that order. A handler holds it in a `with` block, which releases it on every way out
    (an answer, an error) unless a stream took it over (`handed_over`): the stream releases it when
    it closes, long after the handler returned."""

    def __init__(self, ticket: Any):
        self.ticket = ticket
        self.choice: Choice | None = None
        self.more: list[Choice] = []  # the other prompts' choices (a /v1/completions list of prompts)
        self.handed_over = False  # set by the stream that now owns the release

    def __enter__(self) -> RequestSlot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.handed_over:
            self.release()

    def release(self) -> None:
        try:
            for choice in (self.choice, *self.more):
                if choice is not None:
                    choice.release()
        finally:
            self.ticket.release()


async def route(state: ServiceState, messages: list[dict[str, Any]], param: str = "adapter") -> Choice:
    """Ask the active router; never returns an adapter that is not registered and loaded."""
    manager = state.adapters
    router = manager.resolve_router()
    if router is None:
        coming = state.build.still_building("the router", state.settings.router, "router", param)
        if coming is not None:
            raise coming
        # like an unknown model: the client can fix it by naming an adapter (a 5xx would say retry)
        raise AdapterNotFoundError("no router is registered; name an adapter explicitly", param=param)
    served = {c.version.name for c in manager.routable(router.version.labels)}
    # names a live builder is still training stay candidates: leaving them out would send their
    # requests to the best of the others, a wrong expert answering with confidence
    building = state.build.current()
    coming = set(building.pending) if building is not None else set()
    names = [label for label in router.version.labels if label in served or label in coming]
    if not names:
        raise ServiceUnavailableError("none of the router's adapters is registered and loaded")
    settings = state.settings
    fallback_name = None if settings.fallback == "base" else settings.fallback
    with manager.hold(router):  # a router rollback mid-decision must not unload it under the forward pass
        decision = await decide(state, router, names, messages, settings.route_threshold, fallback_name, param)
    state.metrics.route_latency.observe(decision.latency_ms / 1000)
    state.metrics.route_confidence.observe(decision.confidence)
    if decision.fallback:
        state.metrics.route_fallbacks.inc()
    if building is not None and decision.adapter is not None and decision.adapter not in served:
        later = building.still_building(f"the request was routed to {decision.adapter!r}, which",
                                        decision.adapter, param=param)
        if later is not None:
            state.metrics.route_decisions.labels(decision.adapter).inc()
            raise later
    chosen = None
    if decision.adapter is not None:
        try:
            chosen = manager.active(decision.adapter)
        except (AdapterNotFoundError, AdapterValidationError, BadRequestError):
            chosen = None  # a fallback adapter that is gone: the base model is the safe answer
    # held from here (no await since the lookup) until the request ends
    choice = Choice(chosen, decision, router, manager.hold(chosen) if chosen else None)
    note_adapter(choice.name or "base")
    try:
        state.metrics.route_decisions.labels(decision.adapter or "base").inc()
        await maybe_shadow(state, router, names, messages, decision)
    except BaseException:
        choice.release()
        raise
    return choice


async def decide(state: ServiceState, router: ResolvedAdapter, names: list[str], messages: list[dict[str, Any]],
                 threshold: float, fallback: str | None, param: str) -> RouteDecision:
    """The router's decision, or a 400 when this request cannot be routed: its chat template refuses
    the conversation, or no candidate has a usable score (every one -inf, i.e. probability 0, or
    not a number), where a softmax has nothing to normalise. The client can still name an adapter."""
    try:
        with field_named("messages"):  # e.g. the router's prompt, images expanded, over its budget
            decision = await state.router.decide(router.ref, names, messages, threshold, fallback,
                                                 router.version.temperature)
    except TemplateError as exc:
        raise template_refused(exc, "messages") from None
    except ValueError as exc:  # softmax over scores that are all -inf
        log.warning("router %s could not score the request: %s", router.version.uid, exc)
        decision = None
    if decision is None or not all(math.isfinite(p) for p in [decision.confidence, *decision.probabilities.values()]):
        if decision is not None:
            log.warning("router %s gave non-finite probabilities", router.version.uid)
        raise BadRequestError("the router could not score this request (no candidate has a finite score); "
                              "name an adapter instead", param=param)
    return decision


async def maybe_shadow(state: ServiceState, router: ResolvedAdapter, names: list[str],
                       messages: list[dict[str, Any]], decision: RouteDecision) -> None:
    """With a candidate router registered, compare its decision on a sample of live traffic, off
    the request path: the comparison runs in a task of its own (at most `shadow_max_inflight` at
    once; a sampled request beyond that is not shadowed), so its latency and its failures never
    reach the request. The active router still decides; the candidate is only observed."""
    fraction = state.settings.shadow_fraction
    if fraction <= 0 or random.random() >= fraction:
        return
    if len(state.shadow_tasks) >= state.settings.shadow_max_inflight:
        return
    candidate = state.adapters.candidate_router()
    if candidate is None:
        return
    hold = state.adapters.hold(candidate)  # taken now: a rollback before the task runs must wait for it
    task = asyncio.ensure_future(_shadow(state, candidate, names, messages, decision))
    state.shadow_tasks.add(task)
    task.add_done_callback(state.shadow_tasks.discard)
    task.add_done_callback(lambda _: hold.release())  # however the task ends, even cancelled unstarted


async def _shadow(state: ServiceState, candidate: ResolvedAdapter, names: list[str],
                  messages: list[dict[str, Any]], decision: RouteDecision) -> None:
    try:
        # the candidate chooses among its own routable labels: what it would do if promoted, including
        # sending requests to the expert it was retrained for (which the active router cannot name)
        shadow_names = [c.version.name for c in state.adapters.routable(candidate.version.labels)] or names
        shadow = await state.router.decide(candidate.ref, shadow_names, messages,
                                           temperature=candidate.version.temperature)
    except asyncio.CancelledError:
        raise
    except Exception:  # the candidate's fault, not the request's: counted and logged, nothing else
        log.warning("shadow routing with candidate %s failed", candidate.version.uid, exc_info=True)
        state.metrics.shadow_failures.inc()
        return
    agree = shadow.top == decision.top
    state.metrics.shadow_agreement.labels(decision.top, shadow.top, str(agree).lower()).inc()
    stats = state.shadow_stats.setdefault(candidate.version.uid, {"compared": 0, "agreed": 0, "disagreements": {}})
    stats["compared"] += 1
    stats["agreed"] += int(agree)
    if not agree:
        key = f"{decision.top}->{shadow.top}"
        stats["disagreements"][key] = stats["disagreements"].get(key, 0) + 1


async def choose(
    state: ServiceState, messages: list[dict[str, Any]], adapter: str | None, param: str = "adapter"
) -> Choice:
    """A pinned adapter, or the router's decision when none is named."""
    if adapter is None:
        return await route(state, messages, param)
    try:
        resolved = state.adapters.active(adapter)
    except LoramuxError as exc:
        coming = state.build.still_building(f"adapter {adapter!r}", adapter, param=param)
        if coming is not None and isinstance(exc, AdapterNotFoundError):
            raise coming from None
        exc.param = param
        raise
    note_adapter(resolved.version.name)
    return Choice(resolved, hold=state.adapters.hold(resolved))


async def generate_stream(
    state: ServiceState,
    endpoint: str,
    request_id: str,
    ids: list[int],
    choice: Choice,
    params: SamplingParams,
    outcome: Outcome,
    images: Sequence[Any] = (),
    deadline: Deadline | None = None,
    param: str = "messages",
) -> AsyncIterator[TokenDelta]:
    """Run one generation with the adapter held, the deadline enforced and the metrics recorded.
    The caller holds an admission slot. Closing this iterator aborts the engine request; when it
    ends, however it ends, the choice's adapter hold is released. `deadline`: the request's
    (`Deadline.for_request`, from its arrival); by default one that starts now. `param`: the field
    the prompt came from, named in an engine's refusal. Latencies in `/metrics` run from the
    request's arrival (see `service.metrics`), labelled by the route's template when a request is
    being served (`endpoint` otherwise); `outcome.timings` from the generation's start."""
    metrics = state.metrics
    label = choice.name or "base"
    note_adapter(label)
    started = time.perf_counter()
    record = current_record.get()
    endpoint = record.endpoint if record is not None else endpoint
    arrived = request_arrival.get() or started
    metrics.queue_time.labels(label).observe(started - arrived)
    # what the engine runs: each image counted as the tokens it expands to, as the context check counts it
    outcome.prompt_tokens = prompt_length(len(ids), images, state.engine.image_sizes)
    metrics.prompt_tokens.labels(label).inc(outcome.prompt_tokens)
    first = True
    last_token_at = started
    deadline = deadline or Deadline(started + state.settings.request_timeout_s, state.settings.request_timeout_s)
    async with state.adapters.use(choice.adapter):
        stream = state.engine.generate(request_id, ids, choice.adapter.ref if choice.adapter else None, params,
                                       images)
        try:
            while True:
                try:
                    with field_named(param, params.structured):
                        delta = await deadline.run(anext(stream))
                except StopAsyncIteration:
                    break
                now = time.perf_counter()
                new_tokens = delta.completion_tokens - outcome.completion_tokens
                if first:
                    outcome.timings["ttft_ms"] = (now - started) * 1000
                    metrics.ttft.labels(endpoint, label).observe(now - arrived)
                    first = False
                elif new_tokens > 0:
                    metrics.inter_token.labels(label).observe(now - last_token_at)
                if new_tokens > 0:
                    last_token_at = now
                metrics.generated_tokens.labels(label).inc(new_tokens)
                outcome.completion_tokens = delta.completion_tokens
                outcome.text += delta.text
                if delta.finish_reason:
                    outcome.finish_reason = delta.finish_reason
                yield delta
                if delta.finish_reason:
                    break
        finally:
            try:
                await stream.aclose()
            finally:
                choice.release()
            ended = time.perf_counter()
            outcome.timings["generate_ms"] = (ended - started) * 1000
            metrics.e2e_latency.labels(endpoint, label).observe(ended - arrived)
            metrics.prompt_tokens_hist.labels(label).observe(outcome.prompt_tokens)
            metrics.generation_tokens_hist.labels(label).observe(outcome.completion_tokens)
            if outcome.finish_reason:
                metrics.finished.labels(label, outcome.finish_reason).inc()
