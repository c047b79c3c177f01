"""What the service does when things go wrong, on real servers (127.0.0.1, the real model, the
conftest adapters): auth on every route, limits, deadlines, disconnects, a burst of abandoned
requests, bad adapters registered while traffic runs, an adapter deleted under the server,
overload, and a SIGTERM drain. These are the failure tests vLLM, TGI and LoRAX keep in their suites.

Two private servers: `main` (keys set, small limits, a 6 s deadline, a queue large enough that a
burst reaches the engine) and `small` (queue of 8) for overload and, last, the drain.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute

from service.api import deps
from service.api.app import create_app
from service.settings import Settings
from tests.conftest import TASK_ADAPTERS
from tests.live_server import crashes, metric, private_copy, start_server
from tests.support import (
    ServerProcess,
    fix_base_model_name,
    make_lora_adapter,
    make_norm_lora,
    make_wrong_shape,
)

USER = "user-key-0123456789"
ADMIN = "admin-key-9876543210"
AUTH = {"Authorization": f"Bearer {USER}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
PUBLIC = {"/health", "/ready"}
DEADLINE_S = 6.0
MAX_RANK = 8  # the conftest adapters have rank 8; the "rank too high" adapter has 16
# a generation that would run far past the deadline: random tokens (temperature 2) rarely hit EOS
LONG = {"prompt": "Write a very long story about the sea.", "adapter": "alpha", "max_tokens": 400,
        "temperature": 2.0, "seed": 7}

pytestmark = pytest.mark.slow


# ---- servers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def main_root(tmp_path_factory, served_registry, adapter_root) -> tuple[Path, Path]:
    return private_copy(served_registry, adapter_root, tmp_path_factory.mktemp("reliability_root"))


@pytest.fixture(scope="module")
def main(main_root, tmp_path_factory) -> Iterator[ServerProcess]:
    root, registry = main_root
    server = start_server(
        root, registry, tmp_path_factory.mktemp("reliability") / "main.log",
        api_keys=USER, admin_api_keys=ADMIN,
        max_body_bytes=65536, max_messages=4, max_stop=2, max_tokens_limit=400, default_max_tokens=16,
        max_model_len=512, request_timeout_s=DEADLINE_S, max_lora_rank=MAX_RANK, max_queue=256,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small(served_registry, adapter_root, tmp_path_factory) -> Iterator[ServerProcess]:
    root, registry = private_copy(served_registry, adapter_root, tmp_path_factory.mktemp("small_root"))
    server = start_server(root, registry, tmp_path_factory.mktemp("small") / "small.log",
                          max_queue=8, max_batch_size=8, shutdown_grace_s=60)
    yield server
    server.stop()


# ---- helpers ------------------------------------------------------------------------------------
def post(server: ServerProcess, path: str, payload: dict, headers: dict | None = None,
         timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=payload, headers=AUTH if headers is None else headers,
                      timeout=timeout)


def assert_error(response: httpx.Response, status: int, param: str | None = "ANY") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"} and error["code"] == status
    assert error["message"] and error["request_id"] == response.headers["x-request-id"]
    if param != "ANY":
        assert error["param"] == param, error
    return error


def sse_events(server: ServerProcess, path: str, payload: dict, headers: dict | None = None) -> list[str]:
    with httpx.stream("POST", f"{server.url}{path}", json=payload, headers=AUTH if headers is None else headers,
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def slots(server: ServerProcess, headers: dict | None = ADMIN_AUTH) -> tuple[float, float]:
    """(requests holding an admission slot, sequences in the engine's running batch)."""
    return metric(server, "loramux_queue_depth", headers), metric(server, "loramux_engine_running", headers)


# ---- auth ---------------------------------------------------------------------------------------
def app_routes() -> list[tuple[str, str, bool]]:
    """Every (method, path, is_admin) the app serves, read from the app object itself, so a route
    added later is tested without anyone remembering to list it."""
    app = create_app(Settings(api_keys=[USER], admin_api_keys=[ADMIN]))
    out = []
    for route in app.routes:
        path = getattr(route, "path", None)
        for method in sorted(getattr(route, "methods", None) or ()):
            out.append((method, re.sub(r"\{[^}]+\}", "x", path), path.startswith("/admin") or path in VLLM_ADMIN))
    return out


VLLM_ADMIN = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}  # vLLM's LoRA endpoints: the admin API's aliases


