"""Registering an adapter version: validate it exactly as the service will, then add it to the
registry atomically. Shared by `loramux register`, the admin API and the training package."""

from __future__ import annotations

from pathlib import Path

from service.adapter_validation import BaseModules, base_modules, validate_adapter
from service.base_model import BaseModelInfo
from service.errors import AdapterValidationError
from service.names import check_name
from service.registry import AdapterVersion, Kind, Registry, router_temperature
from service.settings import Settings


def stored_path(path: Path, adapter_root: Path) -> str:
    """Paths inside the adapter root are stored relative to it, so a registry moves with its root
    (a Modal volume mounted elsewhere, a clone in another folder)."""
    return str(path.relative_to(adapter_root.resolve()))


def register_adapter(
    settings: Settings,
    base: BaseModelInfo,
    kind: Kind,
    name: str,
    path: str | Path,
    description: str = "",
    labels: tuple[str, ...] | None = None,
    activate: bool = True,
    modules: BaseModules | None = None,
    dataset: dict | None = None,
) -> AdapterVersion:
    check_name(name, "name")
    info = validate_adapter(
        path, settings.adapter_root, base, settings.max_lora_rank, modules or base_modules(base)
    )
    meta = info.metadata
    if kind == "router":
        labels = tuple(labels or meta.get("labels") or ())
        if len(labels) < 2:
            raise AdapterValidationError("a router needs at least two labels (adapters it routes to)", "labels")
        for label in labels:
            check_name(label, "labels")
    version = AdapterVersion(
        name=name,
        kind=kind,
        version=0,
        path=stored_path(info.path, settings.adapter_root),
        base_model=base.name,
        base_model_sha256=base.sha256,
        sha256=info.sha256,
        description=description or str(meta.get("description", "")),
        rank=info.rank,
        labels=tuple(labels or ()),
        temperature=router_temperature((meta.get("calibration") or {}).get("temperature")) if kind == "router" else 1.0,
        dataset=dataset if dataset is not None else dict(meta.get("dataset") or {}),
        metrics=dict(meta.get("metrics") or {}),
    )
    return Registry(settings.registry).add_version(version, activate=activate)
