"""The stacked evaluation through a running service (`loramux eval --kind stacked --server URL`).

Requests go where a client's go, the OpenAI-compatible `POST /v1/chat/completions`: `model="auto"` for
the routed answer (the `X-Loramux-Route` header says what the router chose and how sure it was),
the true expert's name for the oracle answer, the base model's name (read from `GET /v1/models`) for
the base answer; greedy decoding (`temperature=0`), as the in-process run uses. The bearer key comes
from `LORAMUX_API_KEY` in the environment, as for `modal run -m deploy.modal_app::smoke`.

What the service does not say is left out rather than guessed: the OpenAI API reports no routing
latency (the answer latency is the whole request as the client sees it, routing included), and on a
fallback the router's top candidate is not named (such a request counts as misrouted).
"""

from __future__ import annotations

import asyncio
import base64
import json
import mimetypes
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from service.prompts import is_image_part
from training.evaluate.router_and_experts import Evaluation
from training.evaluate.stacked import (
    ExpertSpec,
    Routed,
    RouterSpec,
    StackedError,
    StackedExample,
    StackedSetup,
    check_experts,
    run_stacked,
    stacked_examples,
    stacked_report,
)

API_KEY_ENV = "LORAMUX_API_KEY"


def openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The dataset's chat in OpenAI's shape: image parts (paths on this machine) become data URLs."""

    def part(p: Any) -> Any:
        if not is_image_part(p) or not isinstance(p.get("image"), str):
            return p
        path = Path(p["image"])
        mime = mimetypes.guess_type(path.name)[0] or "image/png"
        url = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
        return {"type": "image_url", "image_url": {"url": url}}

    return [{**msg, "content": [part(p) for p in msg["content"]]} if isinstance(msg.get("content"), list) else msg
            for msg in messages]


class HttpBackend:
    """A service's view: its active router and its served experts, answering over HTTP."""

    def __init__(self, url: str, api_key: str | None, max_tokens: int, timeout_s: float = 600.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout_s)
        self.max_tokens = max_tokens
        self.base_name = ""

    async def __aenter__(self) -> HttpBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    async def setup(self, experts: Sequence[str], router: str | None = None) -> StackedSetup:
        """Router and experts as `GET /v1/models` lists them: the base model (no parent), `auto` (its
        `root` is the active router) and the served adapters among `experts` (the dataset's: the list
        does not say which served adapters are routers)."""
        models = (await self._call("GET", "/v1/models")).json()["data"]
        self.base_name = next(card["id"] for card in models if card.get("parent") is None)
        auto = next((card for card in models if card["id"] == "auto"), None)
        if auto is None:
            raise StackedError(self.url, None, "the service has no router (no 'auto' model)")
        if router and router != auto["root"]:
            raise StackedError(self.url, None, f"the service routes with {auto['root']!r}, not {router!r}")
        served = {card["id"] for card in models}
        names = tuple(name for name in experts if name in served)
        return StackedSetup(RouterSpec(auto["root"], None, names), {name: ExpertSpec(name, None) for name in names})

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        response = await self.client.request(method, path, json=body)
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise StackedError(f"{self.url}{path}", None, f"HTTP {response.status_code}: {message}")
        return response

    async def _chat(self, example: StackedExample, model: str) -> tuple[httpx.Response, float]:
        body = {"model": model, "messages": openai_messages(example.request), "max_tokens": self.max_tokens,
                "temperature": 0.0}
        started = time.perf_counter()
        response = await self._call("POST", "/v1/chat/completions", body)
        return response, (time.perf_counter() - started) * 1000

    @staticmethod
    def _text(response: httpx.Response) -> str:
        return response.json()["choices"][0]["message"]["content"] or ""

    async def routed(self, example: StackedExample) -> Routed:
        response, ms = await self._chat(example, "auto")
        route = json.loads(response.headers.get("x-loramux-route", "{}"))
        adapter = route.get("adapter")
        top = None if route.get("fallback") else adapter
        return Routed(adapter, top, float(route.get("confidence", 0.0)), None, self._text(response), ms)

    async def pinned(self, example: StackedExample, adapter: str | None) -> tuple[str, float]:
        response, ms = await self._chat(example, adapter or self.base_name)
        return self._text(response), ms


async def evaluate_stacked_server_async(url: str, dataset: Path | str, split: str = "eval", limit: int | None = None,
                                        max_tokens: int = 160, router: str | None = None, concurrency: int = 8,
                                        api_key: str | None = None) -> Evaluation:
    """The stacked evaluation of the service at `url` (its active router, its served experts)."""
    examples = stacked_examples(dataset, split, limit)
    async with HttpBackend(url, api_key, max_tokens) as backend:
        setup = await backend.setup(sorted({ex.expert for ex in examples}), router)
        check_experts(examples, setup, dataset)
        rows = await run_stacked(backend, examples, setup, concurrency)
    context = {"dataset": str(dataset), "split": split, "max_tokens": max_tokens, "backend": backend.url}
    return Evaluation("stacked", stacked_report(rows, setup, context))


def evaluate_stacked_server(url: str, dataset: Path | str, **kwargs: Any) -> Evaluation:
    """Blocking wrapper; the key defaults to `LORAMUX_API_KEY` from the environment."""
    kwargs.setdefault("api_key", os.environ.get(API_KEY_ENV) or None)
    return asyncio.run(evaluate_stacked_server_async(url, dataset, **kwargs))
