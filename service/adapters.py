"""Keeps the engine's resident adapters in step with the registry file.

A background task polls the registry; each new active version is validated (name, path, format,
rank, base model, target modules, checksum) and loaded, each retired or removed one is unloaded once
the requests using it have finished (reference counts), so registering, rolling back or removing
an adapter never fails a request in flight.

Swaps go load new, switch, unload old: the version that was serving a name keeps serving it until
its successor is resident, and if the successor fails to load it keeps serving (the failure is
recorded and shown in /admin/adapters). A request holds its adapter (`hold`) from the moment it was
chosen, pinned or routed, until its generation ends, so a rollback in between never unloads it.

One bad adapter never breaks the others: any exception while validating or loading a version (not
only the service's own errors) marks that version failed with its reason, logged and answered with
a 4xx, and start-up and the watcher carry on with the rest. A failed version is retried on the
next change of the registry file once its own record or its files have changed since it failed
(the operator repaired it): a failure costs one attempt, not one per registry write, so a burst of
registrations beside a broken entry never loads it again and again between everyone's steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from service.adapter_validation import validate_adapter
from service.base_model import BaseModelInfo
from service.engine.base import AdapterRef, Engine
from service.engine.errors import EngineError
from service.errors import AdapterNotFoundError, AdapterValidationError, LoramuxError
from service.names import name_problem
from service.registry import AdapterVersion, Registry, RegistrySnapshot
from service.settings import Settings

log = logging.getLogger(__name__)

AUTO_MODEL = "auto"  # the model name that asks the router to choose


@dataclass(frozen=True)
class ResolvedAdapter:
    """A registry version together with the engine handle that serves it."""

    version: AdapterVersion
    ref: AdapterRef
    system_prompt: str | None = None


@dataclass(frozen=True)
class ServedModel:
    """One entry of /v1/models: a name a client may send as `model`."""

    id: str
    root: str  # the served name (the base model's, or the adapter's), never a folder on this machine
    parent: str | None = None
    max_model_len: int | None = None
    tools: tuple[str, ...] = ()  # an expert's tools, as trained
    tool_call_format: str | None = None  # how it writes a call; None for the base model and `auto`


class AdapterHold:
    """One request's claim on a resident adapter version: while held it is not unloaded. Released
    exactly once, however often `release` is called; usable as a `with` block."""

    def __init__(self, manager: AdapterManager, uid: str):
        self._manager: AdapterManager | None = manager
        self.uid = uid

    def release(self) -> None:
        manager, self._manager = self._manager, None
        if manager is not None:
            manager._release(self.uid)

    def __enter__(self) -> AdapterHold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class AdapterManager:
    def __init__(self, settings: Settings, base: BaseModelInfo, engine: Engine, registry: Registry):
        self.settings = settings
        self.base = base
        self.engine = engine
        self.registry = registry
        self.snapshot = RegistrySnapshot({})
        self.loaded: dict[str, ResolvedAdapter] = {}  # uid (name@version) -> resident adapter
        self.failed: dict[str, str] = {}  # uid -> reason
        self._failed_as: dict[str, str] = {}  # uid -> its record and files when it failed (`_attempt_state`)
        self.serving: dict[str, str] = {}  # name -> uid answering for it (the active version, or its predecessor)
        self._inflight: Counter[str] = Counter()
        self._retiring: set[str] = set()
        self._signature: tuple[int, int, int] | None = None
        self._sync_lock = asyncio.Lock()
        self._uid_locks: dict[str, asyncio.Lock] = {}
        self._task: asyncio.Task | None = None
        self._unloads: set[asyncio.Task] = set()
        self.registry_error: str | None = None

    # ---- lookups used by the request path ---------------------------------------------------
    def _served(self, name: str, allow_failed: bool = False) -> ResolvedAdapter | None:
        uid = self.serving.get(name)
        if uid is None or (uid in self.failed and not allow_failed):
            return None
        return self.loaded.get(uid)

    def served(self) -> list[ResolvedAdapter]:
        """The version answering for each registered name right now (what /v1/models lists)."""
        return [r for name in self.serving if (r := self._served(name)) is not None]

    def models(self, base_name: str) -> list[ServedModel]:
        """What /v1/models lists: the base model, `auto` while a router serves, and the version
        answering for each registered name (candidates and retiring versions are not served by name).
        Names only: vLLM puts a LoRA's path in `root`, a client has no use for the server's paths."""
        models = [ServedModel(base_name, base_name, None, self.settings.max_model_len)]
        router = self.resolve_router()
        if router is not None:
            models.append(ServedModel(AUTO_MODEL, router.version.name, base_name))
        for resolved in sorted(self.served(), key=lambda r: (r.version.kind, r.version.name)):
            v = resolved.version
            models.append(ServedModel(v.name, v.name, base_name, tools=v.tools,
                                      tool_call_format=v.tool_call_format if v.kind == "task" else None))
        return models

    def active(self, name: str) -> ResolvedAdapter:
        """The loaded version serving adapter `name`, or a 404/422 that says why not. Routers can
        be pinned too (they answer with an adapter name)."""
        version = self.snapshot.task(name, any_kind=True)
        resolved = self._served(name)
        if resolved is not None:
            return resolved
        reason = self.failed.get(version.uid) or self.failed.get(self.serving.get(name, ""))
        if reason is not None:
            raise AdapterValidationError(
                f"adapter {name!r} (version {version.version}) failed to load: {reason}", param="adapter"
            )
        raise AdapterNotFoundError(f"adapter {name!r} is registered but not loaded yet", param="adapter")

    def resolve_router(self, name: str | None = None) -> ResolvedAdapter | None:
        version = self.snapshot.router(name or self.settings.router)
        if version is None:
            return None
        return self._served(version.name, allow_failed=True)

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
        """The router's labels that are registered task adapters served right now, in label order."""
        out = []
        for label in labels:
            entry = self.snapshot.entries.get(label)
            if entry is None or entry.kind != "task":
                continue
            resolved = self._served(label)
            if resolved is not None:
                out.append(resolved)
        return out

    def hold(self, resolved: ResolvedAdapter) -> AdapterHold:
        """Claim a resident version for a request (synchronously: take it in the same step as the
        lookup that found it, with no await between, and nothing can unload it in the gap)."""
        self._inflight[resolved.version.uid] += 1
        return AdapterHold(self, resolved.version.uid)

    def _release(self, uid: str) -> None:
        self._inflight[uid] -= 1
        if self._inflight[uid] <= 0:
            del self._inflight[uid]
            if uid in self._retiring:
                task = asyncio.get_running_loop().create_task(self._unload(uid))
                self._unloads.add(task)
                task.add_done_callback(self._unloads.discard)

    @asynccontextmanager
    async def use(self, resolved: ResolvedAdapter | None) -> AsyncIterator[None]:
        """Hold an adapter for the length of a block so it is not unloaded under it."""
        if resolved is None:
            yield
            return
        with self.hold(resolved):
            yield

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

    def registered_ranks(self) -> list[int]:
        """The ranks of the versions the registry would load now (none if it cannot be read: the
        first sync reports that), for engines that size their LoRA slots before they start."""
        try:
            snapshot = self.registry.load()
        except Exception:  # the first sync logs and reports what is wrong
            return []
        return [v.rank for v in self.wanted_versions(snapshot)]

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
            except Exception as exc:  # any unreadable registry: keep serving what is loaded
                self.registry_error = exc.message if isinstance(exc, LoramuxError) else f"{type(exc).__name__}: {exc}"
                log.error("registry unreadable, keeping the previous state: %s", self.registry_error)
                self._signature = signature  # read again when the file changes
                return
            self.registry_error = None
            wanted = {v.uid: v for v in self.wanted_versions(snapshot)}
            for uid in list(self.failed):
                if (uid in wanted and uid not in self.loaded
                        and self._failed_as.get(uid) != self._attempt_state(wanted[uid])):
                    del self.failed[uid]  # repaired since it failed: try it again
            for uid, version in wanted.items():
                if uid not in self.failed:  # a failed version still in use stays due for unloading
                    self._retiring.discard(uid)
                if uid not in self.loaded and uid not in self.failed:
                    await self._load(version)
            # switch only once the new versions are resident: requests never see a gap, and a name
            # whose new version failed keeps its previous one serving
            serving = {}
            for name, entry in snapshot.entries.items():
                active = entry.active
                if active is None:
                    continue
                previous = self.serving.get(name)
                if active.uid in self.loaded and active.uid not in self.failed:
                    serving[name] = active.uid
                elif (previous is not None and previous in self.loaded and previous not in self.failed
                      and any(v.uid == previous for v in entry.versions)):
                    serving[name] = previous
                    log.warning("%s is active but did not load; %s keeps serving", active.uid, previous)
            self.snapshot, self.serving = snapshot, serving
            keep = set(wanted) | set(serving.values())
            for uid in list(self.loaded):
                if uid not in keep:
                    self._retiring.add(uid)
                    if self._inflight.get(uid, 0) == 0:
                        await self._unload(uid)
            for uid in list(self.failed):
                if uid not in wanted:
                    del self.failed[uid]
                    self._failed_as.pop(uid, None)
            self._signature = signature  # seen only once it has been acted on

    async def _load(self, version: AdapterVersion) -> None:
        """Validate and load one version; any failure marks it failed with its reason, never raises."""
        lock = self._uid_locks.setdefault(version.uid, asyncio.Lock())
        async with lock:
            if version.uid in self.loaded:
                return
            try:
                problem = name_problem(version.name)
                if problem is not None:
                    raise AdapterValidationError(problem, param="name")
                info = await asyncio.to_thread(
                    validate_adapter,
                    version.path,
                    self.settings.adapter_root,
                    self.base,
                    self.settings.max_lora_rank,
                    self.engine.modules,
                )
                if version.sha256 and info.sha256 != version.sha256:
                    raise AdapterValidationError(
                        "weights changed on disk since registration (sha256 mismatch)", param="path"
                    )
                ref = AdapterRef(version.name, version.version, info.path, info.rank)
                await self.engine.add_adapter(ref)
            except (LoramuxError, EngineError) as exc:  # refused by validation, or by the engine
                log.warning("adapter %s refused: %s", version.uid, exc.message)
                self._fail(version, exc.message)
                return
            except Exception as exc:  # one bad version must never stop start-up or the watcher
                log.exception("adapter %s failed to load", version.uid)
                self._fail(version, f"could not be loaded ({type(exc).__name__}); see the server log")
                return
            self._retiring.discard(version.uid)
            prompt = info.metadata.get("system_prompt")
            self.loaded[version.uid] = ResolvedAdapter(version, ref, prompt if isinstance(prompt, str) else None)
            log.info("adapter %s loaded from %s", version.uid, info.path)

    def _fail(self, version: AdapterVersion, reason: str) -> None:
        self.failed[version.uid] = reason
        self._failed_as[version.uid] = self._attempt_state(version)

    def _attempt_state(self, version: AdapterVersion) -> str:
        """What a retry would see differently: the version's registry record and the size and
        modification time of its config and weights (in the folder or its `final/`)."""
        folder = self.settings.adapter_root / version.path
        files = []
        for file in (folder, folder / "final"):
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                try:
                    stat = (file / name).stat()
                    files.append((str(file / name), stat.st_size, stat.st_mtime_ns))
                except OSError:
                    continue
        return json.dumps([version.to_json(), files], sort_keys=True, default=str)

    async def _unload(self, uid: str) -> None:
        resolved = self.loaded.pop(uid, None)
        self._retiring.discard(uid)
        if resolved is not None:
            try:
                await self.engine.remove_adapter(resolved.ref)
            except Exception:  # an unload that fails must not stop the sync that asked for it
                log.exception("adapter %s could not be unloaded", uid)
                return
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
