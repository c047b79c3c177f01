"""One bad adapter never breaks the others, on a real server (127.0.0.1, the real model, real
adapters): a registry with broken entries still starts, the watcher carries on past a broken entry
and retries it on the next change, PEFT variants the engines cannot serve in a mixed batch are
refused at registration with 422 while other traffic runs, and requests keep the adapter they were
given through rollbacks (the old version serves until they end, the new one until then loads).

Before the fixes: `lora_alpha: null` stopped start-up with a TypeError; a 0-d tensor stopped the
watcher's pass (nothing else in the same registry write was ever loaded, and it was never
retried); a DoRA adapter was accepted (and then failed every request batched with it).
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from service.registration import register_adapter
from service.settings import Settings
from tests.conftest import CACHE_DIR, TASK_ADAPTERS
from tests.live_server import crashes, metric, private_copy, start_server
from tests.support import ServerProcess, make_norm_lora

USER = "faults-user-key-0123"
ADMIN = "faults-admin-key-4567"
AUTH = {"Authorization": f"Bearer {USER}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}

pytestmark = pytest.mark.slow


# ---- making bad adapters -------------------------------------------------------------------------
def copy_of(root: Path, name: str, source: str = "alpha") -> Path:
    shutil.copytree(root / source, root / name)
    return root / name


def edit_config(folder: Path, **changes: object) -> Path:
    file = folder / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))
    return folder


def edit_weights(folder: Path, change: Callable[[dict], None]) -> Path:
    from safetensors.torch import load_file, save_file

    file = folder / "adapter_model.safetensors"
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file))
    return folder


def zero_d(tensors: dict) -> None:
    key = next(k for k in sorted(tensors) if ".lora_A." in k)
    tensors[key] = tensors[key].new_tensor(1.0).reshape(())


def magnitude(tensors: dict) -> None:  # what a DoRA checkpoint carries besides A and B
    key = next(k for k in sorted(tensors) if ".lora_A." in k)
    tensors[key.replace(".lora_A.weight", ".lora_magnitude_vector")] = tensors[key][0].clone()


def hand_entry(name: str, path: str) -> dict:
    """A registry entry as an operator's hand edit writes it (no checksum)."""
    return {"kind": "task", "active_version": 1, "versions": [{"version": 1, "path": path, "status": "active"}]}


def write_registry(registry: Path, data: dict) -> None:
    tmp = registry.with_suffix(".edit")
    tmp.write_text(json.dumps(data))
    tmp.replace(registry)


BROKEN_AT_START = {  # name -> (folder maker, reason in the 422)
    "nullalpha": (lambda root: edit_config(copy_of(root, "nullalpha"), lora_alpha=None), "lora_alpha None"),
    "zerod": (lambda root: edit_weights(copy_of(root, "zerod"), zero_d), "has shape []"),
    "doraflag": (lambda root: edit_config(copy_of(root, "doraflag"), use_dora=True), "DoRA"),
}


@pytest.fixture(scope="module")
def faults_root(served_registry, adapter_root, base_model, tmp_path_factory) -> tuple[Path, Path]:
    root, registry = private_copy(served_registry, adapter_root, tmp_path_factory.mktemp("faults_root"))
    settings = Settings(registry=registry, adapter_root=root, cache_dir=CACHE_DIR)
    from service.adapter_validation import base_modules

    modules = base_modules(base_model)
    for name in TASK_ADAPTERS:  # a second version of each expert, active: rollbacks have somewhere to go
        register_adapter(settings, base_model, "task", name, copy_of(root, f"{name}_v2", name),
                         modules=modules)
    register_adapter(settings, base_model, "router", "router", copy_of(root, "router_v2", "router"),
                     labels=TASK_ADAPTERS, activate=False, modules=modules)  # a candidate: shadow routing
    data = json.loads(registry.read_text())
    for name, (make, _) in BROKEN_AT_START.items():
        make(root)
        data["adapters"][name] = hand_entry(name, name)
    write_registry(registry, data)
    return root, registry


@pytest.fixture(scope="module")
def server(faults_root, tmp_path_factory) -> Iterator[ServerProcess]:
    root, registry = faults_root
    server = start_server(root, registry, tmp_path_factory.mktemp("faults") / "server.log",
                          api_keys=USER, admin_api_keys=ADMIN, default_max_tokens=4, shadow_fraction=1.0)
    yield server
    server.stop()


