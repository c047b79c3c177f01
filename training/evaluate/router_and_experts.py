"""`loramux eval`: router and expert evaluation through the serving engine.

The router is evaluated with `service.routing.router.Router.decide` on an engine from
`service.engine.create_engine`, the code path `/route` runs (with the router's calibration
temperature, and many decisions in flight so the engine batches them), so the numbers here are the
numbers the service will show. Two views of the router are reported: the constrained decision (what
serving does: always a candidate, with a probability for each, hence the calibration figures)
and the free greedy answer (what the LoRA writes when not constrained; its rate of strings that
are not an adapter name measures how well it learned the label vocabulary). The report also has
the coverage/accuracy curve over the routing threshold and, when the dataset has a train split, a
TF-IDF + logistic-regression baseline (`training.evaluate.baseline`) scored on the same examples.

Experts generate greedily through the same engine (concurrent requests, so the embedded engine
batches them) and are scored on exact match (same parsed tool call) and valid tool calls.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from service.adapter_validation import detect_final
from service.base_model import BaseModelInfo, resolve_base_model
from service.engine.base import AdapterRef, Engine, SamplingParams
from service.multimodal import chat_images
from service.prompts import message_text, prompt_ids, tools_to_show
from service.settings import Settings
from service.tool_calls import call_format as call_format_of
from training.data.chats import ChatRecord, DatasetError, load_images
from training.data.dataset_files import load_splits
from training.data.tool_calls import is_valid_tool_call, parse_tool_call, same_tool_call
from training.evaluate import metrics as m
from training.progress import gather_limited
from training.train.metadata import read_metadata

log = logging.getLogger(__name__)
_versions = iter(range(1, 1 << 30))  # unique engine versions for adapters loaded by evaluation


@dataclass
class Evaluation:
    kind: str
    report: dict[str, Any]


def adapter_ref(path: Path | str, name: str | None = None) -> AdapterRef:
    folder = detect_final(Path(path).resolve())
    if not (folder / "adapter_config.json").is_file():
        raise DatasetError(folder, None, "not an adapter folder (no adapter_config.json, no final/)")
    import json

    rank = int(json.loads((folder / "adapter_config.json").read_text()).get("r", 0))
    return AdapterRef(name or f"eval-{folder.parent.name}", next(_versions), folder, rank)


class EngineSession:
    """An engine started once and shared by several evaluations (the demo evaluates six adapters)."""

    def __init__(self, settings: Settings | None = None, base: BaseModelInfo | None = None,
                 engine: Engine | None = None):
        self.settings = settings or Settings()
        self.base = base or resolve_base_model(self.settings.base_model, self.settings.cache_dir,
                                               self.settings.base_model_name)
        self.engine = engine
        self._owned = engine is None

    async def __aenter__(self) -> EngineSession:
        if self.engine is None:
            from service.engine import create_engine

            self.engine = create_engine(self.settings, self.base)
            await self.engine.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._owned and self.engine is not None:
            await self.engine.shutdown()

    async def load(self, ref: AdapterRef) -> AdapterRef:
        assert self.engine is not None
        await self.engine.add_adapter(ref)
        return ref


async def _generate(engine: Engine, request_id: str, prompt: Sequence[int], ref: AdapterRef | None,
                    max_tokens: int, images: Sequence[Any] = ()) -> str:
    text = ""
    async for delta in engine.generate(request_id, list(prompt), ref, SamplingParams(max_tokens=max_tokens),
                                       images):
        text += delta.text
    return text


async def _generate_all(engine: Engine, prompts: list[list[int]], ref: AdapterRef, max_tokens: int,
                        concurrency: int = 32, images: Sequence[Sequence[Any]] | None = None) -> list[str]:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, prompt: list[int]) -> str:
        async with gate:
            return await _generate(engine, f"eval-{ref.key}-{i}", prompt, ref, max_tokens,
                                   images[i] if images else ())

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def sample_records(dataset: Path | str, split: str, limit: int | None, seed: int = 0) -> list[ChatRecord]:
    """One split of a dataset, or a seeded sample of `limit` of its records in file order: every
    evaluation of the same dataset and limit (router, expert, stacked) sees the same examples."""
    splits = load_splits(dataset, seed=seed, need_train=False)
    records = splits.split(split)
    if not records:
        raise DatasetError(dataset, None, f"the {split} split is empty")
    if limit and limit < len(records):
        keep = sorted(random.Random(f"{seed}:limit").sample(range(len(records)), limit))
        records = [records[i] for i in keep]
    return records


def router_gold(record: ChatRecord) -> str:
    """A routing record's answer; a task chat's `metadata.adapter` when evaluating on task files."""
    last = record.messages[-1]
    if last.get("role") == "assistant":
        return message_text(last["content"]).strip()
    if record.adapter:
        return record.adapter
    raise DatasetError(record.path, record.line, "no gold adapter: neither an assistant answer nor metadata.adapter")


async def evaluate_router_async(
    session: EngineSession,
    adapter: Path | str,
    dataset: Path | str,
    labels: Sequence[str] | None = None,
    split: str = "eval",
    limit: int | None = None,
    bins: int = 10,
    concurrency: int = 16,
) -> Evaluation:
    """Router figures through `Router.decide` with the router's calibration temperature (from its
    `loramux.json`), plus the coverage/accuracy curve over the routing threshold and the TF-IDF +
    logistic-regression baseline (`training.evaluate.baseline`) trained on the dataset's train split."""
    from service.routing.router import Router

    ref = await session.load(adapter_ref(adapter))
    meta = read_metadata(ref.path)
    labels = list(labels or meta.get("labels") or [])
    records = sample_records(dataset, split, limit)
    gold = [router_gold(r) for r in records]
    if not labels:
        labels = sorted(set(gold))
    if len(labels) < 2:
        raise DatasetError(dataset, None, f"a router needs at least two labels, got {labels}")
    assert session.engine is not None
    engine = session.engine
    fitted = meta.get("calibration")  # {"temperature": T, ...}, fitted on the val split by `loramux train`
    temperature = float(fitted.get("temperature", 1.0)) if isinstance(fitted, dict) else 1.0
    router = Router(engine)
    chats = [load_images(r.messages) for r in records]  # image parts: paths -> decoded images
    # concurrent decisions (at most `concurrency` in flight) so the engine batches them; input order kept
    decisions = await gather_limited(
        [functools.partial(router.decide, ref, labels, messages, temperature=temperature) for messages in chats],
        concurrency, "router decisions")
    prompts, images = zip(*(router.prompt(messages) for messages in chats), strict=True)
    free_text = await gather_limited(
        [functools.partial(_generate, engine, f"eval-{ref.key}-{i}", prompt, ref, 8, images[i])
         for i, prompt in enumerate(prompts)],
        concurrency, "free generation")
    free = [t.strip() for t in free_text]

    predicted = [d.top for d in decisions]
    confidences = [d.confidence for d in decisions]
    correct = [p == g for p, g in zip(predicted, gold, strict=True)]
    classes = m.per_class(gold, predicted, labels)
    calibration = m.expected_calibration_error(confidences, correct, bins)
    latencies = sorted(d.latency_ms for d in decisions)
    baseline = await asyncio.to_thread(_baseline, dataset, records, gold, labels, bins)
    report = {
        "kind": "router",
        "adapter": str(ref.path),
        "dataset": str(dataset),
        "split": split,
        "examples": len(records),
        "labels": labels,
        "accuracy": m.accuracy(gold, predicted),
        "macro_f1": m.macro_f1(classes),
        "per_class": classes,
        "confusion": m.confusion_matrix(gold, predicted, labels),
        "invalid_name_rate": m.invalid_rate(predicted, labels),
        "free_generation": {
            "accuracy": m.accuracy(gold, free),
            "invalid_name_rate": m.invalid_rate(free, labels),
            "invalid_examples": sorted({t for t in free if t not in labels})[:10],
        },
        "threshold_curve": m.threshold_curve(confidences, correct),
        "baseline": baseline,
        "calibration": {
            "temperature": temperature,
            "ece": calibration["ece"],
            "brier": m.brier_score([d.probabilities for d in decisions], gold),
            "mean_confidence": sum(confidences) / len(confidences),
            "bins": calibration["bins"],
        },
        "latency_ms": {"p50": latencies[len(latencies) // 2], "max": latencies[-1]},
        "errors": [
            {"text": r.user_text, "gold": g, "predicted": p, "confidence": round(c, 4)}
            for r, g, p, c in zip(records, gold, predicted, confidences, strict=True)
            if g != p
        ][:25],
    }
    return Evaluation("router", report)


def _baseline(dataset: Path | str, records: Sequence[ChatRecord], gold: Sequence[str], labels: Sequence[str],
              bins: int) -> dict[str, Any] | None:
    """The classical baseline on the evaluated examples, trained on the dataset folder's train.jsonl;
    None when there is none (a plain chat JSONL, or a folder without train data or labels to learn)."""
    from training.evaluate.baseline import tfidf_logreg

    if not (Path(dataset).is_dir() and (Path(dataset) / "train.jsonl").is_file()):
        log.info("baseline skipped: %s has no train split (train.jsonl)", dataset)
        return None
    splits = load_splits(dataset, seed=0)
    train = [(r.user_text, router_gold(r)) for r in splits.train]
    try:
        result = tfidf_logreg(train, [(r.user_text, g) for r, g in zip(records, gold, strict=True)], labels, bins)
    except ValueError as exc:
        log.info("baseline skipped: %s", exc)
        return None
    result.pop("predictions")
    return result


async def evaluate_expert_async(
    session: EngineSession,
    adapter: Path | str,
    dataset: Path | str,
    tools: Sequence[str] | None = None,
    split: str = "eval",
    limit: int | None = None,
    max_tokens: int = 160,
    declared_tools: Sequence[dict[str, Any]] | None = None,
) -> Evaluation:
    """`declared_tools`: OpenAI tools every request declares (as an agent framework sends them), for
    records that carry none of their own; the report says so (`declared_tools`)."""
    ref = await session.load(adapter_ref(adapter))
    meta = read_metadata(ref.path)
    records = sample_records(dataset, split, limit)
    if declared_tools:
        records = [r if r.tools else replace(r, tools=list(declared_tools)) for r in records]
    tool_names = list(tools or meta.get("tools") or [])
    if not tool_names:
        tool_names = sorted({c["name"] for r in records if (c := parse_tool_call(_answer(r)))})
    assert session.engine is not None
    tokenizer = session.engine.tokenizer
    chats = [load_images(r.messages[:-1]) for r in records]
    call_format = call_format_of(meta.get("tool_call_format"), "json")
    shown = meta.get("tools_in_prompt", True) is not False
    prompts = [prompt_ids(tokenizer, chat, None, tools_to_show(r.tools, shown), call_format)
               for chat, r in zip(chats, records, strict=True)]
    outputs = await _generate_all(session.engine, prompts, ref, max_tokens=max_tokens,
                                  images=[chat_images(chat) for chat in chats])
    exact = [same_tool_call(o, _answer(r)) for o, r in zip(outputs, records, strict=True)]
    valid = [is_valid_tool_call(o, tool_names) for o in outputs]
    by_tool: dict[str, dict[str, list[bool]]] = defaultdict(lambda: {"exact": [], "valid": []})
    for r, e, v in zip(records, exact, valid, strict=True):
        call = parse_tool_call(_answer(r))
        key = call["name"] if call else "?"
        by_tool[key]["exact"].append(e)
        by_tool[key]["valid"].append(v)
    report = {
        "kind": "task",
        "adapter": str(ref.path),
        "dataset": str(dataset),
        "split": split,
        "examples": len(records),
        "tools": tool_names,
        "declared_tools": len(declared_tools or ()),
        "exact_match": m.rate(exact),
        "valid_tool_call_rate": m.rate(valid),
        "per_tool": {
            k: {"examples": len(v["exact"]), "exact_match": m.rate(v["exact"]), "valid": m.rate(v["valid"])}
            for k, v in sorted(by_tool.items())
        },
        "errors": [
            {"text": r.user_text, "expected": _answer(r), "output": o, "valid": v}
            for r, o, e, v in zip(records, outputs, exact, valid, strict=True)
            if not e
        ][:25],
    }
    return Evaluation("task", report)


def _answer(record: ChatRecord) -> str:
    return message_text(record.messages[-1].get("content")).strip()


def evaluate_router(adapter: Path | str, dataset: Path | str, settings: Settings | None = None, **kwargs: Any
                    ) -> Evaluation:
    """Blocking wrapper: start an engine, evaluate one router, stop the engine."""

    async def run() -> Evaluation:
        async with EngineSession(settings) as session:
            return await evaluate_router_async(session, adapter, dataset, **kwargs)

    return asyncio.run(run())


def evaluate_expert(adapter: Path | str, dataset: Path | str, settings: Settings | None = None, **kwargs: Any
                    ) -> Evaluation:
    async def run() -> Evaluation:
        async with EngineSession(settings) as session:
            return await evaluate_expert_async(session, adapter, dataset, **kwargs)

    return asyncio.run(run())
