"""Test helpers: real LoRA adapters in seconds and a real uvicorn server on 127.0.0.1 (shared with the
benchmarks, in `loadtests.harness`), and the engines a test module runs on one event loop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loadtests.harness import (
    PROJECT_ROOT,
    ServerProcess,
    fix_base_model_name,
    free_port,
    make_lora_adapter,
    save_random_lora,
)

__all__ = ["PROJECT_ROOT", "EngineLoop", "ServerProcess", "fix_base_model_name", "free_port", "make_lora_adapter",
           "save_random_lora"]


class EngineLoop:
    """Engines started on one event loop by a test module, shut down once: a module releases them
    before it starts a server, so two engines never share the 2 cores."""

    def __init__(self, loop: Any, engines: Sequence[Any], refs: dict[str, Any]):
        self.loop, self.engines, self.refs = loop, list(engines), refs
        self.released = False

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def release(self) -> None:
        if not self.released:
            self.released = True
            for engine in self.engines:
                self.run(engine.shutdown())