def test_routes_enumerated_from_the_app_cover_the_api():
    paths = {path for _, path, _ in app_routes()}
    assert {"/generate", "/route", "/v1/chat/completions", "/v1/models", "/admin/adapters", "/health", "/ready",
            "/metrics", "/openapi.json", "/docs"} <= paths


@pytest.mark.parametrize(("method", "path", "is_admin"), app_routes())
def test_every_route_without_a_key_gets_401(main, method, path, is_admin):
    def call(headers: dict) -> httpx.Response:
        return httpx.request(method, f"{main.url}{path}", headers=headers, timeout=60)

    if path in PUBLIC:
        assert call({}).status_code == 200
        return
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {USER}"},
                    {"Authorization": f"Bearer {USER[:-1]}"}):
        r = call(headers)
        assert r.status_code == 401, (method, path, headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        if method != "HEAD":
            assert_error(r, 401)
    if is_admin:
        assert call(AUTH).status_code == 403  # an inference key never manages adapters
        assert call(ADMIN_AUTH).status_code not in (401, 403)
    else:
        assert call(AUTH).status_code not in (401, 403)


def test_every_route_also_checks_its_key_in_a_dependency():
    """Second layer behind the middleware: each API route depends on a key check of its kind."""
    app = create_app(Settings(api_keys=[USER], admin_api_keys=[ADMIN]))

    def calls(dependant) -> set:
        out = set()
        for dep in dependant.dependencies:
            out |= {dep.call} | calls(dep)
        return out

    for route in app.routes:
        if not isinstance(route, APIRoute) or route.path in {*PUBLIC, "/metrics"}:
            continue
        admin = route.path.startswith("/admin") or route.path in VLLM_ADMIN
        expected = deps.require_admin_key if admin else deps.require_inference_key
        assert expected in calls(route.dependant), route.path


@pytest.mark.parametrize(("key", "access", "outcome"), [
    (None, "public", None), (None, "inference", 401), (None, "admin", 401),
    ("inf", "inference", None), ("inf", "admin", 403), ("adm", "inference", None), ("adm", "admin", None),
    ("wrong", "inference", 401), ("wrong", "admin", 401), ("wrong", "public", None),
])
def test_one_authorization_decision_for_the_guard_and_the_routes(key, access, outcome) -> None:
    """The guard before routing and every route's dependency call `authorize`: one table of who may do what."""
    from service.api import authorization
    from service.errors import LoramuxError

    settings = Settings(api_keys=["inf"], admin_api_keys=["adm"])
    try:
        authorization.authorize(settings, key, access)
        status = None
    except LoramuxError as exc:
        status = exc.status_code
    assert status == outcome
    assert authorization.access_for_path("/admin/adapters", settings) == "admin"
    assert authorization.access_for_path("/metrics", settings) == "inference"
    assert authorization.access_for_path("/metrics", Settings(metrics_public=True)) == "public"


def test_keys_are_compared_in_constant_time(monkeypatch):
    """hmac.compare_digest against every configured key, with no early exit on a match."""
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    from service.api import authorization

    monkeypatch.setattr(authorization.hmac, "compare_digest", spy)
    assert authorization.key_matches("k1", ["k1", "k2", "k3"])
    assert len(seen) == 3
    seen.clear()
    assert not authorization.key_matches("k1x", ["k1"]) and len(seen) == 1


def raw_status(server: ServerProcess, target: str, key: str | None) -> int:
    """Send a request line exactly as given (httpx would normalise `..` and `//`)."""
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n".encode())
        return int(sock.recv(64).split(b" ")[1])


@pytest.mark.parametrize(
    ("target", "key", "allowed"),
    [
        ("/health/../admin/adapters", None, {401}),
        ("/health/../admin/adapters", USER, {404}),
        ("/%61dmin/adapters", USER, {403}),
        ("//admin/adapters", USER, {404}),
        ("/admin/adapters/", USER, {403}),
        ("/health/", None, {401}),
        ("/ready?x=/admin", None, {200}),
        ("/metrics", None, {401}),
    ],
)
def test_auth_decides_on_the_asgi_path(main, target, key, allowed):
    assert raw_status(main, target, key) in allowed


# ---- limits -------------------------------------------------------------------------------------
USER_HI = [{"role": "user", "content": "hi"}]
LONG_TEXT = "word " * 600  # > 512 tokens of context


@pytest.mark.parametrize(
    ("path", "payload", "param"),
    [
        ("/generate", {"prompt": LONG_TEXT, "adapter": "alpha"}, "prompt"),
        ("/generate", {"messages": [{"role": "user", "content": LONG_TEXT}], "adapter": "alpha"}, "messages"),
        ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": LONG_TEXT}]},
         "messages"),
        ("/generate", {"prompt": "hi", "adapter": "alpha", "max_tokens": 401}, "max_tokens"),
        ("/v1/chat/completions", {"model": "alpha", "messages": USER_HI, "max_tokens": 401}, "max_tokens"),
        ("/v1/chat/completions", {"model": "alpha", "messages": USER_HI, "max_completion_tokens": 401},
         "max_completion_tokens"),
        ("/generate", {"messages": USER_HI * 5, "adapter": "alpha"}, "messages"),
        ("/route", {"messages": USER_HI * 5}, "messages"),
        ("/v1/chat/completions", {"model": "auto", "messages": USER_HI * 5}, "messages"),
        ("/generate", {"prompt": "hi", "adapter": "alpha", "stop": ["a", "b", "c"]}, "stop"),
        ("/v1/chat/completions", {"model": "alpha", "messages": USER_HI, "stop": ["a", "b", "c"]}, "stop"),
        ("/generate", {"prompt": "hi", "adapter": "alpha", "stop": "x" * 300}, "stop"),
        ("/generate", {"prompt": "hi", "adapter": "alpha", "stop": [""]}, "stop"),
    ],
)
def test_limits_answer_400_with_param(main, path, payload, param):
    error = assert_error(post(main, path, payload), 400, param)
    assert error["type"] == "invalid_request_error"


