"""Administration is closed by default, and nothing is lost by one call (issue 13, items 6 and 11).

Through real servers: a default server (loopback, no keys) keeps its registry byte for byte under a
bounded loop of hostile admin calls and under schemathesis aimed at the admin routes with the real
adapter names; a development server (`LORAMUX_ADMIN_OPEN=true`) removes an adapter without losing
its history, and a removed name registered again gets a new version number and serves the new
weights even while a request still holds the old version."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.conftest import TASK_ADAPTERS
from tests.live_server import crashes, metric, private_copy, start_server
from tests.support import ServerProcess, make_lora_adapter

pytestmark = pytest.mark.slow

NAMES = (*TASK_ADAPTERS, "router")
PROMPT = {"prompt": "Describe the moon.", "max_tokens": 12}
# random tokens (temperature 2) rarely hit EOS: a request that holds its adapter for many seconds
LONG = {"prompt": "Write a very long story about the sea.", "max_tokens": 1000, "temperature": 2.0, "seed": 5,
        "stream": True}


def test_admin_open_is_for_loopback_only():
    assert Settings(admin_open=True).admin_open
    with pytest.raises(ValueError, match="LORAMUX_ADMIN_OPEN"):
        Settings(admin_open=True, host="0.0.0.0", api_keys=["k"])
    assert Settings(admin_open=True, host="0.0.0.0", api_keys=["k"], allow_insecure=True).admin_open


# ---- a default server: closed ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_server(served_registry, adapter_root, tmp_path_factory) -> Iterator[tuple[ServerProcess, Path]]:
    root, registry = private_copy(served_registry, adapter_root, tmp_path_factory.mktemp("closed_root"))
    server = start_server(root, registry, tmp_path_factory.mktemp("closed") / "server.log")
    yield server, registry
    server.stop()


def hostile_calls() -> Iterator[tuple[str, str, dict]]:
    """Everything one client could try to change or erase the registry with, bounded."""
    bodies = ({}, {"version": 1}, {"version": 2}, {"version": 99})
    for name in (*NAMES, "nope", "", "..", "%2e%2e", "ä", "x" * 300):
        yield "DELETE", f"/admin/adapters/{name}", {}
        for body in bodies:
            yield "POST", f"/admin/adapters/{name}/activate", {"json": body}
            yield "POST", f"/admin/adapters/{name}/restore", {"json": body}
        yield "POST", f"/admin/adapters/{name}/activate", {"content": b"{not json", "headers": {"content-type":
                                                                                               "application/json"}}
    for name in NAMES:
        for path in TASK_ADAPTERS:  # another adapter's weights under an existing name
            for activate in (True, False):
                yield "POST", "/admin/adapters", {"json": {"name": name, "path": path, "activate": activate,
                                                            **({"kind": "router", "labels": list(TASK_ADAPTERS)}
                                                               if name == "router" else {})}}
    yield "POST", "/admin/adapters", {"content": b"\x00" * 64, "headers": {"content-type": "application/json"}}
    yield "POST", "/admin/adapters", {"json": {"name": "new", "path": "alpha"},
                                      "headers": {"Authorization": "Bearer guessed-admin-key"}}
    for method in ("PUT", "PATCH"):
        yield method, "/admin/adapters/alpha", {"json": {}}


def test_hostile_admin_calls_leave_the_registry_as_it_was(default_server):
    server, registry = default_server
    before = registry.read_bytes()
    listed = httpx.get(f"{server.url}/admin/adapters", timeout=30)
    assert listed.status_code == 200  # read-only: the view stays available on a keyless loopback server
    statuses = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for method, path, kwargs in hostile_calls():
            r = client.request(method, path, **kwargs)
            statuses.append(r.status_code)
            assert r.status_code in (307, 403, 404, 405), (method, path, r.status_code, r.text)  # 307: a slash
            if r.status_code == 403:
                error = r.json()["error"]
                assert set(error) == {"message", "type", "param", "code", "request_id"}
                assert error["type"] == "permission_error"
                assert "LORAMUX_ADMIN_API_KEYS" in error["message"]
    assert statuses.count(403) >= 100
    time.sleep(0.5)  # a few registry polls
    assert registry.read_bytes() == before
    assert httpx.get(f"{server.url}/admin/adapters", timeout=30).json()["adapters"] == listed.json()["adapters"]
    for name in TASK_ADAPTERS:
        served = httpx.post(f"{server.url}/generate", json={**PROMPT, "adapter": name, "max_tokens": 2}, timeout=60)
        assert served.status_code == 200 and served.json()["version"] == 1
    assert httpx.post(f"{server.url}/route", json={"prompt": "Hi"}, timeout=60).status_code == 200


def test_schemathesis_on_the_admin_routes_of_a_default_server_changes_nothing(default_server, tmp_path: Path):
    """The fuzzer that erased the active router, aimed at the admin routes with the registry's real
    names as path parameters."""
    server, registry = default_server
    before = registry.read_bytes()
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "[dictionaries.names]\n"
        f"values = {json.dumps(list(NAMES))}\n\n"
        "[parameters]\n"
        '"path.name" = { dictionary = "names" }\n'
    )
    schemathesis = Path(sys.executable).parent / "schemathesis"
    cmd = [
        str(schemathesis), "--config-file", str(config), "run", f"{server.url}/openapi.json",
        "--include-path-regex", "^/admin",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance",
        "--mode", "all",
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", "40",
        "--seed", "20261",
        "--generation-database", "none",
        "--request-timeout", "60",
        "--no-color",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-8000:]
    generated = re.search(r"(\d+) generated", report)
    assert generated and int(generated.group(1)) >= 100, report[-3000:]
    assert registry.read_bytes() == before, report[-3000:]
    assert crashes(server) == []


# ---- a development server: open, and still nothing is lost -------------------------------------------
@pytest.fixture(scope="module")
def open_server(served_registry, adapter_root, base_model, tmp_path_factory) -> Iterator[tuple[ServerProcess, Path]]:
    root, registry = private_copy(served_registry, adapter_root, tmp_path_factory.mktemp("open_root"))
    make_lora_adapter(base_model, root / "delta_old", seed=11)
    make_lora_adapter(base_model, root / "delta_new", seed=12)
    server = start_server(root, registry, tmp_path_factory.mktemp("open") / "server.log", admin_open=True)
    yield server, registry
    server.stop()


def generate(server: ServerProcess, adapter: str) -> dict:
    r = httpx.post(f"{server.url}/generate", json={**PROMPT, "adapter": adapter}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def register(server: ServerProcess, name: str, path: str) -> dict:
    r = httpx.post(f"{server.url}/admin/adapters", json={"name": name, "path": path}, timeout=120)
    assert r.status_code == 201, r.text
    return r.json()


def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_a_removed_name_registered_again_serves_its_new_weights(open_server):
    server, registry = open_server
    assert register(server, "delta", "delta_old")["version"] == 1
    assert register(server, "reference", "delta_new")["version"] == 1
    old, new = generate(server, "delta")["text"], generate(server, "reference")["text"]
    assert old != new  # the two weight sets answer differently
    with httpx.stream("POST", f"{server.url}/generate", json={**LONG, "adapter": "delta"}, timeout=120) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # generating on delta@1 now
        removed = httpx.delete(f"{server.url}/admin/adapters/delta", timeout=60)
        assert removed.status_code == 200 and removed.json()["versions_kept"] == 1
        again = register(server, "delta", "delta_new")
        assert metric(server, "loramux_queue_depth") >= 1  # the old version was still in use meanwhile
    assert wait_for(lambda: metric(server, "loramux_queue_depth") == 0)
    answer = generate(server, "delta")
    assert answer["text"] == new, "a re-registered name served its old weights"
    assert again["version"] == answer["version"] == 2
    entry = json.loads(registry.read_text())["adapters"]["delta"]
    assert [(v["version"], v["path"], v["status"]) for v in entry["versions"]] == [
        (1, "delta_old", "retired"), (2, "delta_new", "active")]


def test_removal_keeps_the_history_and_restore_brings_it_back(open_server):
    server, registry = open_server
    before = generate(server, "beta")
    r = httpx.delete(f"{server.url}/admin/adapters/beta", timeout=60)
    assert r.status_code == 200 and r.json()["removed_version"] == 1
    gone = httpx.post(f"{server.url}/generate", json={**PROMPT, "adapter": "beta"}, timeout=60)
    assert gone.status_code == 404
    view = {a["name"]: a for a in httpx.get(f"{server.url}/admin/adapters", timeout=30).json()["adapters"]}
    assert view["beta"]["removed"] and view["beta"]["active_version"] is None
    assert [v["version"] for v in view["beta"]["versions"]] == [1]
    assert json.loads(registry.read_text())["adapters"]["beta"]["versions"][0]["path"] == "beta"
    restored = httpx.post(f"{server.url}/admin/adapters/beta/restore", json={}, timeout=60)
    assert restored.status_code == 200 and restored.json()["active_version"] == 1
    assert generate(server, "beta")["text"] == before["text"]
    # the router too: removed with its history, and back by activating it
    assert httpx.delete(f"{server.url}/admin/adapters/router", timeout=60).status_code == 200
    assert httpx.post(f"{server.url}/route", json={"prompt": "Hi"}, timeout=60).status_code in (404, 503)
    back = httpx.post(f"{server.url}/admin/adapters/router/activate", json={}, timeout=60)
    assert back.status_code == 200 and back.json()["active_version"] == 1
    assert httpx.post(f"{server.url}/route", json={"prompt": "Hi"}, timeout=60).status_code == 200
    assert crashes(server) == []
