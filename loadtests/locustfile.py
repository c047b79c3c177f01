"""Locust users for `make loadtest`: the traffic the service exists for, mixed.

Each user asks the router alone (`/route`), generates routed and pinned (`/generate`), and streams
OpenAI chat completions (routed with `model="auto"`, or pinned), with the bearer key from the
environment. A response counts as a failure unless it is a 200 whose body is what the contract
says (a registered adapter chosen, text generated, a stream that ends in `[DONE]` without an error
event), so a 429, a 5xx or a broken stream all show in Locust's failure count.

Environment: `LORAMUX_LOADTEST_API_KEY` (default: the first of `LORAMUX_API_KEYS`, or none) and
`LORAMUX_LOADTEST_MAX_TOKENS` (default 16). Adapters are read from `/v1/models` at start.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from locust import HttpUser, between, task

PROMPTS = (
    "Turn on the kitchen lights",
    "What's on my calendar on Friday?",
    "Set a timer for ten minutes",
    "Will it rain tomorrow in Paris?",
    "Dim the bedroom lamp to thirty percent",
    "Move my dentist appointment to next week",
    "Write a haiku about the sea",
)


def api_key() -> str | None:
    key = os.environ.get("LORAMUX_LOADTEST_API_KEY")
    if key:
        return key
    keys = [k.strip() for k in os.environ.get("LORAMUX_API_KEYS", "").split(",") if k.strip()]
    return keys[0] if keys else None


MAX_TOKENS = int(os.environ.get("LORAMUX_LOADTEST_MAX_TOKENS", "16"))


class LoramuxUser(HttpUser):
    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        key = api_key()
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        models = self.client.get("/v1/models", name="/v1/models").json()["data"]
        auto = next((m for m in models if m["id"] == "auto"), None)
        router = auto["root"] if auto else None
        # task adapters: everything with a parent (the base has none) except `auto` and the router
        self.adapters = [m["id"] for m in models if m.get("parent") and m["id"] not in ("auto", router)]
        self.routed = auto is not None
        if not self.adapters:
            raise RuntimeError("the server has no task adapters registered; nothing to load-test")

    def prompt(self) -> str:
        return random.choice(PROMPTS)

    def _json(self, path: str, payload: dict[str, Any], name: str, check: Any) -> None:
        with self.client.post(path, json=payload, name=name, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
                return
            problem = check(r.json())
            if problem:
                r.failure(problem)

    @task(2)
    def route(self) -> None:
        if not self.routed:
            return
        self._json("/route", {"prompt": self.prompt()}, "/route",
                   lambda body: None if body["adapter"] in (*self.adapters, None) else f"unknown adapter {body}")

    @task(3)
    def generate_routed(self) -> None:
        if not self.routed:
            return
        self._json("/generate", {"prompt": self.prompt(), "max_tokens": MAX_TOKENS}, "/generate [routed]",
                   lambda body: None if body["routing"] and body["usage"]["completion_tokens"] > 0
                   else f"no routing or no tokens: {body}")

    @task(3)
    def generate_pinned(self) -> None:
        adapter = random.choice(self.adapters)
        self._json("/generate", {"prompt": self.prompt(), "adapter": adapter, "max_tokens": MAX_TOKENS},
                   "/generate [pinned]",
                   lambda body: None if body["adapter"] == adapter and body["usage"]["completion_tokens"] > 0
                   else f"wrong adapter or no tokens: {body}")

    @task(2)
    def chat_stream(self) -> None:
        model = "auto" if self.routed and random.random() < 0.5 else random.choice(self.adapters)
        payload = {"model": model, "stream": True, "max_tokens": MAX_TOKENS,
                   "messages": [{"role": "user", "content": self.prompt()}]}
        name = f"/v1/chat/completions [stream, {'routed' if model == 'auto' else 'pinned'}]"
        with self.client.post("/v1/chat/completions", json=payload, name=name, stream=True,
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
                return
            events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
            if not events or events[-1] != "[DONE]":
                r.failure(f"stream did not end with [DONE]: {events[-2:]}")
                return
            chunks = [json.loads(e) for e in events[:-1]]
            errors = [c["error"] for c in chunks if "error" in c]
            if errors:
                r.failure(f"error event: {errors[0]}")
            elif not any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks):
                r.failure("no finish_reason in the stream")
