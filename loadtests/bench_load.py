"""One point of load, measured the way a user sizes hardware: a set of chat requests sent through an
OpenAI-compatible `/v1/chat/completions` with at most `concurrency` in flight, each streamed, so that
every request gives its time to first token (TTFT) and its time per output token after the first
(TPOT). The same code measures our service on either engine and vLLM's own server, so their figures
differ only by the server.

Token counts come from the stream's final usage chunk (`stream_options.include_usage`, which both
servers send), never from counting chunks: a server may hold a delta back (a partial stop string, an
incomplete UTF-8 sequence) and send two tokens in one chunk."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import numpy as np


@dataclass(frozen=True)
class PointResult:
    """What one point of the matrix measured. Latencies in milliseconds; None where a figure has no
    meaning (a reference that does not stream has no TTFT)."""

    tok_s: float
    req_s: float
    requests: int
    tokens: int
    seconds: float
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    tpot_p50_ms: float | None = None
    tpot_p99_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Timing:
    """One streamed request: seconds to its first content, seconds from first to last content, tokens."""

    ttft_s: float
    decode_s: float
    tokens: int


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def summarize(timings: Sequence[Timing], seconds: float) -> PointResult:
    tokens = sum(t.tokens for t in timings)
    ttft = [t.ttft_s * 1000 for t in timings]
    tpot = [t.decode_s * 1000 / (t.tokens - 1) for t in timings if t.tokens > 1]
    return PointResult(
        tok_s=tokens / seconds, req_s=len(timings) / seconds, requests=len(timings), tokens=tokens,
        seconds=seconds, ttft_p50_ms=percentile(ttft, 50), ttft_p99_ms=percentile(ttft, 99),
        tpot_p50_ms=percentile(tpot, 50), tpot_p99_ms=percentile(tpot, 99),
    )


async def stream_chat(client: httpx.AsyncClient, body: dict[str, Any]) -> Timing:
    """Send one streamed chat request and time it (raises on an error status or an error event)."""
    started = time.perf_counter()
    first = last = None
    tokens = 0
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            for choice in event.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("tool_calls"):
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
    if first is None or last is None:
        first = last = time.perf_counter()
    return Timing(ttft_s=first - started, decode_s=last - first, tokens=tokens)


async def run_point(url: str, bodies: Sequence[dict[str, Any]], concurrency: int,
                    headers: dict[str, str] | None = None) -> PointResult:
    """All `bodies`, at most `concurrency` in flight (a closed loop: a finished request lets the next
    one in), timed from the first send to the last answer."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits, headers=headers) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(body: dict[str, Any]) -> Timing:
            async with gate:
                return await stream_chat(client, body)

        started = time.perf_counter()
        timings = await asyncio.gather(*[one(b) for b in bodies])
        return summarize(timings, time.perf_counter() - started)


async def warm_up(url: str, models: Sequence[str], headers: dict[str, str] | None = None) -> None:
    """One short request per model, so that loading an adapter is not part of the first point."""
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers) as client:
        for model in dict.fromkeys(models):
            await stream_chat(client, {"model": model, "messages": [{"role": "user", "content": "Hello"}],
                                       "max_tokens": 4, "temperature": 0})
