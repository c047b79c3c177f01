"""The demo experts' datasets, built from real public data (see `training.data.sources`).

For each expert a folder `<out>/<name>/` with `all.jsonl` (every record: what `loramux dataset
build --source name=<out>/<name>/all.jsonl` reads), its train/val/eval split (stratified by intent,
no identical user text across splits) and a card. The system prompt and the tool names are kept in
the card: training copies them into the adapter's `loramux.json`, so the service can supply the
same system prompt and evaluation knows which tool names are valid. The card also keeps each
expert's OpenAI tool schemas (`tool_schemas`, derived from its answers by `tool_schemas.py`): what
an agent framework would declare, so evaluation can ask with and without a `tools` list.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.data.cards import write_card
from training.data.chats import normalize_text, write_jsonl
from training.data.splits import SPLITS, check_no_leakage, stratified_split
from training.data.tool_calls import CALENDAR_TOOL
from training.data.tool_schemas import tool_schemas

DEMO_EXPERTS = ("lights", "climate", "timer", "media", "lists", "calendar")


@dataclass(frozen=True)
class TaskDataset:
    name: str
    path: Path  # the folder with train/val/eval.jsonl
    all_file: Path
    counts: dict[str, int]
    tools: list[str]
    system_prompt: str | None
    tool_schemas: list[dict[str, Any]]  # OpenAI tools, as an agent would declare them


def available_experts() -> list[str]:
    from training.data.sources import hass

    return [*hass.EXPERTS, "calendar"]


def expert_records(name: str, count: int, seed: int, intents: Any = None) -> tuple[list[dict], dict[str, Any]]:
    """Records for one expert and the card facts about their source."""
    if name == "calendar":
        from training.data.sources import timeparse

        records, dropped = timeparse.calendar_records()
        rng = random.Random(f"{seed}:calendar")
        if len(records) > count:
            records = rng.sample(records, count)
        source = {"name": "ctparse", "origin": timeparse.SOURCE_URL, "license": timeparse.LICENSE,
                  "records": len(records)}
        return records, {"source": source, "dropped": dict(dropped), "tools": [CALENDAR_TOOL], "system_prompt": None,
                         "description": timeparse.DESCRIPTION}
    from training.data.sources import hass

    spec = hass.EXPERTS.get(name)
    if spec is None:
        raise ValueError(f"unknown expert {name!r}; choose from {', '.join(available_experts())}")
    records = hass.expert_records(spec, count, seed, intents)
    source = {"name": "home-assistant-intents (en) via hassil", "origin": hass.SOURCE_URL, "license": hass.LICENSE,
              "records": len(records)}
    return records, {"source": source, "dropped": {}, "tools": sorted(spec.intents),
                     "system_prompt": spec.system_prompt, "description": spec.description}


def build_task_datasets(
    out_root: Path,
    experts: Sequence[str] = DEMO_EXPERTS,
    per_expert: int = 400,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> dict[str, TaskDataset]:
    intents = None
    if any(name != "calendar" for name in experts):
        from training.data.sources.hass import load_intents

        intents = load_intents()
    out: dict[str, TaskDataset] = {}
    for name in experts:
        records, facts = expert_records(name, per_expert, seed, intents)
        schemas = tool_schemas(r["messages"][-1]["content"] for r in records)
        folder = out_root / name
        folder.mkdir(parents=True, exist_ok=True)

        def user_key(r: dict) -> str:
            return normalize_text(r["messages"][1]["content"])

        splits = stratified_split(records, lambda r: r["metadata"]["intent"], user_key, fractions, seed)
        check_no_leakage(splits, user_key)
        all_file = folder / "all.jsonl"
        write_jsonl(all_file, records)
        for split in SPLITS:
            write_jsonl(folder / f"{split}.jsonl", splits[split])
        counts = {split: len(splits[split]) for split in SPLITS}
        by_intent = {split: dict(sorted(Counter(r["metadata"]["intent"] for r in splits[split]).items()))
                     for split in SPLITS}
        write_card(folder, {
            "title": f"Expert dataset: {name}",
            "description": f"{facts['description']}; user turn -> one JSON tool call. Seed {seed}.",
            "kind": "task",
            "adapter": name,
            "tools": facts["tools"],
            "tool_schemas": schemas,
            "system_prompt": facts["system_prompt"],
            "seed": seed,
            "counts": by_intent,
            "sources": [facts["source"]],
            "processing": {"deduplication": "case/whitespace-folded user text",
                           "split": "stratified by intent, no identical user text across splits (checked)"},
            "dropped": facts["dropped"],
        })
        out[name] = TaskDataset(name, folder, all_file, counts, facts["tools"], facts["system_prompt"], schemas)
    hass_records = sum(sum(d.counts.values()) for n, d in out.items() if n != "calendar")
    summary = {
        "title": "Demo expert datasets",
        "description": "One folder per expert; see each folder's README.md.",
        "counts": {split: {n: d.counts[split] for n, d in out.items()} for split in SPLITS},
        "sources": [
            {"name": "home-assistant-intents", "origin": "https://github.com/home-assistant/intents",
             "license": "Apache-2.0", "records": hass_records},
            {"name": "ctparse corpus", "origin": "https://github.com/comtravo/ctparse", "license": "MIT",
             "records": sum(sum(d.counts.values()) for n, d in out.items() if n == "calendar")},
        ],
    }
    write_card(out_root, summary)
    return out
