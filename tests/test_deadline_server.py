"""The request deadline runs from arrival and covers routing (issue 13, item 1), through a real
server: with a deadline shorter than one router prefill, `/route`, a routed `/generate` and
`model="auto"` are 504s in the one error body, and the server stays healthy. (Before, the deadline
started when generation did, so routing a long prompt ran unbounded.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import ServerProcess

DEADLINE_S = 0.02  # far less than a router forward pass over 256 tokens on this CPU
LONG = " ".join(["please turn the kitchen lights on and set a timer for the pasta"] * 30)


@pytest.fixture(scope="module")
def hurried(served_registry: Path, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[ServerProcess]:
    from tests.conftest import CACHE_DIR

    env = {"LORAMUX_REGISTRY": str(served_registry), "LORAMUX_ADAPTER_ROOT": str(adapter_root),
           "LORAMUX_CACHE_DIR": str(CACHE_DIR), "LORAMUX_MAX_MODEL_LEN": "512",
           "LORAMUX_REQUEST_TIMEOUT_S": str(DEADLINE_S)}
    server = ServerProcess(env).start(tmp_path_factory.mktemp("hurried") / "server.log")
    yield server
    server.stop()


@pytest.mark.parametrize(("path", "body"), [
    ("/route", {"prompt": LONG}),
    ("/generate", {"prompt": LONG, "max_tokens": 1}),
    ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": LONG}], "max_tokens": 1}),
])
def test_routing_is_under_the_request_deadline(hurried: ServerProcess, path: str, body: dict) -> None:
    response = httpx.post(f"{hurried.url}{path}", json=body, timeout=60)
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["type"] == "timeout_error" and "deadline" in error["message"] and error["request_id"]
    assert httpx.get(f"{hurried.url}/ready", timeout=10).status_code == 200
    metrics = httpx.get(f"{hurried.url}/metrics", timeout=10).text
    assert "loramux_queue_depth 0.0" in metrics  # the admission slot came back