# ---- helpers ---------------------------------------------------------------------------------------
def generate(server: ServerProcess, adapter: str | None, **extra: object) -> httpx.Response:
    payload = {"prompt": "Hi", "max_tokens": 4, **extra}
    if adapter is not None:
        payload["adapter"] = adapter
    return httpx.post(f"{server.url}/generate", json=payload, headers=AUTH, timeout=120)


def admin_view(server: ServerProcess) -> dict[str, dict]:
    view = httpx.get(f"{server.url}/admin/adapters", headers=ADMIN_AUTH, timeout=30).json()
    return {a["name"]: a for a in view["adapters"]}


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def stream_events(server: ServerProcess, path: str, payload: dict) -> tuple[int, list[str]]:
    with httpx.stream("POST", f"{server.url}{path}", json=payload, headers=AUTH, timeout=120) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [r.text]
        return 200, [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


class Traffic:
    """Good requests of every kind in background threads until stopped; keeps every outcome."""

    KINDS = ("pinned", "pinned-stream", "routed", "routed-stream", "chat-auto-stream", "route")

    def __init__(self, server: ServerProcess, long_prompts: bool = False):
        self.server = server
        self.padding = " Please answer with care and in detail." * 20 if long_prompts else ""  # longer routing
        self.stop = threading.Event()
        self.outcomes: list[tuple[str, int, str]] = []
        self.pool = ThreadPoolExecutor(len(self.KINDS))
        self.futures = []

    def __enter__(self) -> Traffic:
        self.futures = [self.pool.submit(self._run, kind) for kind in self.KINDS]
        return self

    def _run(self, kind: str) -> None:
        i = 0
        while not self.stop.is_set() or i < 2:
            adapter = TASK_ADAPTERS[i % 3]
            prompt = f"Tell me about item {i}.{self.padding}"
            if kind == "pinned":
                r = generate(self.server, adapter, prompt=prompt)
                self.outcomes.append((kind, r.status_code, r.text[:300]))
            elif kind == "routed":
                r = generate(self.server, None, prompt=prompt)
                self.outcomes.append((kind, r.status_code, r.text[:300]))
            elif kind == "route":
                r = httpx.post(f"{self.server.url}/route", json={"prompt": prompt}, headers=AUTH, timeout=120)
                self.outcomes.append((kind, r.status_code, r.text[:300]))
            else:
                if kind == "chat-auto-stream":
                    path, payload = "/v1/chat/completions", {
                        "model": "auto", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4,
                        "stream": True}
                else:
                    path, payload = "/generate", {"prompt": prompt, "max_tokens": 4, "stream": True}
                    if kind == "pinned-stream":
                        payload["adapter"] = adapter
                status, events = stream_events(self.server, path, payload)
                bad = status != 200 or events[-1] != "[DONE]" or any('"error"' in e for e in events)
                self.outcomes.append((kind, 500 if bad and status == 200 else status, "|".join(events)[-300:]))
            i += 1

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for future in self.futures:
            future.result()
        self.pool.shutdown()

    def failures(self) -> list[tuple[str, int, str]]:
        return [o for o in self.outcomes if o[1] != 200]


# ---- tests -----------------------------------------------------------------------------------------
def test_start_up_carries_on_past_every_bad_entry(server):
    ready = httpx.get(f"{server.url}/ready", timeout=30).json()
    assert ready["status"] == "ready" and ready["adapters_failed"] == len(BROKEN_AT_START)
    view = admin_view(server)
    for name, (_, reason) in BROKEN_AT_START.items():
        error = view[name]["versions"][0]["error"]
        assert error and reason in error, (name, error)
        r = generate(server, name)
        assert r.status_code == 422 and reason in r.json()["error"]["message"], r.text
    for name in TASK_ADAPTERS:
        r = generate(server, name)
        assert r.status_code == 200 and r.json()["version"] == 2, r.text
    assert generate(server, None).status_code == 200


def test_the_watcher_carries_on_past_a_bad_entry_and_retries_it_on_the_next_change(server, faults_root):
    root, registry = faults_root
    edit_weights(copy_of(root, "zerod2"), zero_d)
    copy_of(root, "delta", "beta")
    data = json.loads(registry.read_text())
    data["adapters"]["zerod2"] = hand_entry("zerod2", "zerod2")  # a broken entry and a good one, one write
    data["adapters"]["delta"] = hand_entry("delta", "delta")
    write_registry(registry, data)
    assert wait_for(lambda: generate(server, "delta").status_code == 200), generate(server, "delta").text
    r = generate(server, "zerod2")
    assert r.status_code == 422 and "has shape []" in r.json()["error"]["message"], r.text
    assert "has shape []" in admin_view(server)["zerod2"]["versions"][0]["error"]

    def attempts() -> int:
        assert server.log_path is not None
        return server.log_path.read_text().count("adapter zerod2@1 refused")

    assert attempts() == 1
    for touch in range(5):  # other writes to the registry: the broken entry, unchanged, is not tried again
        data = json.loads(registry.read_text())
        data["adapters"]["delta"]["versions"][0]["description"] = f"touch {touch}"
        write_registry(registry, data)
        expected = f"touch {touch}"
        assert wait_for(lambda e=expected: admin_view(server)["delta"]["versions"][0]["description"] == e)
    time.sleep(2.5)  # two more polls
    assert attempts() == 1

    shutil.copy(root / "alpha" / "adapter_model.safetensors", root / "zerod2")  # the operator repairs it...
    assert generate(server, "zerod2").status_code == 422  # (nothing re-reads it until the registry changes)
    data = json.loads(registry.read_text())
    data["adapters"]["zerod2"]["versions"][0]["description"] = "repaired"  # ...and touches the registry
    write_registry(registry, data)
    assert wait_for(lambda: generate(server, "zerod2").status_code == 200), generate(server, "zerod2").text
    assert admin_view(server)["zerod2"]["versions"][0]["error"] is None


NOT_PLAIN_LORA = {  # folder -> (maker, words in the 422)
    "reg_dora": (lambda root: edit_config(copy_of(root, "reg_dora"), use_dora=True), "DoRA"),
    "reg_dora_weights": (lambda root: edit_weights(edit_config(copy_of(root, "reg_dora_weights"), use_dora=True),
                                                   magnitude), "DoRA"),
    "reg_magnitude": (lambda root: edit_weights(copy_of(root, "reg_magnitude"), magnitude),
                      "not LoRA A/B matrices"),
    "reg_save": (lambda root: edit_config(copy_of(root, "reg_save"), modules_to_save=["lm_head"]),
                 "modules_to_save"),
    "reg_rank_pattern": (lambda root: edit_config(copy_of(root, "reg_rank_pattern"), rank_pattern={"q_proj": 4}),
                         "rank_pattern"),
    "reg_null_alpha": (lambda root: edit_config(copy_of(root, "reg_null_alpha"), lora_alpha=None), "lora_alpha"),
    "reg_zero_d": (lambda root: edit_weights(copy_of(root, "reg_zero_d"), zero_d), "has shape []"),
    "reg_regex": (lambda root: edit_config(copy_of(root, "reg_regex"), target_modules=r"(.*)*x"),
                  "nests a repeat"),
    "reg_ia3": (lambda root: edit_config(copy_of(root, "reg_ia3"), peft_type="IA3"), "only LORA"),
}


def test_non_plain_lora_is_refused_at_registration_while_traffic_runs(server, faults_root):
    root, _ = faults_root
    for maker, _ in NOT_PLAIN_LORA.values():
        maker(root)
    with Traffic(server) as traffic:
        time.sleep(1.0)
        for folder, (_, reason) in NOT_PLAIN_LORA.items():
            r = httpx.post(f"{server.url}/admin/adapters", json={"name": folder.replace("_", "-"), "path": folder},
                           headers=ADMIN_AUTH, timeout=120)
            assert r.status_code == 422, (folder, r.text)
            error = r.json()["error"]
            assert error["type"] == "invalid_adapter_error" and reason in error["message"], (folder, error)
    assert traffic.failures() == []
    assert {kind for kind, _, _ in traffic.outcomes} == set(Traffic.KINDS)
    view = admin_view(server)
    assert not {folder.replace("_", "-") for folder in NOT_PLAIN_LORA} & set(view)  # nothing was registered


def test_a_version_that_fails_to_load_leaves_its_predecessor_serving(server, faults_root, base_model):
    """Registered through the file (the CLI's path): it validates, the engine refuses it. The name
    keeps answering with the version it had, and the failure is visible in /admin/adapters."""
    root, registry = faults_root
    previous = generate(server, "beta").json()["version"]
    folder = copy_of(root, "beta_norm_lora", "beta")
    make_norm_lora(folder)
    settings = Settings(registry=registry, adapter_root=root, cache_dir=CACHE_DIR)
    new = register_adapter(settings, base_model, "task", "beta", folder)
    assert wait_for(lambda: (admin_view(server)["beta"]["versions"][-1]["error"] or "") != "")
    assert "failed to load" in admin_view(server)["beta"]["versions"][-1]["error"]
    r = generate(server, "beta")
    assert r.status_code == 200 and r.json()["version"] == previous != new.version, r.text
    assert r.headers["x-loramux-adapter"] == f"beta@{previous}"
    r = httpx.post(f"{server.url}/admin/adapters/beta/activate", json={"version": previous}, headers=ADMIN_AUTH,
                   timeout=120)  # the operator puts the registry back in line with what serves
    assert r.status_code == 200, r.text
    assert generate(server, "beta").json()["version"] == previous


def routing_decisions(server: ServerProcess) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=ADMIN_AUTH, timeout=30).text
    return sum(float(v) for v in re.findall(r"^loramux_routing_decisions_total\{[^}]*\} (\S+)$", text, re.MULTILINE))


