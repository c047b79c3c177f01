"""An engine whose LoRA slots have a fixed size (vLLM's `max_lora_rank`) is told the registry's ranks
before it starts: the versions the service will load, not retired ones. (The vLLM engine's own
sizing and its restart for a larger adapter run on vLLM in `test_vllm_engine.py`.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

from service.api import app as app_module
from service.api.app import build_state, close_state
from service.base_model import BaseModelInfo
from service.settings import Settings
from tests.test_ticket_release import FakeEngine


class SizedEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[int]]] = []

    def size_lora(self, ranks: Sequence[int]) -> None:
        self.calls.append(("size_lora", sorted(ranks)))

    async def start(self) -> None:
        self.calls.append(("start", []))


def test_the_engine_is_sized_from_the_registry_before_it_starts(tmp_path: Path, monkeypatch) -> None:
    from service import adapters as adapters_module
    from service.adapter_validation import AdapterInfo

    def version(n: int, rank: int, status: str) -> dict:
        return {"version": n, "path": f"a{n}", "status": status, "rank": rank}

    registry = tmp_path / "loras.json"
    registry.write_text(json.dumps({"format": 2, "active_router": "router", "adapters": {
        "alpha": {"kind": "task", "active_version": 2,
                  "versions": [version(1, 64, "retired"), version(2, 16, "active")]},
        "beta": {"kind": "task", "active_version": 1, "versions": [version(1, 8, "active")]},
        "router": {"kind": "router", "active_version": 1,
                   "versions": [{**version(1, 4, "active"), "labels": ["alpha", "beta"]},
                                version(2, 32, "candidate")]},  # shadow-routed: loaded too
    }}))
    monkeypatch.setattr(app_module, "resolve_base_model", lambda *args: BaseModelInfo("fake-base", tmp_path, ""))
    monkeypatch.setattr(adapters_module, "validate_adapter", lambda path, root, base, max_rank, names: AdapterInfo(
        Path(root) / path, 8, 8.0, ("q_proj",), base.name, "", {}))
    engine = SizedEngine()

    async def run() -> None:
        state = await build_state(Settings(registry=registry, adapter_root=tmp_path), engine)
        await close_state(state)

    asyncio.run(run())
    assert engine.calls[:2] == [("size_lora", [4, 8, 16, 32]), ("start", [])]
