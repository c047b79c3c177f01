"""Checks an adapter folder before a single weight is loaded.

Modelled on vLLM's `peft_helper.py` and LoRAX's loader: the path must stay inside the adapter
root (no `..`, no symlink escape), the weights must be safetensors (pickle is never loaded), the
PEFT config must be a LoRA whose rank fits and whose target modules exist in the base model, and
it must have been trained on this base model. Each refusal is an `AdapterValidationError` that
names the reason, so a bad adapter is a clear 4xx and never touches the engine.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from service.base_model import BaseModelInfo, model_class, sha256_file
from service.errors import AdapterValidationError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class AdapterInfo:
    """What validation learned about an adapter folder."""

    path: Path  # resolved folder holding adapter_config.json (the `final/` sub-folder when present)
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str
    sha256: str
    metadata: dict


def resolve_inside_root(path: str | Path, adapter_root: Path) -> Path:
    """Resolve `path` (relative to the root, or absolute) and refuse anything outside the root."""
    raw = Path(path)
    if ".." in raw.parts:
        raise AdapterValidationError(f"adapter path {str(path)!r} contains '..'", param="path")
    root = adapter_root.resolve()
    candidate = raw if raw.is_absolute() else root / raw
    try:
        resolved = candidate.resolve()
        # probe it here: a NUL byte or an over-long name fails in every later filesystem call
        resolved.exists()
    except (OSError, ValueError) as exc:
        raise AdapterValidationError(f"adapter path {str(path)!r} is not a usable path: {exc}", param="path") from exc
    if not resolved.is_relative_to(root):
        raise AdapterValidationError(
            f"adapter path {str(path)!r} resolves outside the adapter root {root}", param="path"
        )
    return resolved


def detect_final(folder: Path) -> Path:
    """The seed's convention: a training run folder holds the adapter in `final/`."""
    if not (folder / ADAPTER_CONFIG).is_file() and (folder / "final" / ADAPTER_CONFIG).is_file():
        return folder / "final"
    return folder


def validate_adapter(
    path: str | Path,
    adapter_root: Path,
    base: BaseModelInfo,
    max_rank: int,
    module_names: set[str] | None = None,
) -> AdapterInfo:
    folder = resolve_inside_root(path, adapter_root)
    if folder.is_file():
        if folder.suffix in PICKLE_SUFFIXES:
            raise AdapterValidationError(f"{folder.name}: pickle weights are refused; use safetensors", "path")
        folder = folder.parent
    if not folder.is_dir():
        raise AdapterValidationError(f"adapter folder {str(path)!r} does not exist", param="path")
    folder = detect_final(folder)
    config = _read_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise AdapterValidationError(
                f"{folder.name}: only pickle weights ({', '.join(pickles)}); safetensors required", "path"
            )
        raise AdapterValidationError(f"{folder.name}: {ADAPTER_WEIGHTS} is missing", param="path")
    for file in (folder / ADAPTER_CONFIG, weights):
        if not file.resolve().is_relative_to(adapter_root.resolve()):
            raise AdapterValidationError(f"{file.name} is a link leaving the adapter root", param="path")

    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterValidationError(f"peft_type is {peft_type or 'missing'}, only LORA is served", "path")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterValidationError(f"adapter rank {rank!r} is not a positive integer", param="path")
    if rank > max_rank:
        raise AdapterValidationError(f"adapter rank {rank} exceeds the maximum {max_rank}", param="path")
    declared = str(config.get("base_model_name_or_path") or "")
    if not _same_base(declared, base):
        raise AdapterValidationError(
            f"adapter was trained on {declared or 'an unknown base model'!r}, this service runs {base.name!r}",
            param="path",
        )
    targets = config.get("target_modules") or []
    if module_names is not None:
        _check_targets(targets, module_names)
    _check_weights(weights, rank)
    metadata = _read_metadata(folder)
    return AdapterInfo(
        path=folder,
        rank=rank,
        alpha=float(config.get("lora_alpha", rank)),
        target_modules=tuple(targets),
        base_model=base.name,
        sha256=sha256_file(weights),
        metadata=metadata,
    )


def module_names(model: object) -> set[str]:
    """Names a PEFT `target_modules` entry can match: every module's full name and its last part."""
    names: set[str] = set()
    for full, _ in model.named_modules():  # type: ignore[attr-defined]
        if full:
            names.add(full)
            names.add(full.rsplit(".", 1)[-1])
    return names


def base_module_names(base: BaseModelInfo) -> set[str]:
    """The base model's module names without loading its weights (built on the meta device)."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base.path)
    with torch.device("meta"):
        model = model_class(config).from_config(config)
    return module_names(model)


def _read_config(folder: Path) -> dict:
    file = folder / ADAPTER_CONFIG
    if not file.is_file():
        raise AdapterValidationError(f"{folder.name}: {ADAPTER_CONFIG} is missing", param="path")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterValidationError(f"{ADAPTER_CONFIG} is not valid JSON: {exc}", param="path") from exc
    if not isinstance(config, dict):
        raise AdapterValidationError(f"{ADAPTER_CONFIG} is not a JSON object", param="path")
    return config


def _read_metadata(folder: Path) -> dict:
    """Training metadata written by `loramux train` (kind, labels, dataset fingerprint), if any."""
    for candidate in (folder / "loramux.json", folder.parent / "loramux.json"):
        try:
            data = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            return data
    return {}


def _same_base(declared: str, base: BaseModelInfo) -> bool:
    if not declared:
        return False
    if declared == base.name:
        return True
    declared_path = Path(declared).expanduser()
    return declared_path.is_dir() and declared_path.resolve() == base.path.resolve()


def _check_targets(targets: object, names: set[str]) -> None:
    """PEFT's `target_modules` is a list of module names (or name suffixes), or one regex matched
    against full module names (vision-language adapters use it to keep LoRA off the vision tower).
    Either way it must hit the base model: an adapter whose targets match nothing loads as a no-op."""
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise AdapterValidationError(f"target_modules regex {targets!r} is invalid: {exc}", param="path") from None
        if not any(pattern.fullmatch(name) for name in names):
            raise AdapterValidationError(f"target_modules regex {targets!r} matches no module of the base model",
                                         param="path")
        return
    if not isinstance(targets, list) or not targets:
        raise AdapterValidationError("target_modules must be a non-empty list of module names or a regex",
                                     param="path")
    missing = [str(t) for t in targets if str(t) not in names]
    if missing:
        raise AdapterValidationError(f"target modules {missing} do not exist in the base model", param="path")


def _check_weights(weights: Path, rank: int) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            keys = list(handle.keys())
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise AdapterValidationError(f"{weights.name} is not a readable safetensors file: {exc}", "path") from exc
    lora_keys = [k for k in keys if "lora_A" in k or "lora_B" in k]
    if not lora_keys:
        raise AdapterValidationError(f"{weights.name} holds no LoRA weights", param="path")
    for key in lora_keys:
        shape = shapes[key]
        inner = shape[0] if "lora_A" in key else shape[-1]
        if inner != rank:
            raise AdapterValidationError(f"{key} has rank {inner}, adapter_config says {rank}", param="path")
