"""`loramux dataset build`: the router's dataset from per-adapter chat files.

Each source file holds chats that adapter NAME should answer; the router learns to read the last
user turn and answer with NAME. The prompt is built by `service.prompts.router_messages`, the
function serving uses, so training and serving see the same tokens. Texts are deduplicated
(case/whitespace folded); a text claimed by two adapters is ambiguous and dropped from both; the
split is stratified and leakage-free (see `training.data.splits`); only the train split is balanced,
so val and eval keep the natural class mix.

Each record also keeps what a stacked evaluation (`training.evaluate.stacked`) needs to judge the expert's
answer, so the routing folder alone is enough for it: `metadata.request`, the conversation the user
sends (the source chat without its final answer and without system turns, which belong to the expert:
the service supplies the chosen expert's own system prompt), and `metadata.reference`, the source
chat's final assistant answer. Source chats without an answer (routing-only data) have neither.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from service.names import name_problem
from service.prompts import message_text, router_messages
from training.data.cards import write_card
from training.data.chats import ChatRecord, DatasetError, chat_key, read_chats, write_jsonl
from training.data.splits import SPLITS, balance, cap_per_class, check_no_leakage, stratified_split


@dataclass(frozen=True)
class Example:
    """One routing example: the user's text, the adapter that should answer, where it came from."""

    label: str
    record: ChatRecord

    @property
    def key(self) -> str:
        return chat_key(self.record.messages)

    def to_json(self) -> dict[str, Any]:
        return {
            "messages": [*router_messages(self.record.messages), {"role": "assistant", "content": self.label}],
            "metadata": {"adapter": self.label, "source": self.record.path, "line": self.record.line,
                         **reference_fields(self.record.messages)},
        }


def reference_fields(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """`request` and `reference` of a source chat (see the module docstring); {} without an answer."""
    last = messages[-1]
    answer = message_text(last.get("content")).strip() if last.get("role") == "assistant" else ""
    if not answer:
        return {}
    return {"request": [m for m in messages[:-1] if m.get("role") != "system"], "reference": answer}


@dataclass(frozen=True)
class RoutingDataset:
    path: Path
    labels: list[str]
    counts: dict[str, dict[str, int]]
    card: dict[str, Any]


def parse_source_args(values: list[str]) -> dict[str, Path]:
    """`NAME=FILE.jsonl` strings -> {name: path}, with the name rules the registry enforces."""
    sources: dict[str, Path] = {}
    for value in values:
        name, sep, file = value.partition("=")
        name = name.strip()
        if not sep or not file:
            raise DatasetError(value, None, "a source must be NAME=FILE.jsonl")
        check_adapter_name(name, where=value)
        if name in sources:
            raise DatasetError(value, None, f"adapter {name!r} is given twice")
        sources[name] = Path(file)
    return sources


def check_adapter_name(name: str, where: str | Path = "") -> None:
    """The registry's name rule (`service.names`): a label the service could never register is refused here."""
    problem = name_problem(name)
    if problem is not None:
        raise DatasetError(where or name, None, problem)


def default_out_dir(root: Path, prefix: str = "routing") -> Path:
    return root / "datasets" / f"{prefix}_{datetime.now():%Y%m%d_%H%M%S}"


def build_routing_dataset(
    sources: dict[str, Path],
    out_dir: Path,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    balance_mode: str = "upsample",
    max_per_class: int | None = None,
) -> RoutingDataset:
    """Read, dedupe, split and balance; write train/val/eval JSONL and the card to `out_dir`."""
    if len(sources) < 2:
        only = ", ".join(sources) or "none"
        raise DatasetError(next(iter(sources.values()), "--source"), None,
                           f"a router needs at least two adapters to choose between (got {only})")
    examples: list[Example] = []
    per_source: dict[str, dict[str, Any]] = {}
    for name, path in sources.items():
        check_adapter_name(name, where=path)
        records = read_chats(path, need_assistant=False)
        for record in records:
            tagged = record.adapter
            if tagged is not None and tagged != name:
                raise DatasetError(path, record.line,
                                   f"metadata.adapter is {tagged!r} but this file was given as {name}=")
        examples.extend(Example(name, r) for r in records)
        per_source[name] = {"name": name, "origin": str(path), "records": len(records),
                            "license": _licence(records)}

    deduped, duplicates, conflicts = _dedupe(examples)
    counts_before = Counter(e.label for e in deduped)
    for name in sources:
        if counts_before[name] < 3:
            raise DatasetError(sources[name], None,
                               f"adapter {name!r} has {counts_before[name]} distinct user text(s) after "
                               "deduplication; at least 3 are needed for train/val/eval")
    deduped = cap_per_class(deduped, lambda e: e.label, max_per_class, seed)
    splits = stratified_split(deduped, lambda e: e.label, lambda e: e.key, fractions, seed)
    check_no_leakage(splits, lambda e: e.key)
    train, balance_report = balance(splits["train"], lambda e: e.label, balance_mode, seed)
    splits["train"] = train

    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        write_jsonl(out_dir / f"{split}.jsonl", (e.to_json() for e in splits[split]))
    labels = sorted(sources)
    counts = {split: dict(sorted(Counter(e.label for e in splits[split]).items())) for split in SPLITS}
    card = {
        "title": f"Routing dataset ({len(labels)} adapters)",
        "description": (
            "User turns from per-adapter chat files, answered with the adapter's name. Prompts are built with "
            "service.prompts.router_messages (the router's system prompt + the last user turn)."
        ),
        "kind": "routing",
        "labels": labels,
        "seed": seed,
        "fractions": list(fractions),
        "counts": counts,
        "sources": list(per_source.values()),
        "processing": {
            "deduplication": "case- and whitespace-folded user text (and its images' hashes), per adapter",
            "ambiguous texts dropped": f"{len(conflicts)} (same text under several adapters)",
            "duplicates dropped": sum(duplicates.values()),
            "max per class": max_per_class if max_per_class is not None else "none",
            "balance (train only)": balance_mode,
            "balance report": balance_report,
            "leakage check": "passed: no identical user text in two splits",
        },
        "dropped": {"duplicates": dict(duplicates), "ambiguous": conflicts[:20]},
    }
    write_card(out_dir, card)
    return RoutingDataset(out_dir, labels, counts, card)


def _dedupe(examples: list[Example]) -> tuple[list[Example], Counter[str], list[str]]:
    by_key: dict[str, list[Example]] = {}
    for example in examples:
        by_key.setdefault(example.key, []).append(example)
    kept: list[Example] = []
    duplicates: Counter[str] = Counter()
    conflicts: list[str] = []
    for key, group in by_key.items():
        labels = {e.label for e in group}
        if len(labels) > 1:
            conflicts.append(key)
            continue
        kept.append(group[0])
        duplicates[group[0].label] += len(group) - 1
    return kept, duplicates, conflicts


def _licence(records: list[ChatRecord]) -> str:
    values = {str(r.metadata.get("license")) for r in records if r.metadata.get("license")}
    return ", ".join(sorted(values)) or "see source"
