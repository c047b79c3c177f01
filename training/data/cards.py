"""Dataset cards: `card.json` for programs and `README.md` for people, beside the JSONL files.

A card says what is in the folder (counts per class and split), where it came from (sources,
licences, checksums) and what was done to it (dedup, conflicts dropped, balancing, length
filtering), so a dataset can be trusted or questioned without re-running the build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.data.chats import write_json

CARD_JSON = "card.json"
CARD_MD = "README.md"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_card(card: dict[str, Any]) -> str:
    parts = [f"# {card.get('title', 'Dataset')}", "", str(card.get("description", "")).strip(), ""]
    counts: dict[str, dict[str, int]] = card.get("counts", {})
    if counts:
        classes = sorted({c for split in counts.values() for c in split})
        splits = list(counts)
        rows = [[c, *[counts[s].get(c, 0) for s in splits]] for c in classes]
        rows.append(["**total**", *[sum(counts[s].values()) for s in splits]])
        parts += ["## Records per class", "", _table(["class", *splits], rows), ""]
    sources = card.get("sources", [])
    if sources:
        rows = [[s.get("name", ""), s.get("origin", ""), s.get("license", ""), s.get("records", "")] for s in sources]
        parts += ["## Sources", "", _table(["name", "origin", "licence", "records"], rows), ""]
    for key, title in (("processing", "Processing"), ("dropped", "Dropped")):
        value = card.get(key)
        if value:
            parts += [f"## {title}", ""]
            if isinstance(value, dict):
                parts += [f"- {k}: {v}" for k, v in value.items()]
            else:
                parts += [f"- {v}" for v in value]
            parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def write_card(folder: Path, card: dict[str, Any]) -> None:
    write_json(folder / CARD_JSON, card)
    (folder / CARD_MD).write_text(render_card(card), encoding="utf-8")
