"""Engines: what turns (prompt, adapter, sampling params) into tokens.

`base.Engine` is the interface the HTTP layer talks to; `embedded.EmbeddedEngine` (transformers
with its own grouped LoRA, the default, runs anywhere) and `vllm_engine.VLLMEngine` (production, multi-LoRA on vLLM)
implement it. `create_engine` picks one from the settings.
"""

from __future__ import annotations

from service.base_model import BaseModelInfo
from service.engine.base import Engine
from service.settings import Settings


def create_engine(settings: Settings, base: BaseModelInfo) -> Engine:
    if settings.engine == "vllm":
        from service.engine.vllm_engine import VLLMEngine

        return VLLMEngine(settings, base)
    from service.engine.embedded import EmbeddedEngine

    return EmbeddedEngine(settings, base)
