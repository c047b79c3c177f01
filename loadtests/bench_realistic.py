"""The matrix's realistic row: the demo's trained experts answering their own eval requests (a system
prompt and a user request in, one JSON tool call out, ending at the end-of-turn token), pinned to the
right expert and routed (`model="auto"`), interleaved across experts. Short answers weigh prefill and
per-request work more than the synthetic grid's fixed lengths do, so this row says what a user with
such experts gets. It needs the demo (`loramux demo`, which `make run` and `make bench` build); without
one the row is skipped with a message."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.bench_load import run_point, warm_up
from service.registry import Registry

PER_EXPERT = 8
CONCURRENCY = 16
MAX_TOKENS = 128  # the demo's answers are 20-40 tokens; the end of turn ends them


@dataclass(frozen=True)
class DemoSet:
    """The demo's registry and root, its experts' folders and ranks, and the requests to send."""

    registry: Path
    root: Path
    paths: dict[str, Path]
    max_rank: int
    requests: list[tuple[str, list[dict[str, Any]]]]  # (expert, messages without the answer)
    max_tokens: int = MAX_TOKENS


def demo_set(registry: Path, root: Path, per_expert: int = PER_EXPERT, max_tokens: int = MAX_TOKENS) -> DemoSet | None:
    """The demo's active experts and `per_expert` eval requests of each, round robin, answers capped at
    `max_tokens`; None without a demo (no registry, no router, or an expert whose eval split is gone)."""
    if not registry.is_file():
        return None
    snapshot = Registry(registry).load()
    experts = snapshot.active_versions("task")
    if not experts or snapshot.router() is None:
        return None
    by_expert: dict[str, list[list[dict[str, Any]]]] = {}
    for version in experts:
        eval_file = Path(version.dataset.get("path", "")) / "eval.jsonl"
        if not eval_file.is_file():
            return None
        records = [json.loads(line) for line in eval_file.read_text().splitlines() if line.strip()]
        by_expert[version.name] = [[m for m in r["messages"] if m["role"] != "assistant"]
                                   for r in records[:per_expert]]
    requests = [(name, chats[i]) for i in range(per_expert) for name, chats in by_expert.items() if i < len(chats)]
    paths = {v.name: (root / v.path) if not Path(v.path).is_absolute() else Path(v.path) for v in experts}
    return DemoSet(registry, root, paths, max(v.rank for v in experts), requests, max_tokens)


def measure_realistic(url: str, demo: DemoSet, routed: bool, label: str) -> dict[str, Any]:
    """The demo's requests at CONCURRENCY, each pinned to its expert or sent as `model="auto"`."""
    bodies = [{"model": "auto" if routed else name, "messages": messages, "max_tokens": demo.max_tokens,
               "temperature": 0} for name, messages in demo.requests]
    asyncio.run(warm_up(url, list(demo.paths)))
    result = asyncio.run(run_point(url, bodies, CONCURRENCY))
    print(f"  {label:<22} realistic {'routed' if routed else 'pinned'}: {result.tok_s:8.1f} tok/s  "
          f"{result.req_s:5.2f} req/s  TTFT p50 {result.ttft_p50_ms or 0:6.0f} ms", flush=True)
    return result.to_json()
