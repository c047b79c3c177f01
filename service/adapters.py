"""Keeps the engine's resident adapters in step with the registry file.

A background task polls the registry; each new active version is validated (path, format, rank,
base model, target modules, checksum) and loaded, each retired or removed one is unloaded once
the requests using it have finished (reference counts), so registering, rolling back or removing
an adapter never fails a request in flight. An adapter that cannot be loaded is recorded with its
reason and answered with a 4xx; it never affects the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from service.adapter_validation import validate_adapter
from service.base_model import BaseModelInfo
from service.engine.base import AdapterRef, Engine
from service.errors import AdapterNotFoundError, AdapterValidationError, LoramuxError
from service.registry import AdapterVersion, Registry, RegistrySnapshot
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedAdapter:
    """A registry version together with the engine handle that serves it."""

    version: AdapterVersion
    ref: AdapterRef
    system_prompt: str | None = None


class AdapterManager:
    def __init__(self, settings: Settings, base: BaseModelInfo, engine: Engine, registry: Registry):
        self.settings = settings
        self.base = base
        self.engine = engine
        self.registry = registry
        self.snapshot = RegistrySnapshot({})
        self.loaded: dict[str, ResolvedAdapter] = {}  # uid (name@version) -> resident adapter
        self.failed: dict[str, str] = {}  # uid -> reason
        self._inflight: Counter[str] = Counter()
        self._retiring: set[str] = set()
        self._signature: tuple[int, int, int] | None = None
        self._sync_lock = asyncio.Lock()
        self._uid_locks: dict[str, asyncio.Lock] = {}
        self._task: asyncio.Task | None = None
        self.registry_error: str | None = None

    # ---- lookups used by the request path ---------------------------------------------------
    def active(self, name: str) -> ResolvedAdapter:
        """The active, loaded version of adapter `name`, or a 404/422 that says why not. Routers can
        be pinned too (they answer with an adapter name)."""
        version = self.snapshot.task(name, any_kind=True)
        if version.uid in self.failed:
            raise AdapterValidationError(
                f"adapter {name!r} (version {version.version}) failed to load: {self.failed[version.uid]}",
                param="adapter",
            )
        resolved = self.loaded.get(version.uid)
        if resolved is None:
            raise AdapterNotFoundError(f"adapter {name!r} is registered but not loaded yet", param="adapter")
        return resolved

    def resolve_router(self, name: str | None = None) -> ResolvedAdapter | None:
        version = self.snapshot.router(name or self.settings.router)
        if version is None:
            return None
        return self.loaded.get(version.uid)

    def candidate_router(self) -> ResolvedAdapter | None:
        """A router version registered as a candidate (not active), for shadow routing."""
        router = self.snapshot.router(self.settings.router)
        if router is None:
            return None
        entry = self.snapshot.entries[router.name]
        candidates = [v for v in entry.versions if v.status == "candidate"]
        if not candidates:
            return None
        return self.loaded.get(candidates[-1].uid)

    def routable(self, labels: tuple[str, ...]) -> list[ResolvedAdapter]:
        """The router's labels that are registered, active and loaded right now, in label order."""
        out = []
        for label in labels:
            entry = self.snapshot.entries.get(label)
            if entry is None or entry.kind != "task" or entry.active is None:
                continue
            resolved = self.loaded.get(entry.active.uid)
            if resolved is not None:
                out.append(resolved)
        return out

    @asynccontextmanager
    async def use(self, resolved: ResolvedAdapter | None) -> AsyncIterator[None]:
        """Hold an adapter for the length of a request so it is not unloaded under it."""
        if resolved is None:
            yield
            return
        uid = resolved.version.uid
        self._inflight[uid] += 1
        try:
            yield
        finally:
            self._inflight[uid] -= 1
            if self._inflight[uid] <= 0:
                del self._inflight[uid]
                if uid in self._retiring:
                    asyncio.get_running_loop().create_task(self._unload(uid))

    # ---- syncing with the registry -----------------------------------------------------------
    async def start(self) -> None:
        await self.sync(force=True)
        self._task = asyncio.create_task(self._watch(), name="registry-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.registry_poll_s)
            try:
                await self.sync()
                await self._check_files()
            except Exception:  # the watcher must outlive any one bad registry state
                log.exception("registry sync failed")

    def wanted_versions(self, snapshot: RegistrySnapshot) -> list[AdapterVersion]:
        """Active versions of every adapter, plus candidate router versions (for shadow routing)."""
        wanted = snapshot.active_versions()
        for entry in snapshot.entries.values():
            if entry.kind == "router":
                wanted.extend(v for v in entry.versions if v.status == "candidate")
        return wanted

    async def sync(self, force: bool = False) -> None:
        async with self._sync_lock:
            signature = self.registry.signature()
            if signature == self._signature and not force:
                return
            try:
                snapshot = await asyncio.to_thread(self.registry.load)
            except LoramuxError as exc:
                self.registry_error = exc.message
                log.error("registry unreadable, keeping the previous state: %s", exc.message)
                return
            self.registry_error = None
            self._signature = signature
            wanted = {v.uid: v for v in self.wanted_versions(snapshot)}
            for uid, version in wanted.items():
                if uid not in self.failed:  # a failed version still in use stays due for unloading
                    self._retiring.discard(uid)
                if uid not in self.loaded and uid not in self.failed:
                    await self._load(version)
            # publish the new view only once its adapters are resident: requests never see a gap
            self.snapshot = snapshot
            for uid in list(self.loaded):
                if uid not in wanted:
                    self._retiring.add(uid)
                    if self._inflight.get(uid, 0) == 0:
                        await self._unload(uid)
            for uid in list(self.failed):
                if uid not in wanted:
                    del self.failed[uid]

    async def _load(self, version: AdapterVersion) -> None:
        lock = self._uid_locks.setdefault(version.uid, asyncio.Lock())
        async with lock:
            if version.uid in self.loaded:
                return
            try:
                info = await asyncio.to_thread(
                    validate_adapter,
                    version.path,
                    self.settings.adapter_root,
                    self.base,
                    self.settings.max_lora_rank,
                    self.engine.module_names,
                )
                if version.sha256 and info.sha256 != version.sha256:
                    raise AdapterValidationError(
                        "weights changed on disk since registration (sha256 mismatch)", param="path"
                    )
                ref = AdapterRef(version.name, version.version, info.path, info.rank)
                await self.engine.add_adapter(ref)
            except LoramuxError as exc:
                log.warning("adapter %s refused: %s", version.uid, exc.message)
                self.failed[version.uid] = exc.message
                return
            self._retiring.discard(version.uid)
            prompt = info.metadata.get("system_prompt")
            self.loaded[version.uid] = ResolvedAdapter(version, ref, prompt if isinstance(prompt, str) else None)
            log.info("adapter %s loaded from %s", version.uid, info.path)

    async def _unload(self, uid: str) -> None:
        resolved = self.loaded.pop(uid, None)
        self._retiring.discard(uid)
        if resolved is not None:
            await self.engine.remove_adapter(resolved.ref)
            log.info("adapter %s unloaded", uid)

    async def _check_files(self) -> None:
        """An adapter deleted from disk while registered is marked failed instead of half-served."""
        for uid, resolved in list(self.loaded.items()):
            if uid in self.failed or (resolved.ref.path / "adapter_model.safetensors").is_file():
                continue
            self.failed[uid] = "adapter files were deleted from disk"
            # new requests get the 422 at once; those already generating finish with the weights in
            # memory (unloading under them would abort their rows), and `use` unloads after the last
            self._retiring.add(uid)
            if self._inflight.get(uid, 0) == 0:
                await self._unload(uid)
