"""Adapters come and go on a running server: admin API, registry edits, rollbacks, bad entries."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest

from service.registration import register_adapter
from service.registry import Registry
from service.settings import Settings
from tests.conftest import CACHE_DIR
from tests.support import ServerProcess, make_lora_adapter

ADMIN = "admin-key"
USER = "user-key"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, base_model, task_adapters):
    root = tmp_path_factory.mktemp("admin_root")
    for name in ("alpha", "beta"):
        shutil.copytree(task_adapters[name], root / name)
    registry = root / "loras.json"
    settings = Settings(registry=registry, adapter_root=root, cache_dir=CACHE_DIR)
    register_adapter(settings, base_model, "task", "alpha", root / "alpha")
    env = {
        "LORAMUX_REGISTRY": str(registry),
        "LORAMUX_ADAPTER_ROOT": str(root),
        "LORAMUX_CACHE_DIR": str(CACHE_DIR),
        "LORAMUX_REGISTRY_POLL_S": "0.2",
        "LORAMUX_API_KEYS": USER,
        "LORAMUX_ADMIN_API_KEYS": ADMIN,
    }
    server = ServerProcess(env).start(root / "server.log")
    yield server, root, registry, settings
    server.stop()


def gen(server, adapter: str, key: str = USER) -> httpx.Response:
    return httpx.post(f"{server.url}/generate", json={"prompt": "Hi", "adapter": adapter, "max_tokens": 4},
                      headers={"Authorization": f"Bearer {key}"}, timeout=120)


def admin(server, method: str, path: str, key: str = ADMIN, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                         **kwargs)


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_register_through_the_admin_api(setup):
    server, root, registry, _ = setup
    r = admin(server, "POST", "/admin/adapters", json={"name": "beta", "path": "beta", "description": "second"})
    assert r.status_code == 201, r.text
    assert r.json()["loaded"] is True and r.json()["version"] == 1
    assert gen(server, "beta").status_code == 200


def test_admin_needs_the_admin_key(setup):
    server, *_ = setup
    assert admin(server, "GET", "/admin/adapters", key=USER).status_code == 403
    assert admin(server, "GET", "/admin/adapters", key="wrong").status_code == 401
    assert httpx.get(f"{server.url}/admin/adapters").status_code == 401
    assert admin(server, "GET", "/admin/adapters").status_code == 200


@pytest.mark.parametrize(
    ("path", "reason"),
    [("../alpha", "'..'"), ("/etc", "outside the adapter root"), ("missing", "does not exist")],
)
def test_bad_registrations_are_refused_and_others_keep_serving(setup, path, reason):
    server, *_ = setup
    r = admin(server, "POST", "/admin/adapters", json={"name": "bad", "path": path})
    assert r.status_code == 422 and reason in r.json()["error"]["message"]
    assert gen(server, "alpha").status_code == 200


def test_registry_entry_outside_root_or_pickle_is_marked_failed(setup, tmp_path):
    server, root, registry, _ = setup
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(root / "alpha" / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not really a pickle")
    data = json.loads(registry.read_text())
    for name, path in (("outside", str(tmp_path)), ("pickled", "pickled")):
        data["adapters"][name] = {"kind": "task", "active_version": 1,
                                  "versions": [{"version": 1, "path": path, "status": "active"}]}
    tmp = registry.with_suffix(".edit")
    tmp.write_text(json.dumps(data))
    tmp.replace(registry)
    assert wait_for(lambda: gen(server, "pickled").status_code == 422)
    assert "pickle" in gen(server, "pickled").json()["error"]["message"]
    assert "outside the adapter root" in gen(server, "outside").json()["error"]["message"]
    assert gen(server, "alpha").status_code == 200
    view = admin(server, "GET", "/admin/adapters").json()
    errors = {a["name"]: a["versions"][0]["error"] for a in view["adapters"]}
    assert errors["alpha"] is None and "pickle" in errors["pickled"]


def test_new_version_rollback_and_remove_without_restart(setup, base_model):
    server, root, registry, settings = setup
    make_lora_adapter(base_model, root / "alpha_v2", seed=42)
    prompt = {"prompt": "Describe the moon.", "adapter": "alpha", "max_tokens": 12}
    headers = {"Authorization": f"Bearer {USER}"}
    before = httpx.post(f"{server.url}/generate", json=prompt, headers=headers, timeout=120).json()
    register_adapter(settings, base_model, "task", "alpha", root / "alpha_v2")  # the CLI's path: file only
    assert wait_for(lambda: gen(server, "alpha").json().get("version") == 2)
    after = httpx.post(f"{server.url}/generate", json=prompt, headers=headers, timeout=120).json()
    assert after["text"] != before["text"]
    r = admin(server, "POST", "/admin/adapters/alpha/activate", json={})
    assert r.json()["active_version"] == 1
    again = httpx.post(f"{server.url}/generate", json=prompt, headers=headers, timeout=120).json()
    assert again["version"] == 1 and again["text"] == before["text"]
    assert admin(server, "DELETE", "/admin/adapters/beta").status_code == 200
    assert gen(server, "beta").status_code == 404
    assert Registry(registry).load().task("alpha").version == 1
    beta = Registry(registry).load().entries["beta"]  # retired, not erased
    assert beta.removed and [v.version for v in beta.versions] == [1]
    assert admin(server, "POST", "/admin/adapters/beta/restore", json={}).json()["active_version"] == 1
    assert gen(server, "beta").status_code == 200


# ---- vLLM's runtime LoRA endpoints (issue 15): aliases of POST /admin/adapters and DELETE ------------
def vllm_call(server, path: str, body: dict, key: str = ADMIN) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def test_a_vllm_users_lora_script_runs_unchanged(setup, task_adapters):
    """vLLM's script as its users run it (load with an absolute path, chat with model=lora_name,
    unload), answered as vLLM answers; underneath, the registry's rules: versions, retire not delete."""
    import openai

    server, root, registry, _ = setup
    shutil.copytree(task_adapters["gamma"], root / "gamma-ft")
    load = {"lora_name": "gamma-ft", "lora_path": str(root / "gamma-ft")}
    r = vllm_call(server, "/v1/load_lora_adapter", load)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'gamma-ft' added successfully.", r.text
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=USER, max_retries=0, timeout=120)
    chat = {"model": "gamma-ft", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    assert client.chat.completions.create(**chat).model == "gamma-ft"

    again = vllm_call(server, "/v1/load_lora_adapter", load)  # vLLM's rule: serving already, no load_inplace
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name", again.text
    inplace = vllm_call(server, "/v1/load_lora_adapter", {**load, "load_inplace": True})
    assert inplace.status_code == 200, inplace.text
    assert Registry(registry).load().task("gamma-ft").version == 2  # a new version, not an overwrite

    r = vllm_call(server, "/v1/unload_lora_adapter", {"lora_name": "gamma-ft"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'gamma-ft' removed successfully.", r.text
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(**chat)
    entry = Registry(registry).load().entries["gamma-ft"]  # retired, its history kept
    assert entry.removed and [v.version for v in entry.versions] == [1, 2]
    gone = vllm_call(server, "/v1/unload_lora_adapter", {"lora_name": "gamma-ft"})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "lora_name", gone.text

    assert vllm_call(server, "/v1/load_lora_adapter", load).status_code == 200  # back, numbering goes on
    assert Registry(registry).load().task("gamma-ft").version == 3
    assert vllm_call(server, "/v1/unload_lora_adapter", {"lora_name": "gamma-ft"}).status_code == 200


def test_vllm_lora_endpoints_refuse_as_the_admin_api_does(setup):
    """A path outside the root or missing, an unknown name, a missing field: our error body with
    vLLM's field names; and only an admin key may call them."""
    server, *_ = setup
    for path, reason in (("/etc", "outside the adapter root"), ("missing", "does not exist")):
        r = vllm_call(server, "/v1/load_lora_adapter", {"lora_name": "bad-path", "lora_path": path})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert reason in error["message"] and error["param"] == "lora_path" and error["request_id"], error
    r = vllm_call(server, "/v1/unload_lora_adapter", {"lora_name": "never-registered"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name", r.text
    r = vllm_call(server, "/v1/load_lora_adapter", {"lora_name": "no-path"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", r.text
    assert vllm_call(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "alpha"}, USER).status_code == 403
    assert httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "alpha"}).status_code == 401
    assert "bad-path" not in Registry(setup[2]).load().entries and gen(server, "alpha").status_code == 200
