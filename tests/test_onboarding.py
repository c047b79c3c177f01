"""Onboarding a new expert into a running server (issue 9), with the real model and real training.

One module-scoped scenario, in the order an operator lives it:
1. three experts and a router trained over them serve on a real uvicorn server;
2. `loramux onboard --no-promote` registers a fourth expert and a retrained (warm-started) router
   as a *candidate*, which the server shadow-routes beside the active router;
3. `loramux router promote` switches the live server to it, with concurrent traffic running the
   whole time: the new expert becomes routable without a restart and no request fails;
4. a router trained on shuffled labels is refused by the gate, marked failed, and never serves.

The server starts on what `loramux demo` builds (`run_demo`: real datasets, trained experts and a
router, evaluated and registered), with a few expert steps (what experts answer does not matter
here) and a router trained a few dozen steps, so routing accuracy means something. The new expert
is trained by `onboard --train` itself, for one step: the router's candidate, not the expert's
answers, is what the gate judges. The stacked evaluation the demo ends with runs on two requests.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from service.base_model import BaseModelInfo
from service.registry import Registry
from service.settings import PROJECT_ROOT, Settings
from tests.support import ServerProcess
from training.data.chats import read_chats, write_jsonl
from training.data.routing_dataset import build_routing_dataset
from training.data.task_datasets import build_task_datasets
from training.demo import DemoPlan, run_demo
from training.register.onboard import onboard, review_candidate
from training.train.sft import TrainConfig, train_adapter

pytestmark = pytest.mark.slow

OLD = ("lights", "media", "timer")
NEW = "calendar"
FLOOR, MARGIN = 0.8, 0.25
ROUTER = {"batch_size": 16, "learning_rate": 2e-3, "dropout": 0.0, "save_steps": 1000}


class Traffic:
    """Background clients hitting /route and pinned /generate; every response is recorded."""

    def __init__(self, url: str, texts: list[str]):
        self.url, self.texts = url, texts
        self.results: list[tuple[int, dict]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(2)]

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                text = rng.choice(self.texts)
                if index == 0:
                    response = client.post("/route", json={"prompt": text})
                else:
                    response = client.post("/generate", json={"prompt": text, "adapter": rng.choice(OLD),
                                                              "max_tokens": 2})
                self.results.append((response.status_code, response.json()))
                self._stop.wait(0.1)

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def failures(self) -> list[tuple[int, dict]]:
        return [(code, body) for code, body in self.results if code != 200]

    def router_versions(self) -> set[int]:
        return {body["router"]["version"] for code, body in self.results if code == 200 and "router" in body}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, base_model: BaseModelInfo) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("onboard_root")
    settings = Settings(adapter_root=root, registry=root / "config" / "loras.json", cache_dir=PROJECT_ROOT / ".cache",
                        gate_min_accuracy=FLOOR, gate_max_recall_drop=MARGIN)
    quick = DemoPlan.quick()
    plan = DemoPlan(experts=OLD, per_expert=60, seed=0, expert=replace(quick.expert, max_steps=4),
                    router=replace(quick.router, max_steps=24, **ROUTER), expert_eval_limit=2,
                    router_eval_limit=None, stacked_eval_limit=2, expert_max_tokens=16)
    demo = run_demo(settings, plan, echo=lambda _line: None, base=base_model)
    tasks = {name: Path(demo.summary["datasets"]) / "experts" / name for name in OLD}
    tasks[NEW] = build_task_datasets(root / "datasets" / "new", (NEW,), per_expert=60, seed=0)[NEW].path
    env = {"LORAMUX_REGISTRY": str(settings.registry), "LORAMUX_ADAPTER_ROOT": str(root),
           "LORAMUX_CACHE_DIR": str(settings.cache_dir), "LORAMUX_REGISTRY_POLL_S": "0.5",
           "LORAMUX_SHADOW_FRACTION": "1.0", "LORAMUX_GATE_MIN_ACCURACY": str(FLOOR),
           "LORAMUX_GATE_MAX_RECALL_DROP": str(MARGIN),
           # server and onboarding CLI share 2 cores: one thread each, or OpenMP spin-waits oversubscribe
           # them and both slow down many times over (CI timed out this way)
           "OMP_NUM_THREADS": "1"}
    server = ServerProcess(env).start(root / "server.log")
    try:
        yield {"root": root, "settings": settings, "tasks": tasks, "server": server, "env": env}
    finally:
        server.stop()


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loramux", *args], env={**os.environ, **env},
                          capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=1200)


def _texts(path: Path, split: str = "eval") -> list[str]:
    return [r.user_text for r in read_chats(path / f"{split}.jsonl", need_assistant=False)]


def test_onboard_shadow_promote_without_restart_or_failures(world: dict) -> None:
    server, tasks = world["server"], world["tasks"]
    old_texts = [t for name in OLD for t in _texts(tasks[name])]
    new_texts = _texts(tasks[NEW])
    with Traffic(server.url, old_texts) as traffic:
        started = time.perf_counter()
        done = _cli(world["env"], "onboard", "--name", NEW, "--dataset", str(tasks[NEW] / "all.jsonl"),
                    "--train", "--expert-steps", "1", "--no-promote", "--router-steps", "16")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "passed the gate (candidate)" in done.stdout, done.stdout
        report_path = Path(done.stdout.split("report: ")[1].strip())
        report = json.loads(report_path.read_text())
        assert report["gate"]["passed"] and report["candidate_report"]["labels"] == sorted((*OLD, NEW))
        # accuracy on the old experts stays within the margin: the gate's recall check, recomputed here
        for name in OLD:
            before = report["active_report"]["per_class"][name]["recall"]
            after = report["candidate_report"]["per_class"][name]["recall"]
            assert after >= before - MARGIN, (name, before, after)
        assert report["candidate_report"]["accuracy"] >= FLOOR

        # the candidate is shadowed, not serving: routes still come from version 1 and never pick the new expert
        for text in new_texts[:4]:
            body = httpx.post(f"{server.url}/route", json={"prompt": text}, timeout=60).json()
            assert body["router"]["version"] == 1 and body["adapter"] in OLD
        shadow = httpx.get(f"{server.url}/admin/routers", timeout=10).json()["shadow"]
        assert sum(s["compared"] for s in shadow.values()) >= 4
        # the candidate shadows with its own labels: it sends the new expert's requests to the new expert
        assert any(key.endswith(f"->{NEW}") for s in shadow.values() for key in s["disagreements"]), shadow

        promoted = _cli(world["env"], "router", "promote")
        assert promoted.returncode == 0, promoted.stderr
        deadline = time.monotonic() + 30
        routed_new = 0
        while time.monotonic() < deadline:
            bodies = [httpx.post(f"{server.url}/route", json={"prompt": t}, timeout=60).json() for t in new_texts]
            if all(b["router"]["version"] == 2 for b in bodies):
                routed_new = sum(b["adapter"] == NEW for b in bodies)
                break
            time.sleep(0.5)
        assert routed_new >= 0.8 * len(new_texts), routed_new
        served = httpx.post(f"{server.url}/generate", json={"prompt": new_texts[0], "max_tokens": 2}, timeout=60)
        assert served.status_code == 200 and served.json()["adapter"] == NEW
        print(f"\nonboard -> first request served by {NEW}: {time.perf_counter() - started:.1f}s "
              f"(shadow: {shadow})")
    assert traffic.results and not traffic.failures(), traffic.failures()[:3]
    assert {1, 2} <= traffic.router_versions()


def test_a_bad_candidate_is_refused_and_never_serves(world: dict, base_model: BaseModelInfo) -> None:
    server, settings, tasks = world["server"], world["settings"], world["tasks"]
    routing = build_routing_dataset({n: tasks[n] / "all.jsonl" for n in (*OLD, NEW)},
                                    world["root"] / "datasets" / "bad", seed=0)
    train = read_chats(routing.path / "train.jsonl")
    answers = [r.messages[-1]["content"] for r in train]
    random.Random(0).shuffle(answers)
    shuffled = world["root"] / "datasets" / "shuffled"
    rows = []
    for record, answer in zip(train, answers, strict=True):
        row = record.to_json()
        row["messages"][-1]["content"] = answer
        rows.append(row)
    write_jsonl(shuffled / "train.jsonl", rows)
    for split in ("val", "eval"):
        (shuffled / f"{split}.jsonl").write_text((routing.path / f"{split}.jsonl").read_text())
    bad = train_adapter(TrainConfig(kind="router", dataset=shuffled, run_name="router-shuffled", max_steps=4,
                                    progress=False, eval_examples=0, **ROUTER), settings, base_model)

    active_before = Registry(settings.registry).load().router("router")
    with Traffic(server.url, _texts(tasks[NEW]) + _texts(tasks["lights"])) as traffic:
        review = review_candidate(settings, "router", bad.final_dir, routing.path, sorted((*OLD, NEW)),
                                  FLOOR, MARGIN)
        time.sleep(2)  # a few registry polls: a refused version must not be picked up
    assert not review.gate.passed and not review.promoted
    assert any("below the floor" in reason for reason in review.gate.reasons), review.gate.reasons
    snapshot = Registry(settings.registry).load()
    assert snapshot.router("router").version == active_before.version
    assert snapshot.entries["router"].get(review.version).status == "failed"
    assert review.version not in traffic.router_versions() and not traffic.failures()
    routers = httpx.get(f"{server.url}/admin/routers", timeout=10).json()
    assert review.version not in {int(k.split("@")[-1]) for k in routers["shadow"] if "@" in k}


def test_onboard_refuses_garbage_before_training(world: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "{}"}]}'
    bad.write_text(good + "\n{oops\n")
    with pytest.raises(Exception, match=r"bad\.jsonl:2"):
        onboard("broken", bad, adapter=None, train=True, settings=world["settings"])
    assert "broken" not in Registry(world["settings"].registry).load().entries


def test_new_weights_for_a_serving_name_wait_for_the_gate(world: dict) -> None:
    """Onboarding a name that already serves registers the new weights as a candidate: a refused
    gate leaves the version that was active answering, in the registry and on the live server."""
    server, settings, tasks = world["server"], world["settings"], world["tasks"]
    registry = Registry(settings.registry)
    before = registry.load().entries["lights"].active
    other = settings.adapter_root / registry.load().entries["timer"].active.path  # valid weights, not lights'
    pinned = {"prompt": _texts(tasks["lights"])[0], "adapter": "lights", "max_tokens": 2}
    assert httpx.post(f"{server.url}/generate", json=pinned, timeout=60).json()["version"] == before.version
    done = _cli(world["env"], "onboard", "--name", "lights", "--dataset", str(tasks["lights"] / "all.jsonl"),
                "--adapter", str(other), "--router-steps", "2", "--floor", "1.01")
    assert done.returncode == 3 and "refused by the gate" in done.stdout, done.stdout + done.stderr
    assert "as a candidate" in done.stdout, done.stdout
    entry = registry.load().entries["lights"]
    assert entry.active.version == before.version
    assert entry.versions[-1].status == "candidate" and entry.versions[-1].version > before.version
    time.sleep(2)  # a few registry polls: the candidate must not be picked up by name
    assert httpx.post(f"{server.url}/generate", json=pinned, timeout=60).json()["version"] == before.version
