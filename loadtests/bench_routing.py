"""What routing costs a request, on a running service: `/route` next to a 1-token generation of the same
prompt (a decision should cost about one prefill), `model="auto"` next to the same request pinned to
the adapter the router chose, end to end, at concurrency 1, 16 and 64; and /route over a 1-token
generation for three label sets (names with distinct first tokens, names sharing their first tokens,
64 adapters), each on a server of its own, since a decision must cost the same whatever the adapters
are called."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Sequence
from pathlib import Path

import httpx

from loadtests.bench_grid import ADAPTERS, PROMPTS
from service.base_model import BaseModelInfo
from service.registration import register_adapter
from service.settings import Settings

LABEL_SETS = {
    "distinct": ADAPTERS,
    "shared": ("weather-today", "weather-week", "weather-month", "weather-alerts"),
    "many": tuple(f"expert-{i:02d}" for i in range(64)),
}


async def route_over_generation(client: httpx.AsyncClient, rounds: int) -> tuple[list[float], list[float]]:
    """/route and a 1-token generation with the chosen adapter, for the same prompts, in turn."""
    import time

    route_ms, gen1_ms = [], []
    for i in range(rounds + 1):
        prompt = PROMPTS[i % len(PROMPTS)]
        started = time.perf_counter()
        r = await client.post("/route", json={"prompt": prompt})
        r.raise_for_status()
        routed = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        g = await client.post("/generate", json={"prompt": prompt, "adapter": r.json()["adapter"], "max_tokens": 1})
        g.raise_for_status()
        if i:  # the first round warms the router's prefix cache and the adapters up
            route_ms.append(routed)
            gen1_ms.append((time.perf_counter() - started) * 1000)
    return route_ms, gen1_ms


async def routing_latency(url: str, rounds: int = 8, concurrency: Sequence[int] = (1, 16, 64)) -> dict[str, float]:
    """Medians: /route vs a 1-token generation; auto vs pinned end to end at each concurrency (16 new
    tokens; the pinned wave sends each prompt to the adapter its auto twin was routed to)."""
    import time

    out: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        async def timed(body: dict) -> tuple[float, dict]:
            started = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            return (time.perf_counter() - started) * 1000, r.json()

        def chat(prompt: str, model: str) -> dict:
            return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
                    "temperature": 0}

        route_ms, gen1_ms = await route_over_generation(client, rounds)
        out["route_ms_p50"] = statistics.median(route_ms)
        out["gen_1token_ms_p50"] = statistics.median(gen1_ms)
        out["route_over_1token"] = out["route_ms_p50"] / out["gen_1token_ms_p50"]
        for c in concurrency:
            auto_ms, pinned_ms = [], []
            for i in range(max(1, rounds // 2) if c < 64 else 1):
                prompts = [PROMPTS[(i + k) % len(PROMPTS)] for k in range(c)]
                auto = await asyncio.gather(*[timed(chat(p, "auto")) for p in prompts])
                auto_ms.extend(ms for ms, _ in auto)
                pinned = await asyncio.gather(*[timed(chat(p, body["model"]))
                                                for p, (_, body) in zip(prompts, auto, strict=True)])
                pinned_ms.extend(ms for ms, _ in pinned)
            out[f"auto_ms_p50_c{c}"] = statistics.median(auto_ms)
            out[f"pinned_ms_p50_c{c}"] = statistics.median(pinned_ms)
            out[f"auto_over_pinned_c{c}"] = out[f"auto_ms_p50_c{c}"] / out[f"pinned_ms_p50_c{c}"]
    return out


def label_set_latency(base: BaseModelInfo, root: Path, engine: str, cache_dir: Path,
                      rounds: int = 12) -> dict[str, float]:
    """/route over a 1-token generation for each of LABEL_SETS (the same three adapter folders
    registered under every name), one server per set."""
    from loadtests.harness import ServerProcess

    out: dict[str, float] = {}
    for label_set, names in LABEL_SETS.items():
        registry = root / f"loras-{engine}-{label_set}.json"
        settings = Settings(registry=registry, adapter_root=root, cache_dir=cache_dir)
        for i, name in enumerate(names):
            register_adapter(settings, base, "task", name, root / ADAPTERS[i % len(ADAPTERS)])
        register_adapter(settings, base, "router", "router", root / "router", labels=names)
        env = {"LORAMUX_REGISTRY": str(registry), "LORAMUX_ADAPTER_ROOT": str(root),
               "LORAMUX_CACHE_DIR": str(cache_dir), "LORAMUX_ENGINE": engine,
               "LORAMUX_MAX_LORAS": str(len(names) + 2)}
        server = ServerProcess(env, startup_timeout=900).start(root / f"server-{engine}-{label_set}.log")
        try:
            async def measure(url: str = server.url) -> tuple[list[float], list[float]]:
                async with httpx.AsyncClient(base_url=url, timeout=600) as client:
                    return await route_over_generation(client, rounds)

            route_ms, gen1_ms = asyncio.run(measure())
        finally:
            server.stop()
        out[f"route_ms_p50_{label_set}"] = statistics.median(route_ms)
        out[f"gen_1token_ms_p50_{label_set}"] = statistics.median(gen1_ms)
        out[f"route_over_1token_{label_set}"] = out[f"route_ms_p50_{label_set}"] / out[f"gen_1token_ms_p50_{label_set}"]
        print(f"  route over 1 token, {label_set} names: {out[f'route_over_1token_{label_set}']:.2f}", flush=True)
    return out