LONG_PROMPT = "Tell me about the lights in the kitchen and the calendar for tomorrow. " * 40  # a slower decision


def test_a_routed_request_keeps_its_adapter_when_it_is_removed_after_the_choice(server):
    """With a candidate router registered, a routed request is shadow-routed after its adapter was
    chosen (a second forward pass). The chosen adapter is removed in that window, signalled by the
    routing-decision counter, which counts the choice just before the shadow pass: the request still
    generates with it (it holds it since the choice), and it is unloaded after."""
    for attempt in range(3):
        prompt = f"{attempt}. {LONG_PROMPT}"
        chosen = httpx.post(f"{server.url}/route", json={"prompt": prompt}, headers=AUTH, timeout=120).json()
        name = chosen["adapter"]
        assert name in TASK_ADAPTERS, chosen
        before = routing_decisions(server)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(generate, server, None, prompt=prompt, max_tokens=8)
            assert wait_for(lambda b=before, p=pending: routing_decisions(server) > b or p.done(), 60)
            assert not pending.done(), "the shadow pass was over before the test could act"
            removed = httpx.delete(f"{server.url}/admin/adapters/{name}", headers=ADMIN_AUTH, timeout=120)
            assert removed.status_code == 200, removed.text
            r = pending.result()
        assert r.status_code == 200, (attempt, r.text)
        assert r.json()["adapter"] == name and r.json()["routing"]["adapter"] == name
        assert wait_for(lambda n=name: generate(server, n).status_code == 404, 10)  # gone once it ended
        again = httpx.post(f"{server.url}/admin/adapters", json={"name": name, "path": f"{name}_v2"},
                           headers=ADMIN_AUTH, timeout=120)
        assert again.status_code == 201, again.text
    assert wait_for(lambda: metric(server, "loramux_queue_depth", ADMIN_AUTH) == 0, 10)


