"""The benchmark matrix's synthetic part: concurrency x new tokens x adapter mix, the same requests for
every server that speaks OpenAI chat (our service on either engine, vLLM's own server).

Every answer runs to its full length (`ignore_eos`, which both servers accept), so a point's tokens
are known and per-token costs compare across lengths. A point at concurrency c >= 2 sends one wave of
c requests (all in flight at once, the load the point names); at concurrency 1 it sends a few in turn.
Request i goes to mix[i % n], so every adapter of the mix is in every batch."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loadtests.bench_load import PointResult, run_point, warm_up

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a child.",
    "Describe your ideal weekend in the mountains.",
    "List some tips for learning a new language.",
]
ADAPTERS = ("alpha", "beta", "gamma")
MORE_ADAPTERS = tuple(f"extra-{i}" for i in range(9))  # with ADAPTERS: the 12-adapter mix
SEQUENTIAL_REQUESTS = {32: 3, 256: 2}  # at concurrency 1: a few requests in turn (fewer when long)


@dataclass(frozen=True)
class Grid:
    """The points to measure. `base_points`: the (concurrency, tokens) at which the base model is also
    measured on the same server (for LoRA's cost); the adapter mixes run at every point."""

    concurrency: tuple[int, ...] = (1, 16, 64)
    new_tokens: tuple[int, ...] = (32, 256)
    mixes: tuple[str, ...] = ("3", "12")
    base_points: tuple[tuple[int, int], ...] = ((16, 32), (64, 32))


FULL = Grid()
# `--quick`: the same code on a grid small enough for a test (seconds, not an hour)
QUICK = Grid(concurrency=(1, 4), new_tokens=(4, 8), mixes=("3",), base_points=((4, 4),))


def mix_models(mix: str, base_name: str) -> list[str]:
    return {"base": [base_name], "3": list(ADAPTERS), "12": [*ADAPTERS, *MORE_ADAPTERS]}[mix]


def point_key(concurrency: int, new_tokens: int, mix: str) -> str:
    return f"c{concurrency}_t{new_tokens}_{mix}"


def bodies(models: Sequence[str], concurrency: int, new_tokens: int) -> list[dict[str, Any]]:
    count = concurrency if concurrency > 1 else SEQUENTIAL_REQUESTS.get(new_tokens, 3)
    return [{"model": models[i % len(models)], "temperature": 0, "max_tokens": new_tokens, "ignore_eos": True,
             "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]} for i in range(count)]


def points(grid: Grid, mixes: Sequence[str], every_point: bool = False) -> list[tuple[int, int, str]]:
    """(concurrency, tokens, mix) for the mixes asked: every point for adapter mixes, the base points
    for "base" (every point too with `every_point`: a server that only has the base model)."""
    out = []
    for mix in mixes:
        for c in grid.concurrency:
            for t in grid.new_tokens:
                if mix != "base" or every_point or (c, t) in grid.base_points:
                    out.append((c, t, mix))
    return out


def measure_grid(url: str, base_name: str, grid: Grid, mixes: Sequence[str], label: str,
                 headers: Mapping[str, str] | None = None, every_point: bool = False) -> dict[str, dict[str, Any]]:
    """Every point of `grid` for `mixes` against the server at `url`, one after another."""
    models = sorted({m for mix in mixes for m in mix_models(mix, base_name)})
    asyncio.run(warm_up(url, models, dict(headers or {})))
    out: dict[str, dict[str, Any]] = {}
    for c, t, mix in points(grid, mixes, every_point):
        result: PointResult = asyncio.run(run_point(url, bodies(mix_models(mix, base_name), c, t), c,
                                                    dict(headers or {})))
        out[point_key(c, t, mix)] = result.to_json()
        print(f"  {label:<22} c={c:<3} tokens={t:<4} mix={mix:<5} {result.tok_s:8.1f} tok/s  "
              f"TTFT p50 {result.ttft_p50_ms or 0:7.0f} ms  TPOT p50 {result.tpot_p50_ms or 0:6.1f} ms", flush=True)
    return out
