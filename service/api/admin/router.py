"""Adapter management over HTTP (admin key): list, register, activate (promote), roll back,
remove (retire) and restore. Writes go to the same registry file as `loramux register`, then the
service re-syncs at once so the answer reflects the new state.

Closed by default: the routes that change the registry need `LORAMUX_ADMIN_API_KEYS` (and then an
admin key on each call). A server without any keys serves the read-only routes only, unless
`LORAMUX_ADMIN_OPEN=true` opens it for local development (loopback only, see `Settings`). The
refusal happens before the body is read, so no request, well-formed or not, reaches the registry.
And no call erases anything: removing an adapter retires it with its history, which activating a
version (or `restore`) brings back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from service.api.deps import AdminAuth, State
from service.errors import AdapterValidationError, PermissionDeniedError, public_message
from service.registration import register_adapter
from service.registry import AdapterEntry, AdapterVersion, Registry
from service.settings import Settings
from service.state import ServiceState

READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def admin_writable(settings: Settings) -> bool:
    """Admin keys configured (the auth checks then require one), or keyless with LORAMUX_ADMIN_OPEN."""
    return bool(settings.admin_api_keys) or (settings.admin_open and not settings.auth_enabled)


def refuse_closed_admin(request: Request) -> None:
    if request.method in READ_ONLY_METHODS or admin_writable(request.app.state.service.settings):
        return
    raise PermissionDeniedError(
        "the admin API is read-only on this server: set LORAMUX_ADMIN_API_KEYS to manage adapters "
        "(or LORAMUX_ADMIN_OPEN=true on a loopback development server)"
    )


class ClosedByDefaultRoute(APIRoute):
    """Refuses a registry-changing call on a closed admin API before FastAPI reads or validates its body."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            refuse_closed_admin(request)
            return await handler(request)

        return guarded


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminAuth], route_class=ClosedByDefaultRoute)


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    kind: Literal["task", "router"] = "task"
    path: str = Field(min_length=1, max_length=4096, description="adapter folder, relative to the adapter root")
    description: str = Field("", max_length=1000)
    labels: list[str] | None = Field(None, description="routers: the adapters it routes to")
    activate: bool = Field(True, description="false registers a candidate version (not serving until activated)")
    tool_call_format: Literal["json", "hermes", "none"] | None = Field(
        None, description="task adapters: how it writes a tool call; default: its loramux.json, else json when it "
                          "has tools")


class ActivateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(None, ge=1, description="omitted: roll back to the previous version (a removed "
                                "adapter: restore the version that was active)")


class RestoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(None, ge=1, description="omitted: the version that was active when it was removed")


def adapters_view(state: ServiceState) -> dict:
    manager = state.adapters
    out = []
    for name, entry in sorted(manager.snapshot.entries.items()):
        versions = []
        for v in entry.versions:
            data = v.to_json()
            data["loaded"] = v.uid in manager.loaded
            error = manager.failed.get(v.uid)
            data["error"] = public_message(error) if error else None
            versions.append(data)
        out.append({"name": name, "kind": entry.kind, "active_version": entry.active_version,
                    "removed": entry.removed, "removed_at": entry.removed_at or None,
                    "removed_version": entry.removed_version, "versions": versions})
    return {
        "adapters": out,
        "active_router": manager.snapshot.active_router,
        "revision": manager.snapshot.revision,
        "registry_error": public_message(manager.registry_error) if manager.registry_error else None,
        "shadow": state.shadow_stats,
    }


@router.get("/adapters", summary="Registered adapters, their versions and load state")
async def list_adapters(state: State) -> dict:
    return adapters_view(state)


async def register_version(state: ServiceState, body: RegisterRequest) -> AdapterVersion:
    """Validated, then added as a candidate (a new number, never one this name had before); only
    then, if asked, activated. The version it replaces serves until the service has loaded it.
    The one registration path of the HTTP API (`POST /admin/adapters`, vLLM's `load_lora_adapter`)."""
    registry = Registry(state.settings.registry)
    version = await asyncio.to_thread(
        register_adapter,
        state.settings,
        state.base,
        body.kind,
        body.name,
        body.path,
        body.description,
        tuple(body.labels) if body.labels else None,
        False,
        state.engine.modules,
        None,
        body.tool_call_format,
    )
    await state.adapters.sync()
    if version.uid not in state.adapters.failed and body.activate:
        version = await asyncio.to_thread(registry.activate, version.name, version.version)
        await state.adapters.sync()
    error = state.adapters.failed.get(version.uid)
    if error is not None:
        # it passed validation but the engine refused it: withdraw it (marked failed, kept in the
        # history) so the version it replaced, or nothing, keeps serving, and say why
        await asyncio.to_thread(registry.withdraw, version.name, version.version)
        await state.adapters.sync()
        raise AdapterValidationError(f"registration of {version.uid} withdrawn: {error}", param="path")
    return version


@router.post("/adapters", status_code=201, summary="Validate and register a new adapter version")
async def register(body: RegisterRequest, state: State) -> dict:
    """See `register_version`."""
    version = await register_version(state, body)
    data = version.to_json()
    data.update(name=version.name, kind=version.kind, loaded=version.uid in state.adapters.loaded, error=None)
    return data


@router.post("/adapters/{name}/activate",
             summary="Activate a version (promote, or restore a removed adapter), or roll back without one")
async def activate(name: str, body: ActivateRequest, state: State) -> dict:
    version = await asyncio.to_thread(Registry(state.settings.registry).activate, name, body.version)
    await state.adapters.sync()
    return {"name": name, "active_version": version.version}


@router.post("/adapters/{name}/restore", summary="Bring a removed adapter back (by default its last active version)")
async def restore(name: str, body: RestoreRequest, state: State) -> dict:
    version = await asyncio.to_thread(Registry(state.settings.registry).restore, name, body.version)
    await state.adapters.sync()
    return {"name": name, "active_version": version.version}


@router.delete("/adapters/{name}",
               summary="Remove (retire) an adapter, keeping its versions: restorable; in-flight requests finish first")
async def remove(name: str, state: State) -> dict:
    entry = await retire(state, name)
    return {"name": name, "removed": True, "removed_version": entry.removed_version,
            "versions_kept": len(entry.versions)}


async def retire(state: ServiceState, name: str) -> AdapterEntry:
    """Retire adapter `name`, its history kept (restorable), and re-sync at once. The one removal
    path of the HTTP API (`DELETE /admin/adapters/NAME`, vLLM's `unload_lora_adapter`)."""
    entry = await asyncio.to_thread(Registry(state.settings.registry).remove, name)
    await state.adapters.sync()
    return entry


@router.get("/routers", summary="Routers, candidates and shadow-routing agreement")
async def routers(state: State) -> dict:
    view = adapters_view(state)
    return {
        "routers": [a for a in view["adapters"] if a["kind"] == "router"],
        "active_router": view["active_router"],
        "shadow": state.shadow_stats,
    }