def test_body_size_limit_is_413_declared_or_chunked(main):
    big = json.dumps({"prompt": "x" * 70000, "adapter": "alpha"}).encode()
    headers = {**AUTH, "content-type": "application/json"}
    assert_error(httpx.post(f"{main.url}/generate", content=big, headers=headers, timeout=60), 413, "body")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts the body as it arrives
        for start in range(0, len(big), 8192):
            yield big[start:start + 8192]

    assert_error(httpx.post(f"{main.url}/generate", content=chunks(), headers=headers, timeout=60), 413, "body")
    # just under the limit is read and judged on its content (too many tokens), not its size
    fits = json.dumps({"prompt": "x " * 30000, "adapter": "alpha"}).encode()
    assert_error(httpx.post(f"{main.url}/generate", content=fits, headers=headers, timeout=60), 400, "prompt")


# ---- deadline, disconnects, abandoned requests --------------------------------------------------
def test_deadline_ends_with_a_clear_error(main):
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        plain = pool.submit(post, main, "/generate", LONG)
        streamed = pool.submit(sse_events, main, "/v1/chat/completions",
                               {"model": "alpha", "messages": [{"role": "user", "content": LONG["prompt"]}],
                                "max_tokens": 400, "temperature": 2.0, "seed": 7, "stream": True})
        error = assert_error(plain.result(), 504)
        events = streamed.result()
    assert error["type"] == "timeout_error" and f"{DEADLINE_S:g}s deadline" in error["message"]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])["error"]
    assert last["code"] == 504 and "deadline" in last["message"]
    assert len(events) > 3  # it did stream before the deadline ended it
    assert DEADLINE_S <= time.monotonic() - started < DEADLINE_S + 20
    assert wait_for(lambda: slots(main) == (0, 0), 5)


