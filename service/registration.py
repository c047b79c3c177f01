"""Registering an adapter version: validate it exactly as the service will, then add it to the
registry atomically. Shared by `loramux register`, the admin API and the training package."""

from __future__ import annotations

from pathlib import Path

from service.adapter_validation import BaseModules, base_modules, validate_adapter
from service.base_model import BaseModelInfo
from service.errors import AdapterValidationError, BadRequestError
from service.names import check_name
from service.registry import AdapterVersion, Kind, Registry, router_temperature
from service.settings import Settings
from service.tool_calls import CALL_FORMATS, call_format


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
    tool_call_format: str | None = None,
) -> AdapterVersion:
    """`tool_call_format`: how the adapter writes a tool call (`service.tool_calls`); by default
    what its `loramux.json` says, else `json` for an expert with tools and `none` otherwise."""
    check_name(name, "name")
    if tool_call_format is not None and tool_call_format not in CALL_FORMATS:
        raise BadRequestError(f"tool_call_format must be one of {', '.join(CALL_FORMATS)}", param="tool_call_format")
    info = validate_adapter(
        path, settings.adapter_root, base, settings.max_lora_rank, modules or base_modules(base)
    )
    meta = info.metadata
    tools = tuple(str(t) for t in meta.get("tools") or () if isinstance(t, str)) if kind == "task" else ()
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
        tools=tools,
        tool_call_format=call_format(tool_call_format or meta.get("tool_call_format"),
                                     "json" if tools else "none") if kind == "task" else "none",
        tools_in_prompt=meta.get("tools_in_prompt", True) is not False,
    )
    return Registry(settings.registry).add_version(version, activate=activate)