def test_a_task_adapter_is_replaced_and_rolled_back_under_traffic(server, faults_root, base_model):
    """A new version with other weights through the admin API, then a rollback to the version before,
    while requests of every kind run (gamma's among them): none of them fails, and each switch is in
    effect once its admin call returns: X-Loramux-Adapter names the new version and the answer is its
    own, then the previous version's header and answer are back."""
    from tests.support import make_lora_adapter

    root, _ = faults_root
    make_lora_adapter(base_model, root / "gamma_replacement", seed=77)

    def served() -> tuple[str, str]:
        r = generate(server, "gamma", prompt="Describe the moon.", max_tokens=8, temperature=0)
        assert r.status_code == 200, r.text
        return r.headers["x-loramux-adapter"], r.json()["text"]

    before = served()
    previous = int(before[0].rsplit("@", 1)[1])
    with Traffic(server) as traffic:
        time.sleep(0.5)
        r = httpx.post(f"{server.url}/admin/adapters", json={"name": "gamma", "path": "gamma_replacement"},
                       headers=ADMIN_AUTH, timeout=120)
        assert r.status_code == 201, r.text
        header, text = served()
        assert header == f"gamma@{r.json()['version']}" != before[0] and text != before[1]
        r = httpx.post(f"{server.url}/admin/adapters/gamma/activate", json={"version": previous}, headers=ADMIN_AUTH,
                       timeout=120)
        assert r.status_code == 200 and r.json()["active_version"] == previous, r.text
        assert served() == before
        time.sleep(0.5)
    assert traffic.failures() == []
    assert {kind for kind, _, _ in traffic.outcomes} == set(Traffic.KINDS)


def test_the_server_logged_no_unhandled_error(server):
    assert crashes(server) == []
