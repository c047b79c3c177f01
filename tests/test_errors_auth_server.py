"""Errors leak nothing, and the auth edges hold (issue 13, items 9 and 10), on real servers.

A server with API keys and CORS, on a copy of the base model whose chat template is strict (it
raises when two turns of one role follow each other, as Mistral's and Llama 2's templates do):
every response carries an `X-Request-ID` (the client's own when well formed), every error body
quotes it and the log lines of the request carry it; no message, and nothing in `/v1/models`,
names a folder of the server or shows a memory address; a chat template that refuses the
conversation and a router that cannot score are 400s; `/metrics` needs a key; errors are counted
by route template, so random paths add no time series; a CORS preflight is answered by CORS, not
with a 401. The session's keyless loopback server refuses requests addressed to another host name
(DNS rebinding). Before the fixes: no request id anywhere; `/v1/models` listed the model and
adapter folders; a 422 named the adapter root; the strict template and the broken router were 500s;
`/metrics` was public; each random 404 path was a new series; preflights got 401; any Host passed.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.base_model import BaseModelInfo
from tests.live_server import crashes, private_copy, start_server
from tests.support import ServerProcess

pytestmark = pytest.mark.slow

USER = "leaks-user-key-0123"
ADMIN = "leaks-admin-key-4567"
AUTH = {"Authorization": f"Bearer {USER}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
ORIGIN = "https://app.example"
# SmolLM2's own template, plus the rule strict templates enforce (their very words)
STRICT_TEMPLATE = (
    "{% set ns = namespace(prev='') %}{% for message in messages %}"
    "{% if message['role'] == ns.prev %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set ns.prev = message['role'] %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI "
    "assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TWO_USER_TURNS = [{"role": "user", "content": "Hello."}, {"role": "user", "content": "Are you there?"}]


def strict_copy(base: BaseModelInfo, dest: Path) -> Path:
    """The base model's folder with the strict chat template (the weights linked, not copied)."""
    dest.mkdir(parents=True)
    for item in base.path.iterdir():
        if item.name == "chat_template.jinja":
            continue
        if item.suffix == ".safetensors" or item.name == "tokenizer.json":
            (dest / item.name).symlink_to(item)
        else:
            shutil.copy(item, dest / item.name)
    (dest / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    return dest


@pytest.fixture(scope="module")
def world(served_registry, adapter_root, base_model, tmp_path_factory) -> Iterator[dict]:
    root, registry = private_copy(served_registry, adapter_root, tmp_path_factory.mktemp("leaks_root"))
    model = strict_copy(base_model, tmp_path_factory.mktemp("strict_model") / "model")
    server = start_server(root, registry, tmp_path_factory.mktemp("leaks") / "server.log",
                          base_model=model, base_model_name=base_model.name, api_keys=USER,
                          admin_api_keys=ADMIN, cors_origins=ORIGIN, max_model_len=512)
    yield {"server": server, "root": root, "registry": registry, "model": model}
    server.stop()


@pytest.fixture(scope="module")
def keyed(world) -> ServerProcess:
    return world["server"]


def post(server: ServerProcess, path: str, payload: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=payload, headers=AUTH if headers is None else headers, timeout=120)


def assert_quotes_its_id(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["request_id"] and error["request_id"] == response.headers["x-request-id"], (error, response.headers)
    return error


def server_paths(world: dict) -> list[str]:
    """Folders of the server machine that a client must never see."""
    return [str(world["root"]), str(world["model"]), str(world["model"].resolve()), tempfile.gettempdir(),
            str(Path.home())]


def assert_no_leak(text: str, world: dict) -> None:
    for folder in server_paths(world):
        assert folder not in text, (folder, text)
    assert not re.search(r"\bat 0x[0-9a-f]+|0x[0-9a-f]{6,}", text), text


# ---- item 9: request ids ---------------------------------------------------------------------------
def test_every_response_carries_a_request_id_and_every_error_quotes_it(keyed):
    server = keyed
    ok = httpx.get(f"{server.url}/health", timeout=30)
    assert re.fullmatch(r"req-[0-9a-f]{24}", ok.headers["x-request-id"])
    mine = httpx.post(f"{server.url}/generate", json={"prompt": 5}, headers={**AUTH, "X-Request-ID": "client-id-42"},
                      timeout=30)
    assert assert_quotes_its_id(mine, 400)["request_id"] == "client-id-42"
    for bad in ("x" * 200, "two words", "../../etc"):  # not kept: too long, or characters a log line could abuse
        r = httpx.post(f"{server.url}/generate", json={}, headers={**AUTH, "X-Request-ID": bad}, timeout=30)
        assert assert_quotes_its_id(r, 400)["request_id"] != bad
    unauthenticated = httpx.post(f"{server.url}/generate", json={"prompt": "hi"}, timeout=30)  # refused before routing
    assert_quotes_its_id(unauthenticated, 401)
    too_large = httpx.post(f"{server.url}/generate", content=b"x" * (3 << 20), headers=AUTH, timeout=30)
    assert_quotes_its_id(too_large, 413)
    assert len({r.headers["x-request-id"] for r in (ok, unauthenticated, too_large)}) == 3


def test_a_strict_chat_template_refusing_the_conversation_is_a_400_with_its_reason(keyed, world):
    server = keyed
    asks = [("/v1/chat/completions", {"model": world_base(server), "messages": TWO_USER_TURNS}),
            ("/v1/chat/completions", {"model": "alpha", "messages": TWO_USER_TURNS, "stream": True}),
            ("/v1/chat/completions", {"model": "auto", "messages": TWO_USER_TURNS}),
            ("/generate", {"messages": TWO_USER_TURNS, "adapter": "beta"}),
            ("/generate", {"messages": TWO_USER_TURNS})]
    for i, (path, payload) in enumerate(asks):
        r = httpx.post(f"{server.url}{path}", json={**payload, "max_tokens": 4},
                       headers={**AUTH, "X-Request-ID": f"template-{i}"}, timeout=120)
        error = assert_quotes_its_id(r, 400)
        assert error["param"] == "messages" and "roles must alternate" in error["message"], (path, error)
        assert_no_leak(r.text, world)
    log = server.log_path.read_text()
    for i in range(len(asks)):  # the request's log line carries its id
        assert re.search(rf"\[template-{i}\]: chat template refused", log), log[-3000:]
    ok = post(server, "/v1/chat/completions", {"model": "alpha", "max_tokens": 2,
                                               "messages": [{"role": "user", "content": "Hello."}]})
    assert ok.status_code == 200, ok.text  # a conversation the template accepts is served
    assert not crashes(server)


def world_base(server: ServerProcess) -> str:
    models = httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=30).json()["data"]
    return next(m["id"] for m in models if m["parent"] is None)


# ---- item 9: nothing of the machine in what a client reads ------------------------------------------
def test_models_list_names_no_folder(keyed, world):
    server = keyed
    r = httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=30)
    assert r.status_code == 200
    assert_no_leak(r.text, world)
    cards = {m["id"]: m for m in r.json()["data"]}
    assert {"alpha", "beta", "gamma", "router", "auto"} <= set(cards)
    assert all(card["root"] and not card["root"].startswith("/") for card in cards.values()), cards


