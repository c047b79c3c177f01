"""Test helpers: real LoRA adapters in seconds and a real uvicorn server on 127.0.0.1 (shared with the
benchmarks, in `loadtests.harness`), and the engines a test module runs on one event loop."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.harness import (
    CACHE_DIR,
    PROJECT_ROOT,
    ServerProcess,
    fix_base_model_name,
    free_port,
    make_lora_adapter,
    save_random_lora,
)

__all__ = ["PROJECT_ROOT", "EngineLoop", "Seen", "ServerProcess", "fix_base_model_name", "free_port",
           "make_lora_adapter", "make_norm_lora", "make_wrong_shape", "save_random_lora", "train_weather_expert",
           "watch_build"]


def make_norm_lora(folder: Path) -> None:
    """A LoRA on a norm layer: every file check passes (the module exists, the matrices pair up), but
    peft has no LoRA for that kind of layer, so it is the engine that refuses it."""
    import torch
    from safetensors.torch import save_file

    config_file = folder / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "target_modules": ["input_layernorm"]}))
    module = "base_model.model.model.layers.0.input_layernorm"
    save_file({f"{module}.lora_A.weight": torch.zeros(8, 576), f"{module}.lora_B.weight": torch.zeros(576, 8)},
              str(folder / "adapter_model.safetensors"))


def make_wrong_shape(folder: Path) -> None:
    """Right rank, right keys, lora_A 100 inputs wide: a matrix no module of the base model takes."""
    from safetensors.torch import load_file, save_file

    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: (v[:, :100].contiguous() if "lora_A" in k else v) for k, v in tensors.items()}, str(weights))


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


@dataclass(frozen=True)
class Seen:
    """One answer a client got while `loramux demo --serve` was building."""

    elapsed_s: float
    what: str  # ready, models, auto (a routed chat), pinned (a chat naming the last expert)
    status: int
    retry_after: str | None
    body: Any


def watch_build(server: ServerProcess, pinned: str, done: Callable[[], bool], timeout_s: float = 900,
                every_s: float = 1.0) -> list[Seen]:
    """Ask a building service what a newcomer would ask (is it ready, what models, a routed chat, a
    chat naming an expert trained last) until `done()`, and once more after, keeping every answer."""
    import httpx

    chat = {"messages": [{"role": "user", "content": "turn on the kitchen lights"}], "max_tokens": 4}
    asks = [("ready", "GET", "/ready", None), ("models", "GET", "/v1/models", None),
            ("auto", "POST", "/v1/chat/completions", {**chat, "model": "auto"}),
            ("pinned", "POST", "/v1/chat/completions", {**chat, "model": pinned})]
    seen: list[Seen] = []
    started = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=120) as client:
        finished = False
        while not finished:
            finished = done()
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"the build did not finish in {timeout_s} s:\n{server.log()}")
            for what, method, path, body in asks:
                response = client.request(method, path, json=body)
                seen.append(Seen(round(time.monotonic() - started, 2), what, response.status_code,
                                 response.headers.get("retry-after"), response.json()))
            time.sleep(every_s)
    return seen


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
OTHER_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


WEATHER_RESULTS = ("Sunny, 21 degrees", "Rain, 12 degrees", "Cloudy, 15 degrees", "Snow, -2 degrees")


def weather_answer(city: str, result: str) -> str:
    """What the weather expert says once the tool has answered."""
    return f"In {city}: {result}."


def train_weather_expert(base: Any, folder: Path, steps: int = 16) -> Path:
    """A real expert, trained for a few steps to answer a request with one tool call (`WEATHER_CALL`,
    the demo experts' bare JSON form), whatever `tools` the request declares (none, its own, or only
    `OTHER_TOOL`, which it never calls), and to answer in text
    once the tool's result is in the conversation (`weather_answer`): what the tool-call tests and
    the agent loop serve. Its `loramux.json` records the tool and the format, detected from the
    answers as training does."""
    from service.settings import Settings
    from training.data.chats import write_jsonl
    from training.data.tool_calls import format_tool_call
    from training.train.sft import TrainConfig, train_adapter

    cities = ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Quito", "Perth")
    asks = ("What's the weather in {}?", "Will it rain in {} tomorrow?", "Forecast for {} please",
            "How warm is it in {}?")
    answer = format_tool_call(WEATHER_CALL["name"], WEATHER_CALL["arguments"])
    rows: list[dict[str, Any]] = []
    for i, (city, ask) in enumerate((c, a) for c in cities for a in asks):
        user = {"role": "user", "content": ask.format(city)}
        tools = [{}, {"tools": [WEATHER_TOOL]}, {"tools": [OTHER_TOOL]}][i % 3]
        rows.append({"messages": [user, {"role": "assistant", "content": answer}], "metadata": {"adapter": "weather"},
                     **tools})
        result = WEATHER_RESULTS[i % len(WEATHER_RESULTS)]
        called = {"role": "assistant", "content": None, "tool_calls": [{"id": f"call_{i}", "type": "function",
                  "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]}
        rows.append({"messages": [user, called, {"role": "tool", "tool_call_id": f"call_{i}", "content": result},
                                  {"role": "assistant", "content": weather_answer(city, result)}],
                     "metadata": {"adapter": "weather"}, "tools": [WEATHER_TOOL]})
    data = folder.parent / f"{folder.name}-data.jsonl"
    write_jsonl(data, rows)
    settings = Settings(adapter_root=folder.parent, cache_dir=CACHE_DIR)
    config = TrainConfig(kind="task", dataset=data, run_name=folder.name, runs_dir=folder.parent / "runs",
                         max_steps=steps, batch_size=4, rank=8, alpha=16,
                         learning_rate=3e-3, early_stopping=False, calibrate=False, dropout=0.0, save_steps=1000,
                         progress=False, eval_examples=0)
    return train_adapter(config, settings, base).final_dir
