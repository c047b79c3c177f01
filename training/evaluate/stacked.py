"""`loramux eval --kind stacked`: what a user gets, measured. Route, answer with the chosen expert, score.

The router and each expert are evaluated separately elsewhere
(`training.evaluate.router_and_experts`); neither says what comes back when the router's choice
answers the request. A router at 97% can cost far more than 3% if its mistakes land on the
requests only the right expert gets right, and an expert's own score means little if the router
rarely sends it its traffic. So for every example of a routing dataset's split:

1. the request is routed as the service routes it (the router LoRA's constrained decision, with its
   calibration temperature, `LORAMUX_ROUTE_THRESHOLD` and `LORAMUX_FALLBACK`) and answered by the chosen
   expert with the expert's own system prompt, as the service supplies it: the *end-to-end* answer;
2. the same request answered by its true expert: the *oracle*. When the router chose the true expert,
   that answer is the end-to-end one (same adapter, same prompt, greedy decoding), so only misrouted
   requests are generated again, and "routed right" can never score differently from its oracle;
3. the same request answered by the base model without an adapter: the *base*.

Each answer is scored against the request's reference with its true expert's metric
(`training.evaluate.answer_scores`), so every request falls in exactly one of: answered right, lost to routing
(wrong end to end, right with the true expert) or lost by the expert (wrong even with the true expert).

Two backends run the same evaluation: `EngineBackend` on a serving engine in this process (the code
`/route` and `/v1/chat/completions` run), and `HttpBackend` (`training.evaluate.stacked_http`) through a running
service's OpenAI API, so a deployment can be checked end to end. Report: `training.evaluate.stacked_report`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.adapter_validation import detect_final, resolve_inside_root
from service.engine.base import AdapterRef
from service.multimodal import chat_images
from service.prompts import prompt_ids
from service.registry import Registry
from service.settings import Settings
from training.data.chats import DatasetError, load_images, read_chats
from training.data.tool_calls import parse_tool_call
from training.evaluate import metrics as m
from training.evaluate.answer_scores import AnswerScore, ExpertMetric, mean, score_answer
from training.evaluate.router_and_experts import (
    EngineSession,
    Evaluation,
    _generate,
    adapter_ref,
    router_gold,
    sample_records,
)
from training.progress import gather_limited
from training.train.metadata import read_metadata

BASE = "base"  # the chosen "expert" when the router's decision fell back to the base model


class StackedError(DatasetError):
    """A stacked evaluation cannot run as asked (no router, an expert missing, a service refusing)."""


@dataclass(frozen=True)
class StackedExample:
    """One request of the routing dataset: what the user sends, whose it is, and the answer wanted."""

    index: int
    text: str
    expert: str
    request: list[dict[str, Any]]
    reference: str


@dataclass(frozen=True)
class ExpertSpec:
    name: str
    path: Path | None  # None through a service (it holds the adapters)
    metadata: dict[str, Any] = field(default_factory=dict)  # its loramux.json: system prompt, tools, metric

    @property
    def system_prompt(self) -> str | None:
        prompt = self.metadata.get("system_prompt")
        return prompt if isinstance(prompt, str) and prompt else None


@dataclass(frozen=True)
class RouterSpec:
    name: str
    path: Path | None
    labels: tuple[str, ...]
    temperature: float = 1.0


@dataclass(frozen=True)
class StackedSetup:
    """The router and the experts it routes to: the registry's (the service's view), or a router run
    evaluated against the registered experts (Modal's `--routing-run`)."""

    router: RouterSpec
    experts: dict[str, ExpertSpec]

    @property
    def candidates(self) -> list[str]:
        """The router's labels that are registered experts, in the router's order: what the service
        routes among (`AdapterManager.routable`)."""
        return [name for name in self.router.labels if name in self.experts]


def router_folder_spec(path: Path, name: str | None = None) -> RouterSpec:
    """A router adapter folder (a run or its final/) with the labels and temperature of its `loramux.json`."""
    folder = detect_final(Path(path).resolve())
    meta = read_metadata(folder)
    fitted = meta.get("calibration")
    temperature = float(fitted.get("temperature", 1.0)) if isinstance(fitted, dict) else 1.0
    name = name or (folder.parent.name if folder.name == "final" else folder.name)
    return RouterSpec(name, folder, tuple(meta.get("labels") or ()), temperature)


def setup_from_folders(router: RouterSpec, experts: Mapping[str, Path]) -> StackedSetup:
    """Unregistered adapters (the demo evaluates before it registers): each expert's folder by name."""
    specs = {}
    for name, path in experts.items():
        folder = detect_final(Path(path).resolve())
        specs[name] = ExpertSpec(name, folder, read_metadata(folder))
    return _checked(StackedSetup(router, specs), router.path or "")


def setup_from_registry(settings: Settings, router: str | None = None, router_path: Path | None = None
                        ) -> StackedSetup:
    """The active experts of the registry, and the registered router `router` (default: the active one)
    or the router adapter folder `router_path`."""
    root = settings.adapter_root
    snapshot = Registry(settings.registry).load()
    experts = {}
    for version in snapshot.active_versions("task"):
        path = resolve_inside_root(version.path, root)
        experts[version.name] = ExpertSpec(version.name, path, read_metadata(path))
    if router_path is not None:
        spec = router_folder_spec(router_path)
    else:
        version = snapshot.router(router)
        if version is None:
            which = f"router {router!r} is" if router else "no router is"
            raise StackedError(settings.registry, None, f"{which} registered")
        spec = RouterSpec(version.name, resolve_inside_root(version.path, root), version.labels, version.temperature)
    return _checked(StackedSetup(spec, experts), settings.registry)


def _checked(setup: StackedSetup, where: Path | str) -> StackedSetup:
    if not setup.candidates:
        raise StackedError(where, None, f"none of router {setup.router.name}'s labels {list(setup.router.labels)} "
                                        "is an available expert")
    return setup


def stacked_examples(dataset: Path | str, split: str = "eval", limit: int | None = None) -> list[StackedExample]:
    """The split's examples (a seeded sample of `limit`) with their request and reference answer: from
    the record's `metadata.request`/`reference` (`training.data.routing_dataset`), or for datasets built
    before those existed, from the source chat the record points at (`metadata.source` and `line`)."""
    examples = []
    sources: dict[str, list[Any]] = {}
    for index, record in enumerate(sample_records(dataset, split, limit)):
        meta = record.metadata
        request, reference = meta.get("request"), meta.get("reference")
        if not (isinstance(request, list) and request and isinstance(reference, str) and reference):
            request, reference = _from_source(record, sources)
        examples.append(StackedExample(index, record.user_text, router_gold(record), request, reference))
    return examples


def _from_source(record: Any, cache: dict[str, list[Any]]) -> tuple[list[dict[str, Any]], str]:
    from service.prompts import message_text

    source, line = record.metadata.get("source"), record.metadata.get("line")
    if not (isinstance(source, str) and isinstance(line, int) and Path(source).is_file()):
        raise StackedError(record.path, record.line, "no reference answer: the record has no metadata.reference "
                                                     "and its metadata.source is not a readable file; rebuild "
                                                     "the routing dataset with `loramux dataset build`")
    if source not in cache:
        cache[source] = read_chats(source, need_assistant=False)
    chat = next((c for c in cache[source] if c.line == line), None)
    last = chat.messages[-1] if chat else {}
    if chat is None or last.get("role") != "assistant":
        raise StackedError(source, line, "the source chat has no assistant answer to score against")
    request = [msg for msg in chat.messages[:-1] if msg.get("role") != "system"]
    return request, message_text(last["content"]).strip()


@dataclass(frozen=True)
class Routed:
    """The service's decision for one request and the answer of the adapter it chose."""

    adapter: str | None  # the adapter that answered; None: the base model (a fallback)
    top: str | None  # the router's top candidate (None when the service does not say)
    confidence: float
    route_ms: float | None
    answer: str
    answer_ms: float


class Backend(Protocol):
    """Where requests are routed and answered: an engine here, or a running service."""

    async def routed(self, example: StackedExample) -> Routed: ...

    async def pinned(self, example: StackedExample, adapter: str | None) -> tuple[str, float]:
        """The answer of `adapter` (None: the base model) and its latency in ms."""
        ...


class EngineBackend:
    """Routes with `Router.decide` and answers with `Engine.generate` on an `EngineSession`: the calls
    the service's request path makes, with the same decision rule (threshold, fallback)."""

    def __init__(self, session: EngineSession, setup: StackedSetup, max_tokens: int):
        self.session, self.setup, self.max_tokens = session, setup, max_tokens
        self.refs: dict[str, AdapterRef] = {}
        self._router_ref: AdapterRef | None = None
        self._router: Any = None
        self._ids = iter(range(1 << 62))

    async def start(self) -> EngineBackend:
        from service.routing.router import Router

        router = self.setup.router
        assert self.session.engine is not None and router.path is not None
        self._router_ref = await self.session.load(adapter_ref(router.path, f"stacked-{router.name}"))
        for name, expert in self.setup.experts.items():
            assert expert.path is not None
            self.refs[name] = await self.session.load(adapter_ref(expert.path, f"stacked-{name}"))
        self._router = Router.for_settings(self.session.engine, self.session.settings)
        return self

    async def routed(self, example: StackedExample) -> Routed:
        settings = self.session.settings
        fallback = None if settings.fallback == BASE else settings.fallback
        decision = await self._router.decide(self._router_ref, self.setup.candidates, load_images(example.request),
                                             settings.route_threshold, fallback, self.setup.router.temperature)
        adapter = decision.adapter if decision.adapter in self.refs else None  # a fallback that is gone: base
        answer, ms = await self.pinned(example, adapter)
        return Routed(adapter, decision.top, decision.confidence, decision.latency_ms, answer, ms)

    async def pinned(self, example: StackedExample, adapter: str | None) -> tuple[str, float]:
        assert self.session.engine is not None
        expert = self.setup.experts.get(adapter) if adapter else None
        messages = load_images(example.request)
        ids = prompt_ids(self.session.engine.tokenizer, messages, expert.system_prompt if expert else None)
        started = time.perf_counter()
        text = await _generate(self.session.engine, f"stacked-{next(self._ids)}", ids,
                               self.refs[adapter] if adapter else None, self.max_tokens, chat_images(messages))
        return text, (time.perf_counter() - started) * 1000


@dataclass(frozen=True)
class StackedRow:
    """One example's outcome: the JSONL record of the report."""

    example: StackedExample
    routed: Routed
    oracle_answer: str
    base_answer: str
    score: AnswerScore
    oracle: AnswerScore
    base: AnswerScore
    metric: ExpertMetric

    @property
    def chosen(self) -> str:
        return self.routed.adapter or BASE

    @property
    def outcome(self) -> str:
        """`correct`, `lost_to_routing` (the true expert would have been right) or `lost_by_expert`."""
        if self.score.score:
            return "correct"
        return "lost_to_routing" if self.oracle.score else "lost_by_expert"

    def to_json(self) -> dict[str, Any]:
        ex, routed = self.example, self.routed
        return {
            "index": ex.index, "text": ex.text, "request": ex.request, "expert": ex.expert,
            "chosen": self.chosen, "top": routed.top, "confidence": round(routed.confidence, 6),
            "reference": ex.reference, "answer": routed.answer, "oracle_answer": self.oracle_answer,
            "base_answer": self.base_answer, "metric": self.metric.metric, "outcome": self.outcome,
            "scores": {"end_to_end": self.score.to_json(), "oracle": self.oracle.to_json(),
                       "base": self.base.to_json()},
            "latency_ms": {"route": routed.route_ms, "answer": round(routed.answer_ms, 3)},
        }


def expert_metrics(examples: Sequence[StackedExample], experts: Mapping[str, ExpertSpec]
                   ) -> dict[str, ExpertMetric]:
    """Each example's metric, its true expert's. Tool names the expert does not record are taken from
    the references of its examples, as `evaluate_expert_async` does."""
    seen: dict[str, set[str]] = {}
    for ex in examples:
        if (call := parse_tool_call(ex.reference)) is not None:
            seen.setdefault(ex.expert, set()).add(call["name"])
    out = {}
    for ex in examples:
        spec = experts.get(ex.expert)
        meta = dict(spec.metadata) if spec else {}
        meta["tools"] = meta.get("tools") or sorted(seen.get(ex.expert, ()))
        out[ex.expert] = out.get(ex.expert) or ExpertMetric.of(meta, ex.reference)
    return out


async def run_stacked(backend: Backend, examples: Sequence[StackedExample], setup: StackedSetup,
                      concurrency: int = 16) -> list[StackedRow]:
    """Routed answers for every example, oracle answers for the misrouted, base answers for every one."""
    routed = await gather_limited([functools.partial(backend.routed, ex) for ex in examples], concurrency,
                                  "stacked: routed answers")
    misrouted = [i for i, (ex, r) in enumerate(zip(examples, routed, strict=True)) if r.adapter != ex.expert]
    again = await gather_limited([functools.partial(backend.pinned, examples[i], examples[i].expert)
                                  for i in misrouted], concurrency, "stacked: oracle answers")
    oracle_answers = [r.answer for r in routed]
    for i, (answer, _ms) in zip(misrouted, again, strict=True):
        oracle_answers[i] = answer
    base = await gather_limited([functools.partial(backend.pinned, ex, None) for ex in examples], concurrency,
                                "stacked: base answers")
    metrics = expert_metrics(examples, setup.experts)
    rows = []
    for ex, r, oracle_answer, (base_answer, _ms) in zip(examples, routed, oracle_answers, base, strict=True):
        metric = metrics[ex.expert]
        rows.append(StackedRow(ex, r, oracle_answer, base_answer, score_answer(r.answer, ex.reference, metric),
                               score_answer(oracle_answer, ex.reference, metric),
                               score_answer(base_answer, ex.reference, metric), metric))
    return rows


def _percentiles(values: Sequence[float | None]) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return {"p50": None, "p95": None}
    return {"p50": round(float(np.percentile(known, 50)), 3), "p95": round(float(np.percentile(known, 95)), 3)}


def stacked_report(rows: Sequence[StackedRow], setup: StackedSetup, context: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of `rows`. Top level: `n`, `routing_accuracy` (the router's top candidate is the true
    expert), `end_to_end`, `oracle`, `base` (mean scores); `outcomes` splits the n requests into
    correct + lost_to_routing + lost_by_expert; `per_expert` is keyed by true expert."""
    if not rows:
        raise StackedError(str(context.get("dataset", "")), None, "no examples to evaluate")
    gold = [r.example.expert for r in rows]
    chosen = [r.chosen for r in rows]
    labels = sorted({*setup.candidates, *gold})
    classes = m.per_class(gold, chosen, labels)
    outcomes = {key: sum(r.outcome == key for r in rows) for key in ("correct", "lost_to_routing", "lost_by_expert")}
    per_expert = {}
    for name in labels:
        own = [r for r in rows if r.example.expert == name]
        per_expert[name] = {
            "support": len(own),
            "routed_to": sum(c == name for c in chosen),
            "precision": round(classes[name]["precision"], 4),
            "recall": round(classes[name]["recall"], 4),
            "end_to_end": mean([r.score for r in own]) if own else None,
            "oracle": mean([r.oracle for r in own]) if own else None,
            "base": mean([r.base for r in own]) if own else None,
            "metric": own[0].metric.metric if own else None,
        }
    return {
        "kind": "stacked",
        **context,
        "router": {"name": setup.router.name, "path": str(setup.router.path) if setup.router.path else None,
                   "labels": list(setup.router.labels), "temperature": setup.router.temperature},
        "experts": sorted(setup.experts),
        "n": len(rows),
        "routing_accuracy": m.accuracy(gold, [r.routed.top or BASE for r in rows]),
        "end_to_end": mean([r.score for r in rows]),
        "oracle": mean([r.oracle for r in rows]),
        "base": mean([r.base for r in rows]),
        "outcomes": outcomes,
        "misrouted": sum(c != g for c, g in zip(chosen, gold, strict=True)),
        "rescued": sum(bool(r.score.score and not r.oracle.score) for r in rows),  # a wrong expert was right
        "per_expert": per_expert,
        "confusion": m.confusion_matrix(gold, chosen, labels),
        "latency_ms": {"route": _percentiles([r.routed.route_ms for r in rows]),
                       "answer": _percentiles([r.routed.answer_ms for r in rows])},
        "examples": [r.to_json() for r in rows],
    }


async def evaluate_stacked_async(session: EngineSession, setup: StackedSetup, dataset: Path | str,
                                 split: str = "eval", limit: int | None = None, max_tokens: int = 160,
                                 concurrency: int = 16) -> Evaluation:
    """The stacked evaluation on an engine in this process."""
    examples = stacked_examples(dataset, split, limit)
    check_experts(examples, setup, dataset)
    backend = await EngineBackend(session, setup, max_tokens).start()
    rows = await run_stacked(backend, examples, setup, concurrency)
    context = {"dataset": str(dataset), "split": split, "max_tokens": max_tokens, "backend": "engine"}
    return Evaluation("stacked", stacked_report(rows, setup, context))


def evaluate_stacked(setup: StackedSetup, dataset: Path | str, settings: Settings | None = None, **kwargs: Any
                     ) -> Evaluation:
    """Blocking wrapper: start an engine, run the stacked evaluation, stop the engine."""
    import asyncio

    async def run() -> Evaluation:
        async with EngineSession(settings) as session:
            return await evaluate_stacked_async(session, setup, dataset, **kwargs)

    return asyncio.run(run())


def check_experts(examples: Sequence[StackedExample], setup: StackedSetup, dataset: Path | str) -> None:
    """Every example's true expert must be there to answer it (the oracle)."""
    missing = sorted({ex.expert for ex in examples} - set(setup.experts))
    if missing:
        raise StackedError(dataset, None, f"expert(s) {', '.join(missing)} of this dataset are not registered: "
                                          "the oracle answers need them")