def test_refused_registrations_and_failed_adapters_name_no_server_folder(keyed, world):
    server = keyed
    root = world["root"]
    corrupt = root / "corrupt"
    shutil.copytree(root / "alpha", corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    for path, words in (("/etc", "outside the adapter root"), ("alpha/../../x", "contains '..'"),
                        (str(root.parent / "elsewhere"), "outside the adapter root"),
                        ("corrupt", "not a readable safetensors file"), ("missing", "does not exist")):
        r = post(server, "/admin/adapters", {"name": "leaky", "path": path}, ADMIN_AUTH)
        error = assert_quotes_its_id(r, 422)
        assert words in error["message"], error
        assert_no_leak(r.text, world)
    # a hand-edited entry naming an absolute folder that is gone: its reason reaches inference clients
    data = json.loads(world["registry"].read_text())
    data["adapters"]["ghost"] = {"kind": "task", "active_version": 1,
                                 "versions": [{"version": 1, "path": str(root / "ghost"), "status": "active"}]}
    edited = world["registry"].with_suffix(".edit")
    edited.write_text(json.dumps(data))
    edited.replace(world["registry"])
    deadline = time.monotonic() + 30
    while (r := post(server, "/generate", {"prompt": "hi", "adapter": "ghost"})).status_code == 404:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.3)
    assert_quotes_its_id(r, 422)
    assert_no_leak(r.text, world)
    view = httpx.get(f"{server.url}/admin/adapters", headers=ADMIN_AUTH, timeout=30).json()
    ghost = next(a for a in view["adapters"] if a["name"] == "ghost")
    assert ghost["versions"][0]["error"]
    assert_no_leak(ghost["versions"][0]["error"], world)


