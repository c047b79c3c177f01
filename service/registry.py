"""The adapter registry (`config/loras.json`): which adapters exist, in which versions, and which
version of each is active.

The service only reads it (and re-reads it when the file changes); `loramux register` and the
admin API write it. Writes happen under a file lock and are atomic (temp file, fsync, rename), so a
reader or a `kill -9` never sees half a file and concurrent writers never lose an entry. Every
version stays in the file, which is what makes rollback possible.

The seed's format (`{"name": "/path/to/adapter"}`) is still read: each entry becomes a task
adapter, except one named `router`, which routes among the others.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock

from service.errors import AdapterNotFoundError, BadRequestError, ConflictError

FORMAT = 2
Kind = Literal["task", "router"]
Status = Literal["active", "candidate", "retired", "failed"]


@dataclass(frozen=True)
class AdapterVersion:
    """One registered version of an adapter."""

    name: str
    kind: Kind
    version: int
    path: str  # as registered: relative to the adapter root when inside it
    base_model: str = ""
    base_model_sha256: str = ""
    created: str = ""
    sha256: str = ""
    description: str = ""
    rank: int = 0
    labels: tuple[str, ...] = ()  # routers: the adapters this router can choose
    dataset: dict[str, Any] = field(default_factory=dict)  # {"path", "fingerprint"} of its training data
    metrics: dict[str, Any] = field(default_factory=dict)
    status: Status = "active"

    @property
    def uid(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels)
        del data["name"], data["kind"]
        return data


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    kind: Kind
    active_version: int | None
    versions: tuple[AdapterVersion, ...]

    @property
    def active(self) -> AdapterVersion | None:
        return next((v for v in self.versions if v.version == self.active_version), None)

    def get(self, version: int) -> AdapterVersion:
        for v in self.versions:
            if v.version == version:
                return v
        raise AdapterNotFoundError(f"adapter {self.name!r} has no version {version}", param="version")


@dataclass(frozen=True)
class RegistrySnapshot:
    """An immutable view of the registry at one moment; the service swaps snapshots atomically."""

    entries: dict[str, AdapterEntry]
    active_router: str | None = None

    def active_versions(self, kind: Kind | None = None) -> list[AdapterVersion]:
        out = []
        for entry in self.entries.values():
            if entry.active is not None and (kind is None or entry.kind == kind):
                out.append(entry.active)
        return sorted(out, key=lambda v: v.name)

    def task(self, name: str, any_kind: bool = False) -> AdapterVersion:
        """The active version of adapter `name` (a task adapter, or any kind with `any_kind`)."""
        entry = self.entries.get(name)
        if entry is None or (entry.kind != "task" and not any_kind) or entry.active is None:
            raise AdapterNotFoundError(f"adapter {name!r} is not registered", param="adapter")
        return entry.active

    def router(self, name: str | None = None) -> AdapterVersion | None:
        name = name or self.active_router
        if name is None:
            routers = self.active_versions("router")
            return routers[-1] if routers else None
        entry = self.entries.get(name)
        if entry is None or entry.kind != "router":
            return None
        return entry.active


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def parse_registry(data: Any) -> RegistrySnapshot:
    """Read both formats: ours (`{"format": 2, "adapters": {...}}`) and the seed's name -> path map."""
    if not isinstance(data, dict):
        raise BadRequestError("registry is not a JSON object")
    if "adapters" not in data:
        return _parse_seed(data)
    entries: dict[str, AdapterEntry] = {}
    for name, raw in (data.get("adapters") or {}).items():
        kind = raw.get("kind", "task")
        versions = tuple(
            AdapterVersion(
                name=name,
                kind=kind,
                version=int(v["version"]),
                path=str(v["path"]),
                base_model=v.get("base_model", ""),
                base_model_sha256=v.get("base_model_sha256", ""),
                created=v.get("created", ""),
                sha256=v.get("sha256", ""),
                description=v.get("description", ""),
                rank=int(v.get("rank", 0)),
                labels=tuple(v.get("labels") or ()),
                dataset=dict(v.get("dataset") or {}),
                metrics=dict(v.get("metrics") or {}),
                status=v.get("status", "active"),
            )
            for v in raw.get("versions", [])
        )
        entries[name] = AdapterEntry(name, kind, raw.get("active_version"), versions)
    return RegistrySnapshot(entries, data.get("active_router"))


def _parse_seed(data: dict) -> RegistrySnapshot:
    tasks = sorted(name for name, path in data.items() if isinstance(path, str) and name != "router")
    entries: dict[str, AdapterEntry] = {}
    for name, path in data.items():
        if not isinstance(path, str):
            raise BadRequestError(f"registry entry {name!r} is neither a path nor an adapter record")
        kind: Kind = "router" if name == "router" else "task"
        labels = tuple(tasks) if kind == "router" else ()
        version = AdapterVersion(name=name, kind=kind, version=1, path=path, labels=labels)
        entries[name] = AdapterEntry(name, kind, 1, (version,))
    return RegistrySnapshot(entries, "router" if "router" in entries else None)


def dump_registry(snapshot: RegistrySnapshot) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "active_router": snapshot.active_router,
        "adapters": {
            name: {
                "kind": entry.kind,
                "active_version": entry.active_version,
                "versions": [v.to_json() for v in entry.versions],
            }
            for name, entry in sorted(snapshot.entries.items())
        },
    }


