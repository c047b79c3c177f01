"""Shared fixtures: the real base model (converted once per machine) and real LoRA adapters."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loadtests.harness import CACHE_DIR
from service.base_model import BaseModelInfo, resolve_base_model
from tests.support import make_lora_adapter

TASK_ADAPTERS = ("alpha", "beta", "gamma")


@pytest.fixture(scope="session")
def base_model() -> BaseModelInfo:
    return resolve_base_model("smollm2", CACHE_DIR)


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapter_root")


@pytest.fixture(scope="session")
def task_adapters(base_model: BaseModelInfo, adapter_root: Path) -> dict[str, Path]:
    """Three real LoRA adapters with random weights (seconds, no training), inside `adapter_root`."""
    return {
        name: make_lora_adapter(base_model, adapter_root / name, seed=index + 1)
        for index, name in enumerate(TASK_ADAPTERS)
    }


@pytest.fixture(scope="session")
def router_adapter(base_model: BaseModelInfo, adapter_root: Path) -> Path:
    """A router LoRA with random weights: its decisions are arbitrary but must always be valid."""
    return make_lora_adapter(base_model, adapter_root / "router", seed=99, scale=3.0)


@pytest.fixture(scope="session")
def served_registry(
    tmp_path_factory: pytest.TempPathFactory,
    base_model: BaseModelInfo,
    adapter_root: Path,
    task_adapters: dict[str, Path],
    router_adapter: Path,
) -> Path:
    """A registry holding the three task adapters and a router over them."""
    from service.registration import register_adapter
    from service.settings import Settings

    registry = tmp_path_factory.mktemp("registry") / "loras.json"
    settings = Settings(registry=registry, adapter_root=adapter_root, cache_dir=CACHE_DIR)
    for name, path in task_adapters.items():
        register_adapter(settings, base_model, "task", name, path, description=f"test adapter {name}")
    register_adapter(settings, base_model, "router", "router", router_adapter, labels=TASK_ADAPTERS)
    return registry


@pytest.fixture(scope="session")
def weather_expert(base_model: BaseModelInfo, adapter_root: Path) -> Path:
    """A real expert trained for a few steps to answer with one tool call (`tests.support.WEATHER_CALL`),
    inside the shared adapter root so that any test server can register it."""
    from tests.support import train_weather_expert

    return train_weather_expert(base_model, adapter_root / "weather")


@dataclass(frozen=True)
class QuickDemo:
    settings: Any
    summary: dict[str, Any]  # the demo's summary.json
    report_dir: Path
    lines: list[str]  # what the command printed (the demo's lines and its server's log)
    seen: list[Any]  # tests.support.Seen: what clients got while it built


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory: pytest.TempPathFactory, base_model: BaseModelInfo) -> QuickDemo:
    """`loramux demo --quick --serve` (what `make run` does, with a few training steps per adapter):
    a real server from the start, the demo's real datasets, training, registration and evaluation
    feeding it, and a client asking all along until the demo is done (`watch_build`). The demo
    tests check both; the Locust run serves what it built."""
    from service.settings import Settings
    from tests.support import ServerProcess, watch_build
    from training.demo import DemoPlan

    root = tmp_path_factory.mktemp("quick_demo")
    settings = Settings(adapter_root=root, registry=root / "config" / "loras.json", cache_dir=CACHE_DIR)
    env = {"LORAMUX_REGISTRY": str(settings.registry), "LORAMUX_ADAPTER_ROOT": str(root),
           "LORAMUX_CACHE_DIR": str(CACHE_DIR), "LORAMUX_REGISTRY_POLL_S": "0.2"}
    proc = ServerProcess(env, command=("demo", "--quick", "--serve")).start(root / "demo.log")
    try:
        seen = watch_build(proc, DemoPlan.quick().experts[-1], lambda: "[demo] done" in proc.log())
    finally:
        code = proc.stop()
    lines = (root / "demo.log").read_text().splitlines()
    assert code == 130, f"the demo's server did not stop on SIGTERM ({code}):\n{proc.log()}"
    (summary_file,) = (root / "reports").glob("demo_*/summary.json")
    return QuickDemo(settings, json.loads(summary_file.read_text()), summary_file.parent, lines, seen)


@pytest.fixture(scope="session")
def server(served_registry: Path, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real `loramux serve` on 127.0.0.1 with the three adapters and the router."""
    from tests.support import ServerProcess

    env = {
        "LORAMUX_REGISTRY": str(served_registry),
        "LORAMUX_ADAPTER_ROOT": str(adapter_root),
        "LORAMUX_CACHE_DIR": str(CACHE_DIR),
        "LORAMUX_REGISTRY_POLL_S": "0.2",
        "LORAMUX_MAX_MODEL_LEN": "512",
    }
    proc = ServerProcess(env).start(tmp_path_factory.mktemp("server") / "server.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def tiny_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-VL with the real Qwen tokenizer (tests/vl_support.py), ~22 MB, ~5 s."""
    from tests.vl_support import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl"))


@pytest.fixture(scope="session")
def vl_adapters(tiny_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two language-model LoRAs and a router LoRA on the tiny Qwen3-VL (random weights, scaled up so
    they visibly change the output)."""
    from tests.vl_support import make_vl_lora_adapter

    root = tmp_path_factory.mktemp("vl-adapters")
    return {name: make_vl_lora_adapter(tiny_vl, root / name, seed=seed, scale=4.0)
            for name, seed in (("alpha", 1), ("beta", 2), ("router", 3))}
