"""Adapter names on a real server (127.0.0.1, the real model, the conftest adapters): one ASCII rule
for the registry file, registration and the admin API, and no request, whatever name it asks for
and however its response ends, keeps an admission slot.

The registry file holds good adapters under names the rule refuses (Unicode letters, reserved,
too long, a space), as a hand edit or an older version of the service could have written them.
Before the rule, a Unicode name loaded and served, and its response header failed after the
admission slot was taken: 64 such streamed requests left every client with 429 until restart.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import TASK_ADAPTERS
from tests.live_server import crashes, metric, private_copy, start_server
from tests.support import ServerProcess

USER = "names-user-key-0123"
ADMIN = "names-admin-key-4567"
AUTH = {"Authorization": f"Bearer {USER}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
BAD_NAMES = ["ünï", "日本語", "Base", "a" * 70, "two words"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def names_root(served_registry, adapter_root, tmp_path_factory) -> tuple[Path, Path]:
    root, registry = private_copy(served_registry, adapter_root, tmp_path_factory.mktemp("names_root"))
    data = json.loads(registry.read_text())
    for i, name in enumerate(BAD_NAMES):
        folder = f"badname{i}"
        shutil.copytree(root / "alpha", root / folder)  # good weights: only the name is wrong
        data["adapters"][name] = {"kind": "task", "active_version": 1,
                                  "versions": [{"version": 1, "path": folder, "status": "active"}]}
    registry.write_text(json.dumps(data, ensure_ascii=False))
    return root, registry


@pytest.fixture(scope="module")
def server(names_root, tmp_path_factory) -> Iterator[ServerProcess]:
    root, registry = names_root
    server = start_server(root, registry, tmp_path_factory.mktemp("names") / "server.log",
                          api_keys=USER, admin_api_keys=ADMIN, default_max_tokens=4, max_queue=64)
    yield server
    server.stop()


def in_flight(server: ServerProcess) -> float:
    return metric(server, "loramux_queue_depth", ADMIN_AUTH)


def request(server: ServerProcess, kind: str, name: str) -> httpx.Response:
    """One request naming `name`, read to its end (a stream too)."""
    messages = [{"role": "user", "content": "Hi"}]
    path, payload = {
        "generate": ("/generate", {"prompt": "Hi", "adapter": name, "max_tokens": 4}),
        "generate-stream": ("/generate", {"prompt": "Hi", "adapter": name, "max_tokens": 4, "stream": True}),
        "chat": ("/v1/chat/completions", {"model": name, "messages": messages, "max_tokens": 4}),
        "chat-stream": ("/v1/chat/completions", {"model": name, "messages": messages, "max_tokens": 4,
                                                 "stream": True}),
    }[kind]
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client, \
            client.stream("POST", path, json=payload) as r:
        r.read()
        return r


KINDS = ("generate", "generate-stream", "chat", "chat-stream")


def test_names_the_rule_refuses_are_never_loaded_and_say_why(server):
    view = httpx.get(f"{server.url}/admin/adapters", headers=ADMIN_AUTH, timeout=30).json()
    errors = {a["name"]: a["versions"][0]["error"] for a in view["adapters"]}
    loaded = {a["name"]: a["versions"][0]["loaded"] for a in view["adapters"]}
    for name in BAD_NAMES:
        assert errors[name] and "must be letters" in errors[name], (name, errors[name])
        assert not loaded[name]
    for name in (*TASK_ADAPTERS, "router"):
        assert errors[name] is None and loaded[name]
    assert httpx.get(f"{server.url}/ready", timeout=30).json()["adapters_failed"] == len(BAD_NAMES)
    models = {m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=30).json()["data"]}
    assert not models & set(BAD_NAMES) and set(TASK_ADAPTERS) <= models


@pytest.mark.parametrize("kind", KINDS)
def test_every_request_to_a_refused_name_is_a_4xx_and_frees_its_slot(server, kind):
    for name in BAD_NAMES:
        r = request(server, kind, name)
        assert r.status_code == 422, (kind, name, r.status_code, r.text)
        error = r.json()["error"]
        assert "must be letters" in error["message"] and error["param"] in ("adapter", "model")
        for value in r.headers.values():
            assert value.isascii()
    assert in_flight(server) == 0


def test_70_streams_to_a_unicode_name_do_not_lock_anyone_out(server):
    """The issue's live finding, at its size: a name that is not Latin-1 failed its response
    header after taking a slot of the 64, so the 65th request and every one after were 429."""
    def one(i: int) -> int:
        return request(server, "generate-stream" if i % 2 else "chat-stream", "日本語").status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(70)))
    assert set(statuses) == {422}, statuses
    assert in_flight(server) == 0
    for kind in KINDS:
        r = request(server, kind, "alpha")
        assert r.status_code == 200, (kind, r.text)
        assert r.headers["x-loramux-adapter"] == "alpha@1"
    assert in_flight(server) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_good_and_routed_requests_free_their_slot(server, kind):
    for name in ("beta", "auto" if kind.startswith("chat") else None):
        if name is None:  # /generate without an adapter routes
            payload = {"prompt": "Hi", "max_tokens": 4, "stream": kind.endswith("stream")}
            with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
                r = client.post("/generate", json=payload)
        else:
            r = request(server, kind, name)
        assert r.status_code == 200, r.text
        assert "X-Loramux-Adapter".lower() in r.headers
    assert in_flight(server) == 0


@pytest.mark.parametrize("name", ["ünï", "日本語", "Base", "auto", "two words", "-x", "naïve"])
def test_registration_refuses_the_same_names_with_422(server, name):
    r = httpx.post(f"{server.url}/admin/adapters", json={"name": name, "path": "alpha"}, headers=ADMIN_AUTH,
                   timeout=120)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == "name" and "must be letters" in error["message"]
    assert in_flight(server) == 0


def test_the_server_logged_no_unhandled_error(server):
    assert crashes(server) == []
