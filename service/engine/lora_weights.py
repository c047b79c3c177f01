"""An adapter folder read into what the embedded engine computes with: per linear layer of the base
model, the LoRA's A and B matrices and its scaling.

Read on a worker thread, not on the engine thread: peft's `load_adapter` injected 210 new layers
into the live model (0.4-0.8 s on SmolLM2, growing with the adapters loaded) on the one thread
that runs every generation's steps, so each registration paused every stream. What remains on the
engine thread is putting the tensors in place (`GroupedLoRA.add`), microseconds.

The folder was validated at registration (`adapter_validation`: plain LoRA, safetensors, shapes);
this is the engine's own check on the tensors it will run: every matrix on a linear layer of the
base model, A `[r, in_features]` and B `[out_features, r]` in pairs, else nothing is installed and
the caller gets an `AdapterRefusedError`. The numbers are peft's: scaling `lora_alpha / r`
(`/ sqrt(r)` with rsLoRA), weights kept in float32 as peft keeps them for every base dtype
(`autocast_adapter_dtype`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from service.adapter_validation import DEFAULT_LORA_ALPHA, LORA_KEY
from service.engine.errors import AdapterRefusedError

WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's prefix before the base model's own module names

# per module: (A [r, in], B [out, r], scaling)
LayerWeights = tuple[torch.Tensor, torch.Tensor, float]


def scaling_of(config: Mapping[str, object]) -> float:
    """peft's LoRA scaling for a plain LoRA config."""
    rank = config["r"]
    alpha = config.get("lora_alpha", DEFAULT_LORA_ALPHA)
    if not isinstance(rank, int) or not isinstance(alpha, int | float):
        raise AdapterRefusedError("adapter_config.json has no usable r and lora_alpha")
    return float(alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank)


def read_lora(folder: Path, shapes: Mapping[str, tuple[int, int]]) -> dict[str, LayerWeights]:
    """The adapter in `folder` as {module name: (A, B, scaling)}; `shapes` is the base model's
    linear layers by name, as (in_features, out_features)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    scaling = scaling_of(config)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(folder / WEIGHTS_FILE)).items():
        match = LORA_KEY.fullmatch(key)
        if match is None:
            raise AdapterRefusedError(f"{key} is not a LoRA matrix")
        halves.setdefault(match["module"].removeprefix(PREFIX), {})[match["which"]] = tensor
    if not halves:
        raise AdapterRefusedError("the adapter holds no LoRA weights")
    layers: dict[str, LayerWeights] = {}
    for module, pair in halves.items():
        if module not in shapes:
            raise AdapterRefusedError(f"{module} is not a linear layer of the base model")
        if set(pair) != {"A", "B"}:
            raise AdapterRefusedError(f"{module} has lora_A or lora_B but not both")
        a, b = pair["A"], pair["B"]
        width, height = shapes[module]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != width or b.shape[0] != height or a.shape[0] != b.shape[1]:
            raise AdapterRefusedError(
                f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit its {width} inputs and "
                f"{height} outputs")
        layers[module] = (a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous(), scaling)
    return layers