def test_client_disconnect_frees_the_slot_streaming_and_not(main):
    assert slots(main) == (0, 0)
    with httpx.stream("POST", f"{main.url}/generate", json={**LONG, "stream": True}, headers=AUTH,
                      timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            while not next(lines).startswith("data: "):
                pass
        assert slots(main) == (1, 1)
    # the connection is closed here, seconds before the 400 tokens (or the deadline) would end it
    assert wait_for(lambda: slots(main) == (0, 0), 3), slots(main)

    with pytest.raises(httpx.ReadTimeout):
        post(main, "/generate", LONG, timeout=1.5)
    assert wait_for(lambda: slots(main) == (0, 0), 3), slots(main)
    text = httpx.get(f"{main.url}/metrics", headers=ADMIN_AUTH, timeout=30).text
    assert re.search(r'loramux_errors_total\{endpoint="generate",type="client_disconnected"\} [1-9]', text)


def test_200_abandoned_requests_then_a_new_one_is_served_within_5s(main):
    """vLLM's test: 200 requests whose clients give up after 0.5 s must not wedge the server."""

    async def one(client: httpx.AsyncClient, i: int) -> int | str:
        adapter = TASK_ADAPTERS[i % 3]
        kinds = [
            ("/generate", {"prompt": f"Tell story {i}", "adapter": adapter, "max_tokens": 64}),
            ("/generate", {"prompt": f"Tell story {i}", "adapter": adapter, "max_tokens": 64, "stream": True}),
            ("/v1/chat/completions", {"model": adapter, "messages": [{"role": "user", "content": f"Story {i}"}],
                                      "max_tokens": 64, "stream": i % 2 == 0}),
            ("/generate", {"prompt": f"Tell story {i}", "max_tokens": 64}),
        ]
        path, payload = kinds[i % len(kinds)]
        try:
            async with client.stream("POST", path, json=payload) as r:
                async for _ in r.aiter_raw():
                    pass
                return r.status_code
        except httpx.TimeoutException:
            return "timeout"

    async def burst() -> list[int | str]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=main.url, headers=AUTH, timeout=0.5, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    outcomes = asyncio.run(burst())
    assert not [o for o in outcomes if isinstance(o, int) and o >= 500], outcomes
    assert outcomes.count("timeout") >= 100  # most really were abandoned mid-flight
    started = time.monotonic()
    r = post(main, "/generate", {"prompt": "Hello", "adapter": "beta", "max_tokens": 4}, timeout=5)
    assert r.status_code == 200 and time.monotonic() - started < 5
    assert wait_for(lambda: slots(main) == (0, 0), 10), slots(main)


# ---- bad adapters -------------------------------------------------------------------------------
def write_config(folder: Path, **changes: object) -> None:
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def bad_adapters(main_root, base_model, tmp_path_factory) -> list[tuple[str, str, str]]:
    """(path as sent, expected words in the 422, param) for each way an adapter can be bad."""
    root, _ = main_root
    good = root / "alpha"
    outside = tmp_path_factory.mktemp("outside_root")
    shutil.copytree(good, outside / "adapter")

    def copy(name: str) -> Path:
        shutil.copytree(good, root / name)
        return root / name

    (copy("corrupt") / "adapter_model.safetensors").write_bytes(b"\x00\x01 not a safetensors header" * 100)
    write_config(copy("wrong_base"), base_model_name_or_path="gpt2")
    make_lora_adapter(base_model, root / "rank16", seed=5, rank=16)
    fix_base_model_name(root / "rank16", base_model.name)
    pickled = copy("pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    write_config(copy("wrong_modules"), target_modules=["q_proj", "no_such_proj"])
    (copy("no_weights") / "adapter_model.safetensors").unlink()
    (root / "escape").symlink_to(outside / "adapter", target_is_directory=True)
    link_file = copy("link_file")
    (link_file / "adapter_model.safetensors").unlink()
    (link_file / "adapter_model.safetensors").symlink_to(outside / "adapter" / "adapter_model.safetensors")
    make_wrong_shape(copy("wrong_shape"))
    make_norm_lora(copy("norm_lora"))
    return [
        ("corrupt", "not a readable safetensors file", "path"),
        ("wrong_base", "trained on 'gpt2'", "path"),
        ("rank16", f"rank 16 exceeds the maximum {MAX_RANK}", "path"),
        ("pickled", "pickle", "path"),
        ("pickled/adapter_model.bin", "pickle weights are refused", "path"),
        ("../alpha", "'..'", "path"),
        (str(outside / "adapter"), "outside the adapter root", "path"),
        ("escape", "outside the adapter root", "path"),
        ("link_file", "link leaving the adapter root", "path"),
        ("no_such_adapter", "does not exist", "path"),
        ("no_weights", "adapter_model.safetensors is missing", "path"),
        ("wrong_modules", "no_such_proj", "path"),
        ("wrong_shape", "has shape [8, 100]; the base model's model.layers.0.self_attn.q_proj has 576 inputs", "path"),
        ("norm_lora", "failed to load", "path"),
    ]


def test_50_bad_registrations_while_good_traffic_runs(main, bad_adapters):
    """vLLM's test_loading_invalid_adapters_does_not_break_others: every bad registration gets its
    4xx naming the reason, and not one concurrent good request fails."""
    stop = threading.Event()
    good: list[tuple[str, httpx.Response]] = []
    kinds = ("pinned", "routed", "route", "chat")

    def traffic(kind: str) -> None:
        with httpx.Client(base_url=main.url, headers=AUTH, timeout=60) as client:
            i = 0
            while not stop.is_set() or i < 2:  # each kind runs throughout, and at least twice
                adapter = TASK_ADAPTERS[i % 3]
                if kind == "pinned":
                    r = client.post("/generate", json={"prompt": f"Hi {i}", "adapter": adapter, "max_tokens": 4})
                elif kind == "routed":
                    r = client.post("/generate", json={"prompt": f"Lights {i}", "max_tokens": 4})
                elif kind == "route":
                    r = client.post("/route", json={"prompt": f"Calendar {i}"})
                else:
                    r = client.post("/v1/chat/completions", json={"model": adapter, "max_tokens": 4,
                                                                  "messages": [{"role": "user", "content": "Hi"}]})
                good.append((kind, r))
                i += 1

    def register(i: int) -> tuple[int, str, str, str, httpx.Response]:
        path, reason, param = bad_adapters[i % len(bad_adapters)]
        name = "auto" if i == 49 else f"bad-{i}"  # and one reserved name
        r = httpx.post(f"{main.url}/admin/adapters", json={"name": name, "path": path}, headers=ADMIN_AUTH,
                       timeout=120)
        if name == "auto":
            reason, param = "must be letters", "name"
        return i, path, reason, param, r

    with ThreadPoolExecutor(8) as pool:
        runners = [pool.submit(traffic, kind) for kind in kinds]
        time.sleep(0.5)
        results = list(pool.map(register, range(50)))
        stop.set()
        for runner in runners:
            runner.result()
    for i, path, reason, param, r in results:
        error = assert_error(r, 422, param)
        assert reason in error["message"], (i, path, error)
        assert error["type"] == "invalid_adapter_error"
    assert {kind for kind, _ in good} == set(kinds) and len(good) >= 8
    assert [(kind, r.status_code, r.text) for kind, r in good if r.status_code != 200] == []
    view = httpx.get(f"{main.url}/admin/adapters", headers=ADMIN_AUTH, timeout=30).json()
    served = {*TASK_ADAPTERS, "router"}
    assert served <= {a["name"] for a in view["adapters"]}
    assert all(v["loaded"] and v["error"] is None for a in view["adapters"] if a["name"] in served
               for v in a["versions"])
    # a first version that validated but would not load stays in the history, failed and never served
    assert all(a["active_version"] is None and v["status"] == "failed" and not v["loaded"]
               for a in view["adapters"] if a["name"] not in served for v in a["versions"])
    assert httpx.get(f"{main.url}/ready", timeout=30).json()["adapters_failed"] == 0


def test_a_bad_new_version_does_not_take_the_good_one_down(main, bad_adapters):
    """A version that validates but fails to load is withdrawn: the previous version keeps serving."""
    r = httpx.post(f"{main.url}/admin/adapters", json={"name": "gamma", "path": "norm_lora"}, headers=ADMIN_AUTH,
                   timeout=120)
    assert "failed to load" in assert_error(r, 422, "path")["message"]
    served = post(main, "/generate", {"prompt": "Hi", "adapter": "gamma", "max_tokens": 4})
    assert served.status_code == 200 and served.json()["version"] == 1
    gamma = next(a for a in httpx.get(f"{main.url}/admin/adapters", headers=ADMIN_AUTH, timeout=30).json()["adapters"]
                 if a["name"] == "gamma")
    assert gamma["active_version"] == 1 and [v["status"] for v in gamma["versions"]] == ["active", "failed"]


def test_adapter_deleted_from_disk_is_marked_failed_and_others_keep_serving(main, main_root):
    root, _ = main_root
    shutil.copytree(root / "beta", root / "doomed")
    r = httpx.post(f"{main.url}/admin/adapters", json={"name": "doomed", "path": "doomed"}, headers=ADMIN_AUTH,
                   timeout=120)
    assert r.status_code == 201 and r.json()["loaded"], r.text
    with ThreadPoolExecutor(1) as pool:
        # a request generating on it when the files go: it finishes (the weights are in memory), within
        # the 6 s deadline even at ~200 ms a token (two cores shared with the test)
        in_flight = pool.submit(sse_events, main, "/generate",
                                {"prompt": "Go on", "adapter": "doomed", "max_tokens": 24, "temperature": 2.0,
                                 "seed": 3, "stream": True})
        assert wait_for(lambda: slots(main)[1] == 1, 10)
        shutil.rmtree(root / "doomed")
        assert wait_for(lambda: post(main, "/generate", {"prompt": "Hi", "adapter": "doomed"}).status_code == 422)
        events = in_flight.result(timeout=60)
    assert events[-1] == "[DONE]" and json.loads(events[-2]).get("finish_reason") in ("length", "stop"), events[-3:]
    error = assert_error(post(main, "/generate", {"prompt": "Hi", "adapter": "doomed"}), 422, "adapter")
    assert "deleted from disk" in error["message"]
    for adapter in TASK_ADAPTERS:
        assert post(main, "/generate", {"prompt": "Hi", "adapter": adapter, "max_tokens": 2}).status_code == 200
    assert post(main, "/route", {"prompt": "Hi"}).status_code == 200
    view = httpx.get(f"{main.url}/admin/adapters", headers=ADMIN_AUTH, timeout=30).json()
    doomed = next(a for a in view["adapters"] if a["name"] == "doomed")
    assert "deleted from disk" in doomed["versions"][0]["error"] and not doomed["versions"][0]["loaded"]
    assert httpx.get(f"{main.url}/ready", timeout=30).json()["adapters_failed"] == 1


def test_main_server_logged_no_unhandled_error(main):
    assert crashes(main) == []


# ---- overload and drain -------------------------------------------------------------------------
SLOW = {"prompt": "Tell me about the sea.", "adapter": "alpha", "max_tokens": 16, "temperature": 2.0, "seed": 1}


def test_overload_gives_429_with_retry_after_then_normal_service(small):
    barrier = threading.Barrier(16)

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=small.url, timeout=120) as client:
            barrier.wait()
            return client.post("/generate", json=SLOW)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(16)))  # twice the queue limit of 8, at once
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 8 and statuses.count(429) >= 4, statuses
    for r in responses:
        if r.status_code == 429:
            assert assert_error(r, 429)["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
    started = time.monotonic()
    r = post(small, "/generate", {"prompt": "Hi", "adapter": "beta", "max_tokens": 4}, headers={})
    assert r.status_code == 200 and time.monotonic() - started < 5
    assert wait_for(lambda: slots(small, None) == (0, 0), 5)


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(small):
    """Runs last on `small`: it ends the process."""
    assert small.proc is not None
    jobs = [("/generate", SLOW, False)] * 4 + [("/generate", {**SLOW, "stream": True}, True)] * 2 + [
        ("/v1/chat/completions", {"model": "gamma", "messages": [{"role": "user", "content": "Tell me a tale"}],
                                  "max_tokens": 16, "temperature": 2.0, "seed": 2, "stream": True}, True)] * 2

    def run(job: tuple[str, dict, bool]) -> object:
        path, payload, streaming = job
        return sse_events(small, path, payload, {}) if streaming else post(small, path, payload, {})

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(run, job) for job in jobs]
        assert wait_for(lambda: slots(small, None)[0] == 8, 30)
        small.proc.send_signal(signal.SIGTERM)
        ready = httpx.get(f"{small.url}/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        refused = post(small, "/generate", {"prompt": "Hi", "adapter": "beta", "max_tokens": 2}, headers={})
        assert assert_error(refused, 503)["type"] == "service_unavailable" and refused.headers["retry-after"]
        refused_chat = post(small, "/v1/chat/completions", {"model": "auto", "messages": USER_HI}, headers={})
        assert_error(refused_chat, 503)
        results = [f.result(timeout=120) for f in futures]
    for job, result in zip(jobs, results, strict=True):
        if isinstance(result, httpx.Response):
            assert result.status_code == 200 and result.json()["usage"]["completion_tokens"] > 0, result.text
        else:
            assert result[-1] == "[DONE]" and "error" not in json.loads(result[-2]), (job[0], result[-3:])
    assert small.proc.wait(timeout=60) == 0
    assert crashes(small) == []