class Registry:
    """The registry file: read cheaply, write atomically under a lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = FileLock(str(self.path) + ".lock", timeout=60)

    def signature(self) -> tuple[int, int, int] | None:
        """Changes whenever the file is replaced; the service polls it to pick up registrations."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self) -> RegistrySnapshot:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return RegistrySnapshot({})
        if not text.strip():
            return RegistrySnapshot({})
        try:
            return parse_registry(json.loads(text))
        except ValueError as exc:
            raise BadRequestError(f"registry {self.path} is not valid JSON: {exc}") from exc

    def _write(self, snapshot: RegistrySnapshot) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(dump_registry(snapshot), indent=2, sort_keys=False) + "\n"
        for stale in self.path.parent.glob(self.path.name + ".*.tmp"):
            # left by a writer killed mid-write: every writer holds the lock, so no live one owns it
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def add_version(self, version: AdapterVersion, activate: bool = True) -> AdapterVersion:
        """Append a new version (numbered after the last one) and make it active unless told not to."""
        with self._lock:
            snap = self.load()
            entry = snap.entries.get(version.name)
            if entry is not None and entry.kind != version.kind:
                raise ConflictError(
                    f"{version.name!r} is registered as a {entry.kind} adapter, not a {version.kind}", "name"
                )
            number = max((v.version for v in entry.versions), default=0) + 1 if entry else 1
            status: Status = "active" if activate or entry is None else "candidate"
            new = replace(version, version=number, created=version.created or _now(), status=status)
            versions = list(entry.versions) if entry else []
            if activate and entry is not None:
                versions = [_retire(v) if v.status == "active" else v for v in versions]
            versions.append(new)
            active = number if activate or entry is None or entry.active_version is None else entry.active_version
            entries = dict(snap.entries)
            entries[new.name] = AdapterEntry(new.name, new.kind, active, tuple(versions))
            router = snap.active_router
            if new.kind == "router" and (router is None or router not in entries) and activate:
                router = new.name
            self._write(RegistrySnapshot(entries, router))
            return new

    def activate(self, name: str, version: int | None = None) -> AdapterVersion:
        """Make `version` active (promotion); without a version, roll back to the previous one."""
        with self._lock:
            snap = self.load()
            entry = snap.entries.get(name)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered", param="name")
            if version is None:
                older = [v.version for v in entry.versions
                         if entry.active_version and v.version < entry.active_version and v.status == "retired"]
                if not older:
                    raise ConflictError(f"adapter {name!r} has no earlier version to roll back to", "version")
                version = max(older)
            target = entry.get(version)
            if target.status == "failed":  # e.g. refused by the onboarding gate: it must never serve
                raise ConflictError(f"{target.uid} is marked failed and cannot be activated; register it again",
                                    "version")
            versions = tuple(
                replace(v, status="active") if v.version == version else (_retire(v) if v.status == "active" else v)
                for v in entry.versions
            )
            entries = dict(snap.entries)
            entries[name] = AdapterEntry(name, entry.kind, version, versions)
            router = name if entry.kind == "router" else snap.active_router
            self._write(RegistrySnapshot(entries, router))
            return replace(target, status="active")

    def router_name(self, name: str | None = None) -> str:
        """The named router, or the active one; 404 when there is none."""
        router = self.load().router(name)
        if router is None:
            raise AdapterNotFoundError(f"no router {'named ' + repr(name) if name else 'is registered'}", "name")
        return router.name

    def promote_router(self, name: str | None = None, version: int | None = None) -> AdapterVersion:
        """Activate a router version, by default its newest candidate (`loramux router promote`, Modal)."""
        router = self.router_name(name)
        if version is None:
            candidates = [v.version for v in self.load().entries[router].versions if v.status == "candidate"]
            if not candidates:
                raise ConflictError(f"router {router!r} has no candidate version", "version")
            version = max(candidates)
        return self.activate(router, version)

    def rollback_router(self, name: str | None = None) -> AdapterVersion:
        """Re-activate the router version before the active one."""
        return self.activate(self.router_name(name), None)

    def set_status(self, name: str, version: int, status: Status) -> AdapterVersion:
        """Mark a non-active version (e.g. a candidate refused by the evaluation gate)."""
        with self._lock:
            snap = self.load()
            entry = snap.entries.get(name)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered", param="name")
            target = entry.get(version)
            if version == entry.active_version:
                raise ConflictError(f"{target.uid} is active; activate another version first", "version")
            versions = tuple(replace(v, status=status) if v.version == version else v for v in entry.versions)
            entries = dict(snap.entries)
            entries[name] = AdapterEntry(name, entry.kind, entry.active_version, versions)
            self._write(RegistrySnapshot(entries, snap.active_router))
            return replace(target, status=status)

    def withdraw(self, name: str, version: int) -> None:
        """Take back a version that was registered but would not load: it is marked failed and the
        version it replaced is active again (a first version is removed), in one locked write."""
        with self._lock:
            snap = self.load()
            entry = snap.entries.get(name)
            if entry is None or all(v.version != version for v in entry.versions):
                return
            entries = dict(snap.entries)
            router = snap.active_router
            if len(entry.versions) == 1:
                del entries[name]
                router = None if router == name else router
            else:
                active = entry.active_version
                if active == version:
                    older = [v.version for v in entry.versions if v.version < version and v.status == "retired"]
                    active = max(older) if older else None
                versions = tuple(
                    replace(v, status="failed") if v.version == version
                    else (replace(v, status="active") if v.version == active else v)
                    for v in entry.versions
                )
                entries[name] = AdapterEntry(name, entry.kind, active, versions)
            self._write(RegistrySnapshot(entries, router))

    def remove(self, name: str) -> None:
        with self._lock:
            snap = self.load()
            if name not in snap.entries:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered", param="name")
            entries = {k: v for k, v in snap.entries.items() if k != name}
            router = None if snap.active_router == name else snap.active_router
            self._write(RegistrySnapshot(entries, router))


def _retire(version: AdapterVersion) -> AdapterVersion:
    return replace(version, status="retired")
