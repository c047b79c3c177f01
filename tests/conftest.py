"""Shared fixtures: the real base model (converted once per machine) and real LoRA adapters."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.base_model import BaseModelInfo, resolve_base_model
from service.settings import PROJECT_ROOT
from tests.support import make_lora_adapter

CACHE_DIR = PROJECT_ROOT / ".cache"
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
