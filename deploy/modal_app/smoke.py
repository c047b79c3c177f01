"""A smoke check of a deployed service: `/health`, then one routed request, as a client would send them.

Why its own client rules: Modal's web proxy answers a request whose response has not started within
150 s with a 303 to a result URL, and a GET on that URL waits for the answer (again up to 150 s per
hop). A cold start (model download, vLLM compile) easily takes longer, so this client follows those
redirects for as long as its own timeout allows; the standard library stops after four hops to one URL.
Plain `urllib`: it runs on the deploying machine, which has only the `deploy` extra.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from typing import Any

from deploy.modal_app.config import MODAL_WEB_RESPONSE_CUTOFF_S


class FollowModalRedirects(urllib.request.HTTPRedirectHandler):
    """Follow Modal's 303s to the result URL (a GET, without the body) for up to `timeout` seconds."""

    def __init__(self, timeout: float):
        hops = math.ceil(timeout / MODAL_WEB_RESPONSE_CUTOFF_S) + 1
        self.max_repeats = hops  # Modal redirects to the same result URL each time
        self.max_redirections = hops


def request_json(url: str, api_key: str, body: dict[str, Any] | None, timeout: float) -> tuple[int, dict[str, Any]]:
    """POST `body` (GET without one) and the JSON answer, following Modal's redirects; errors are answers too."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    opener = urllib.request.build_opener(FollowModalRedirects(timeout))
    try:
        with opener.open(request, timeout=timeout) as response:  # noqa: S310 - the caller's own URL
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            payload = json.loads(exc.read() or b"{}")
        except ValueError:
            payload = {}
        return exc.code, payload


def smoke_check(base_url: str, api_key: str, prompt: str, timeout: float = 600.0) -> dict[str, Any]:
    """`/health`, then `POST /route` (which adapter the router picks) and `POST /v1/chat/completions` with
    `model="auto"`. Raises with the failing step; returns what it saw.
    The first call may wait for a cold start, hence the long timeout."""
    base = base_url.rstrip("/")
    status, health = request_json(f"{base}/health", api_key, None, timeout)
    if status != 200 or health.get("status") != "ok":
        raise RuntimeError(f"GET /health answered {status}: {health}")
    status, route = request_json(f"{base}/route", api_key, {"prompt": prompt}, timeout)
    if status != 200 or "adapter" not in route:
        raise RuntimeError(f"POST /route answered {status}: {route}")
    body = {"model": "auto", "messages": [{"role": "user", "content": prompt}], "max_tokens": 64}
    status, chat = request_json(f"{base}/v1/chat/completions", api_key, body, timeout)
    if status != 200 or not chat.get("choices"):
        raise RuntimeError(f"POST /v1/chat/completions answered {status}: {chat}")
    return {
        "health": health,
        "route": {k: route.get(k) for k in ("adapter", "version", "confidence", "fallback")},
        "chat": {"model": chat.get("model"), "text": chat["choices"][0].get("message", {}).get("content")},
    }
