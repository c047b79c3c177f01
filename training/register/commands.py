"""`loramux register` and `loramux adapters ...`: the registry the service reads, from the shell.

Registration is `service.registration.register_adapter`, the function the admin API calls: the
adapter is validated exactly as the service will validate it before loading (LoRA, rank, base
model name, safetensors, target modules, inside the adapter root) and appended as a new version
under the registry's file lock with an atomic replace. A router's label set comes from its
`loramux.json` unless given. The running service polls the file and picks the change up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.adapter_validation import BaseModules, base_modules
from service.base_model import BaseModelInfo, resolve_base_model
from service.errors import AdapterValidationError
from service.registration import register_adapter as _service_register
from service.registry import AdapterEntry, AdapterVersion, Kind, Registry
from service.settings import Settings
from training.train.metadata import read_metadata


@dataclass
class RegistryContext:
    settings: Settings
    base: BaseModelInfo | None = None
    known_modules: BaseModules | None = None

    def resolved_base(self) -> BaseModelInfo:
        if self.base is None:
            s = self.settings
            self.base = resolve_base_model(s.base_model, s.cache_dir, s.base_model_name)
        return self.base

    def modules(self) -> BaseModules:
        if self.known_modules is None:
            self.known_modules = base_modules(self.resolved_base())
        return self.known_modules

    @property
    def registry(self) -> Registry:
        return Registry(self.settings.registry)


def register_adapter(
    kind: Kind,
    name: str,
    path: Path | str,
    description: str = "",
    labels: list[str] | None = None,
    activate: bool = True,
    context: RegistryContext | None = None,
    tool_call_format: str | None = None,
) -> AdapterVersion:
    """Validate and add a new version of adapter `name`; returns the stored version.
    `tool_call_format`: how a task adapter writes a tool call, when its `loramux.json` does not say."""
    context = context or RegistryContext(Settings())
    folder = Path(path).expanduser()
    if not folder.is_absolute():
        folder = Path.cwd() / folder
    meta = read_metadata(folder)
    declared = meta.get("kind")
    if declared and declared != kind:
        raise AdapterValidationError(f"{folder} was trained as a {declared} adapter, not a {kind}", param="kind")
    if kind == "router" and labels:
        unknown = set(labels) - set(meta.get("labels") or labels)
        if unknown:
            raise AdapterValidationError(f"the router was not trained on {sorted(unknown)}", param="labels")
    return _service_register(
        context.settings,
        context.resolved_base(),
        kind,
        name,
        folder,
        description=description,
        labels=tuple(labels) if labels else None,
        activate=activate,
        modules=context.modules(),
        tool_call_format=tool_call_format,
    )


def version_row(entry: AdapterEntry, version: AdapterVersion) -> dict[str, Any]:
    return {
        "name": entry.name,
        "kind": entry.kind,
        "version": version.version,
        "active": version.version == entry.active_version,
        "status": version.status,
        "path": version.path,
        "rank": version.rank,
        "labels": list(version.labels),
        "created": version.created,
        "sha256": version.sha256[:12],
        "description": version.description,
    }


def list_adapters(settings: Settings | None = None) -> list[dict[str, Any]]:
    """The active version of every adapter (the router marked), sorted by kind then name."""
    snapshot = Registry((settings or Settings()).registry).load()
    rows = []
    for entry in sorted(snapshot.entries.values(), key=lambda e: (e.kind != "router", e.name)):
        version = entry.active or (entry.versions[-1] if entry.versions else None)
        if version is None:
            continue
        row = version_row(entry, version)
        row["versions"] = len(entry.versions)
        row["active_router"] = entry.name == snapshot.active_router
        rows.append(row)
    return rows


def show_adapter(name: str, settings: Settings | None = None) -> dict[str, Any]:
    from service.errors import AdapterNotFoundError

    snapshot = Registry((settings or Settings()).registry).load()
    entry = snapshot.entries.get(name)
    if entry is None:
        raise AdapterNotFoundError(f"adapter {name!r} is not registered", param="name")
    return {
        "name": entry.name,
        "kind": entry.kind,
        "active_version": entry.active_version,
        "active_router": snapshot.active_router == name,
        "versions": [{**version_row(entry, v), "metrics": v.metrics, "dataset": v.dataset} for v in entry.versions],
    }


def rollback_adapter(name: str, version: int | None = None, settings: Settings | None = None) -> AdapterVersion:
    """Activate `version`, or the newest version older than the active one."""
    return Registry((settings or Settings()).registry).activate(name, version)


def remove_adapter(name: str, settings: Settings | None = None) -> None:
    Registry((settings or Settings()).registry).remove(name)
