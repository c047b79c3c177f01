"""Adapter management over HTTP (admin key): list, register, activate (promote), roll back,
remove. Writes go to the same registry file as `loramux register`, then the service re-syncs at
once so the answer reflects the new state."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from service.api.deps import AdminAuth, State
from service.errors import AdapterValidationError
from service.registration import register_adapter
from service.registry import Registry
from service.state import ServiceState

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminAuth])


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    kind: Literal["task", "router"] = "task"
    path: str = Field(min_length=1, max_length=4096, description="adapter folder, relative to the adapter root")
    description: str = Field("", max_length=1000)
    labels: list[str] | None = Field(None, description="routers: the adapters it routes to")
    activate: bool = Field(True, description="false registers a candidate version")


class ActivateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(None, ge=1, description="omitted: roll back to the previous version")


def adapters_view(state: ServiceState) -> dict:
    manager = state.adapters
    out = []
    for name, entry in sorted(manager.snapshot.entries.items()):
        versions = []
        for v in entry.versions:
            data = v.to_json()
            data["loaded"] = v.uid in manager.loaded
            data["error"] = manager.failed.get(v.uid)
            versions.append(data)
        out.append({"name": name, "kind": entry.kind, "active_version": entry.active_version, "versions": versions})
    return {
        "adapters": out,
        "active_router": manager.snapshot.active_router,
        "registry_error": manager.registry_error,
        "shadow": state.shadow_stats,
    }


@router.get("/adapters", summary="Registered adapters, their versions and load state")
async def list_adapters(state: State) -> dict:
    return adapters_view(state)


@router.post("/adapters", status_code=201, summary="Validate and register a new adapter version")
async def register(body: RegisterRequest, state: State) -> dict:
    version = await asyncio.to_thread(
        register_adapter,
        state.settings,
        state.base,
        body.kind,
        body.name,
        body.path,
        body.description,
        tuple(body.labels) if body.labels else None,
        body.activate,
        state.engine.module_names,
    )
    await state.adapters.sync()
    error = state.adapters.failed.get(version.uid)
    if error is not None:
        # it passed validation but the engine refused it: withdraw it so the version it replaced
        # (or nothing) keeps serving, and say why
        await asyncio.to_thread(Registry(state.settings.registry).withdraw, version.name, version.version)
        await state.adapters.sync()
        raise AdapterValidationError(f"registration of {version.uid} withdrawn: {error}", param="path")
    data = version.to_json()
    data.update(name=version.name, kind=version.kind, loaded=version.uid in state.adapters.loaded,
                error=state.adapters.failed.get(version.uid))
    return data


@router.post("/adapters/{name}/activate", summary="Activate a version (promote), or roll back without one")
async def activate(name: str, body: ActivateRequest, state: State) -> dict:
    version = await asyncio.to_thread(Registry(state.settings.registry).activate, name, body.version)
    await state.adapters.sync()
    return {"name": name, "active_version": version.version}


@router.delete("/adapters/{name}", summary="Remove an adapter (in-flight requests finish first)")
async def remove(name: str, state: State) -> dict:
    await asyncio.to_thread(Registry(state.settings.registry).remove, name)
    await state.adapters.sync()
    return {"name": name, "removed": True}


@router.get("/routers", summary="Routers, candidates and shadow-routing agreement")
async def routers(state: State) -> dict:
    view = adapters_view(state)
    return {
        "routers": [a for a in view["adapters"] if a["kind"] == "router"],
        "active_router": view["active_router"],
        "shadow": state.shadow_stats,
    }