def test_a_router_that_cannot_score_is_a_400_and_pinned_requests_still_serve(keyed, world):
    """A router whose weights overflow (every score NaN): a softmax over them has nothing to
    normalise. Last of the module's routing tests: it replaces the router."""
    from safetensors.torch import load_file, save_file

    server, root = keyed, world["root"]
    shutil.copytree(root / "router", root / "router_overflow")
    weights = root / "router_overflow" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    for key, tensor in tensors.items():
        tensor.fill_(3e38 if ".lora_B." in key else 1.0)
    save_file(tensors, str(weights))
    r = post(server, "/admin/adapters", {"name": "router", "kind": "router", "path": "router_overflow",
                                         "labels": ["alpha", "beta", "gamma"]}, ADMIN_AUTH)
    assert r.status_code == 201, r.text
    for path, payload in (("/route", {"prompt": "turn on the lights"}),
                          ("/generate", {"prompt": "turn on the lights", "max_tokens": 2}),
                          ("/v1/chat/completions", {"model": "auto", "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "lights on"}]})):
        error = assert_quotes_its_id(post(server, path, payload), 400)
        assert "router could not score" in error["message"] and error["param"] in ("adapter", "model"), error
    pinned = post(server, "/generate", {"prompt": "turn on the lights", "max_tokens": 2, "adapter": "alpha"})
    assert pinned.status_code == 200, pinned.text
    assert not crashes(server)


# ---- item 10: auth edges -----------------------------------------------------------------------------
def test_metrics_need_a_key_when_keys_are_set(keyed):
    server = keyed
    refused = httpx.get(f"{server.url}/metrics", timeout=30)
    assert_quotes_its_id(refused, 401)
    assert "loramux_" not in refused.text
    for key in (AUTH, ADMIN_AUTH):
        assert "loramux_queue_depth" in httpx.get(f"{server.url}/metrics", headers=key, timeout=30).text


def test_errors_are_counted_by_route_template_not_by_path(keyed):
    server = keyed
    random_paths = [f"/probe-{uuid.uuid4().hex}" for _ in range(5)]
    for path in random_paths:
        assert httpx.get(f"{server.url}{path}", headers=AUTH, timeout=30).status_code == 404
    for name in ("nope-1", "nope-2"):
        r = post(server, f"/admin/adapters/{name}/activate", {}, ADMIN_AUTH)
        assert r.status_code == 404, r.text
    text = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=30).text
    for path in random_paths:
        assert path.strip("/") not in text
    assert "nope-1" not in text and "nope-2" not in text
    assert re.search(r'loramux_errors_total\{endpoint="unmatched",type="not_found_error"\} ([5-9]|\d\d)', text)
    assert re.search(r'loramux_errors_total\{endpoint="admin_adapters_\{name\}_activate",type="not_found_error"\} '
                     r'[2-9]', text), text


def test_a_cors_preflight_is_answered_by_cors_not_refused_by_auth(keyed):
    server = keyed
    ask = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    for path in ("/v1/chat/completions", "/generate", "/admin/adapters"):
        r = httpx.options(f"{server.url}{path}", headers=ask, timeout=30)
        assert r.status_code == 200, (path, r.status_code, r.text)
        assert r.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{server.url}/generate", headers={**ask, "Origin": "https://evil.example"}, timeout=30)
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers  # CORS says no
    # a browser can read why a keyless cross-origin call failed
    refused = httpx.post(f"{server.url}/generate", json={"prompt": "hi"}, headers={"Origin": ORIGIN}, timeout=30)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN


def test_dns_rebinding_is_refused_by_a_keyless_loopback_server(server: ServerProcess) -> None:
    """The session's server (no keys, 127.0.0.1). A page on evil.example that rebinds its name to
    127.0.0.1 sends `Host: evil.example:PORT`: it must not reach /admin, nor anything else."""
    url, port = server.url, server.port
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", f"10.0.0.1:{port}"):
        for method, path, body in (("GET", "/admin/adapters", None), ("GET", "/v1/models", None),
                                   ("POST", "/generate", {"prompt": "hi", "max_tokens": 2})):
            r = httpx.request(method, f"{url}{path}", json=body, headers={"Host": host}, timeout=30)
            error = assert_quotes_its_id(r, 400)
            assert error["param"] == "host", error
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert httpx.get(f"{url}/admin/adapters", headers={"Host": host}, timeout=30).status_code == 200, host


# ---- the two settings that open what these tests close ---------------------------------------------
def _through_auth(settings_kwargs: dict, path: str, headers: dict[str, str]) -> int:
    """The status `AuthMiddleware` gives a request (200 when it lets it through to the app)."""
    import asyncio

    from service.api.middleware import AuthMiddleware
    from service.settings import Settings

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def go() -> int:
        transport = httpx.ASGITransport(app=AuthMiddleware(app, Settings(**settings_kwargs)))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return (await client.get(path, headers=headers)).status_code

    return asyncio.run(go())


def test_metrics_public_and_allowed_hosts_open_exactly_what_they_name():
    assert _through_auth({"api_keys": ["k"]}, "/metrics", {}) == 401
    assert _through_auth({"api_keys": ["k"], "metrics_public": True}, "/metrics", {}) == 200
    assert _through_auth({"api_keys": ["k"], "metrics_public": True}, "/v1/models", {}) == 401
    assert _through_auth({}, "/admin/adapters", {"Host": "loramux.internal:8000"}) == 400
    assert _through_auth({"allowed_hosts": "loramux.internal"}, "/admin/adapters", {"Host": "loramux.internal:8000"}) \
        == 200
    assert _through_auth({"allowed_hosts": "loramux.internal"}, "/admin/adapters", {"Host": "evil.example"}) == 400
