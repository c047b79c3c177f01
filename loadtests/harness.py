"""What the benchmarks and the tests both need, kept out of the test suite so a benchmark never
imports a test helper: real LoRA adapters with random weights in seconds (no training), and a real
`loramux serve` in a subprocess on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from service.base_model import BaseModelInfo

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = PROJECT_ROOT / ".cache"  # the converted base model, shared by tests and benchmarks
# torch on one thread: a server, its clients (tests, Locust, chaos) share two cores, and OpenMP
# threads spin-waiting for a busy core make each decode step up to ten times slower
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CRASH_MARKERS = ("Traceback", "unhandled error", "engine step failed", "Exception in ASGI application")


def make_lora_adapter(
    base: BaseModelInfo,
    out_dir: Path,
    seed: int,
    rank: int = 8,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    scale: float = 1.0,
) -> Path:
    """A real PEFT LoRA adapter with random (non-zero) A and B, so it visibly changes the output.

    No training: the serving tests need adapters that differ, not adapters that are good."""
    import torch
    from transformers import AutoModelForCausalLM

    save_random_lora(lambda: AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32), out_dir, seed,
                     rank, list(target_modules), scale)
    fix_base_model_name(out_dir, base.name)
    return out_dir


def save_random_lora(load_model: Callable[[], Any], out_dir: Path, seed: int, rank: int,
                     target_modules: list[str] | str, scale: float) -> None:
    """Seed, load the model, wrap it in a LoRA with random non-zero A and B scaled by `scale`, save it
    as safetensors: the one recipe behind the text and the vision-language test adapters."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules, init_lora_weights=False)
    peft_model = get_peft_model(load_model(), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(scale)
    peft_model.save_pretrained(out_dir, safe_serialization=True)


def fix_base_model_name(adapter_dir: Path, name: str) -> None:
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = name
    config_file.write_text(json.dumps(config, indent=2))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`loramux serve` in a subprocess on 127.0.0.1, with the given LORAMUX_ environment (or another
    command that serves, such as `("demo", "--quick", "--serve")`)."""

    def __init__(self, env: dict[str, str], args: tuple[str, ...] = (), startup_timeout: float = 240.0,
                 command: tuple[str, ...] = ("serve",), cpus: set[int] | None = None):
        """`cpus`: the cores the server may run on (all when None); a load generator on the same
        machine keeps to the others, so that it measures the server and not their contention."""
        self.cpus = cpus
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env}
        self.args = args
        self.command = command
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    def start(self, log_path: Path) -> ServerProcess:
        self.log_path = log_path
        log = log_path.open("w")
        cmd = [sys.executable, "-m", "loramux", *self.command, "--host", "127.0.0.1", "--port", str(self.port)]
        cpus = self.cpus
        # set in the child before it execs, so every thread it starts inherits the cores
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self.proc = subprocess.Popen([*cmd, *self.args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=PROJECT_ROOT, preexec_fn=pin)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready in {self.startup_timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-5000:] if self.log_path and self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_server(root: Path, registry: Path, log_path: Path, cpus: set[int] | None = None,
                 **settings: object) -> ServerProcess:
    """`loramux serve` on 127.0.0.1 over `registry`, torch on one thread, on `cpus` (all when
    None); each keyword is a setting (`max_queue=8`)."""
    env = {
        "LORAMUX_REGISTRY": str(registry),
        "LORAMUX_ADAPTER_ROOT": str(root),
        "LORAMUX_CACHE_DIR": str(CACHE_DIR),
        "LORAMUX_REGISTRY_POLL_S": "0.2",
        **SINGLE_THREAD,
        **{f"LORAMUX_{name.upper()}": str(value).lower() if isinstance(value, bool) else str(value)
           for name, value in settings.items()},
    }
    return ServerProcess(env, cpus=cpus).start(log_path)


def crashes(server: ServerProcess) -> list[str]:
    """Lines of the server log that show an unhandled error (each would have been a 5xx or a hang)."""
    text = server.log_path.read_text() if server.log_path else ""
    return [line for line in text.splitlines() if any(marker in line for marker in CRASH_MARKERS)]
