"""Shared fixtures: the real base model (converted once per machine) and real LoRA adapters."""

from __future__ import annotations

from pathlib import Path

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
def quick_demo(tmp_path_factory: pytest.TempPathFactory, base_model: BaseModelInfo):
    """`loramux demo` in its quick form (real datasets, a few training steps per adapter, evaluation,
    registration) in its own adapter root: the demo test checks it, the Locust run serves it.
    Returns (settings, DemoResult, printed lines)."""
    from service.settings import Settings
    from training.demo import DemoPlan, run_demo

    root = tmp_path_factory.mktemp("quick_demo")
    settings = Settings(adapter_root=root, registry=root / "config" / "loras.json", cache_dir=CACHE_DIR)
    lines: list[str] = []
    result = run_demo(settings, DemoPlan.quick(), echo=lines.append, base=base_model)
    return settings, result, lines


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
