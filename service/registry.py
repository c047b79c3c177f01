"""The adapter registry (`config/loras.json`): which adapters exist, in which versions, and which
version of each is active.

The service only reads it (and re-reads it when the file changes); `loramux register` and the
admin API write it. Writes happen under a file lock and are atomic (temp file, fsync, rename), so a
reader or a `kill -9` never sees half a file and concurrent writers never lose an entry.

Nothing is ever erased: every version stays in the file (which is what makes rollback possible), and
removing an adapter retires it (`removed_at`, `removed_version`) instead of deleting it, so it can be
restored by activating a version again. A version number is never handed out twice for one name: each
entry keeps `next_version` (the next number to issue, kept across removal), so a re-registered name can
never collide with an old `name@N` still loaded in a running service (old weights, or on vLLM an old
adapter's cached blocks). The file also carries a registry-wide `revision`, incremented by every write.
Files written before these fields existed still load: both are computed from the versions they hold.

The file lock serializes the writers that share one file system. Where every writer has its own
copy of the file that a commit publishes (Modal: each container mounts its own view of a Volume, and
the last commit wins), a process installs a write guard (`use_write_guard`): every write then runs
inside it, after the local lock, so the guard can take a lock shared by all copies, fetch the newest
file, and publish the write before anyone else may start one (`deploy/volume_writes.py`'s
`VolumeWriteGuard`). The read-modify-write of each method is then one transaction across copies.
Writes keep the file's permissions (a new file gets the umask's).

The seed's format (`{"name": "/path/to/adapter"}`) is still read: each entry becomes a task
adapter, except one named `router`, which routes among the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock

from service.errors import AdapterNotFoundError, BadRequestError, ConflictError
from service.tool_calls import CallFormat, call_format

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
    temperature: float = 1.0  # routers: calibration temperature fitted on the validation split
    dataset: dict[str, Any] = field(default_factory=dict)  # {"path", "fingerprint"} of its training data
    metrics: dict[str, Any] = field(default_factory=dict)
    status: Status = "active"
    tools: tuple[str, ...] = ()  # task adapters: the tool names it was trained to call
    tool_call_format: CallFormat = "none"  # how it writes a call (service.tool_calls)
    # task adapters: whether its training prompts described the tools a request declares; False (an
    # expert trained on bare requests) keeps them out of its prompt (service.prompts.tools_to_show)
    tools_in_prompt: bool = True

    @property
    def uid(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels)
        data["tools"] = list(self.tools)
        del data["name"], data["kind"]
        return data


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    kind: Kind
    active_version: int | None
    versions: tuple[AdapterVersion, ...]
    next_version: int = 0  # the next version number to issue; never decreases, survives removal
    removed_at: str = ""  # set when the adapter was removed (retired with its history)
    removed_version: int | None = None  # the version that was active then: what a restore brings back

    def __post_init__(self) -> None:
        highest = max((v.version for v in self.versions), default=0)
        object.__setattr__(self, "next_version", max(self.next_version, highest + 1))

    @property
    def removed(self) -> bool:
        return bool(self.removed_at)

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
    revision: int = 0  # registry-wide, incremented by every write

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
                temperature=router_temperature(v.get("temperature", 1.0)),
                dataset=dict(v.get("dataset") or {}),
                metrics=dict(v.get("metrics") or {}),
                status=v.get("status", "active"),
                tools=tuple(str(t) for t in v.get("tools") or ()),
                tool_call_format=call_format(v.get("tool_call_format")),
                tools_in_prompt=v.get("tools_in_prompt", True) is not False,
            )
            for v in raw.get("versions", [])
        )
        removed_version = raw.get("removed_version")
        entries[name] = AdapterEntry(
            name, kind, raw.get("active_version"), versions,
            next_version=_int(raw.get("next_version")),
            removed_at=str(raw.get("removed_at") or ""),
            removed_version=int(removed_version) if isinstance(removed_version, int) else None,
        )
    highest = max((v.version for e in entries.values() for v in e.versions), default=0)
    return RegistrySnapshot(entries, data.get("active_router"), max(_int(data.get("revision")), highest))


def _int(value: Any) -> int:
    """A non-negative integer field of the file; anything else (absent, null, text) counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def router_temperature(value: Any) -> float:
    """A router's calibration temperature; anything but a positive finite number means none (1.0)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 1.0
    return number if math.isfinite(number) and number > 0 else 1.0


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
    return RegistrySnapshot(entries, "router" if "router" in entries else None, 1 if entries else 0)


def dump_registry(snapshot: RegistrySnapshot) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "revision": snapshot.revision,
        "active_router": snapshot.active_router,
        "adapters": {name: _dump_entry(entry) for name, entry in sorted(snapshot.entries.items())},
    }


def _dump_entry(entry: AdapterEntry) -> dict[str, Any]:
    data: dict[str, Any] = {"kind": entry.kind, "active_version": entry.active_version,
                            "next_version": entry.next_version}
    if entry.removed:
        data.update(removed_at=entry.removed_at, removed_version=entry.removed_version)
    data["versions"] = [v.to_json() for v in entry.versions]
    return data


WriteGuard = Callable[[Path], AbstractContextManager[object]]
_write_guard: WriteGuard | None = None
_lock_dir: Path | None = None


def use_write_guard(guard: WriteGuard | None, lock_dir: Path | None = None) -> None:
    """Run every registry write of this process inside `guard(path)` (None: the file lock alone),
    with the file locks in `lock_dir` instead of beside the file (a Modal Volume cannot reload while
    a lock file on it is open). Applies to `Registry` objects made afterwards."""
    global _write_guard, _lock_dir
    _write_guard, _lock_dir = guard, lock_dir


def _lock_path(path: Path) -> Path:
    if _lock_dir is None:
        return Path(str(path) + ".lock")
    _lock_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return _lock_dir / f"{path.name}.{digest}.lock"


def _file_mode(path: Path) -> int:
    """The permissions a rewrite of `path` keeps: its own, or for a new file what the umask allows."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


class Registry:
    """The registry file: read cheaply, write atomically under a lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file_lock = FileLock(str(_lock_path(self.path)), timeout=60)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One write transaction: the file lock, then the process's write guard if it has one."""
        with self._file_lock:
            if _write_guard is None:
                yield
                return
            with _write_guard(self.path):
                yield

    def read_lock(self) -> AbstractContextManager[object]:
        """The local file lock alone: holds off this file system's writers (a volume reload must not
        land in the middle of a write)."""
        return self._file_lock

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
            # writers replace the file atomically and never leave it empty: an empty file was
            # truncated by someone else, and reading it as "no adapters" would unload every one
            # (and let the next write erase every acknowledged registration)
            raise BadRequestError(f"registry {self.path} is empty (truncated?)")
        try:
            return parse_registry(json.loads(text))
        except ValueError as exc:
            raise BadRequestError(f"registry {self.path} is not valid JSON: {exc}") from exc

    def _write(self, snapshot: RegistrySnapshot, previous: RegistrySnapshot) -> None:
        """Replace the file with `snapshot`, one revision after `previous` (what the caller loaded)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        snapshot = replace(snapshot, revision=previous.revision + 1)
        payload = json.dumps(dump_registry(snapshot), indent=2, sort_keys=False) + "\n"
        for stale in self.path.parent.glob(self.path.name + ".*.tmp"):
            # left by a writer killed mid-write: every writer holds the lock, so no live one owns it
            stale.unlink(missing_ok=True)
        mode = _file_mode(self.path)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            os.fchmod(fd, mode)  # mkstemp makes 0600: the registry would lose its group's read access
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
        """Append a new version and make it active, or with `activate=False` add it as a candidate
        (the active version, or none for a new name, keeps serving) for `activate(name, version)` to
        promote once it has loaded. Its number is the entry's `next_version`: never one issued before
        for this name, even after the adapter was removed. Re-registering a removed name brings the
        entry back with its history."""
        with self._lock():
            snap = self.load()
            entry = snap.entries.get(version.name)
            if entry is not None and entry.kind != version.kind:
                raise ConflictError(
                    f"{version.name!r} is registered as a {entry.kind} adapter, not a {version.kind}", "name"
                )
            number = entry.next_version if entry else 1
            new = replace(version, version=number, created=version.created or _now(),
                          status="active" if activate else "candidate")
            versions = list(entry.versions) if entry else []
            if activate:
                versions = [_retire(v) if v.status == "active" else v for v in versions]
            versions.append(new)
            entries = dict(snap.entries)
            router = snap.active_router
            if activate:
                entries[new.name] = AdapterEntry(new.name, new.kind, number, tuple(versions), number + 1)
                if new.kind == "router" and (router is None or router not in entries or entries[router].active is None):
                    router = new.name
            else:
                kept = entry or AdapterEntry(new.name, new.kind, None, ())
                entries[new.name] = replace(kept, versions=tuple(versions), next_version=number + 1)
            self._write(RegistrySnapshot(entries, router), snap)
            return new

    def activate(self, name: str, version: int | None = None) -> AdapterVersion:
        """Make `version` active (promotion, or restoring a removed adapter); without a version, roll
        back to the previous one, or for a removed adapter restore the version that was active."""
        with self._lock():
            snap = self.load()
            entry = snap.entries.get(name)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered", param="name")
            if version is None and entry.removed:
                version = entry.removed_version if entry.removed_version is not None else max(
                    (v.version for v in entry.versions if v.status == "retired"), default=None)
                if version is None:
                    raise ConflictError(f"adapter {name!r} has no version to restore; give one", "version")
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
            entries[name] = AdapterEntry(name, entry.kind, version, versions, entry.next_version)
            router = name if entry.kind == "router" else snap.active_router
            self._write(RegistrySnapshot(entries, router), snap)
            return replace(target, status="active")

    def restore(self, name: str, version: int | None = None) -> AdapterVersion:
        """Bring a removed adapter back: `version`, or the one that was active when it was removed."""
        entry = self.load().entries.get(name)
        if entry is None:
            raise AdapterNotFoundError(f"adapter {name!r} is not registered", param="name")
        if version is None and not entry.removed:
            raise ConflictError(f"adapter {name!r} is not removed; give a version to activate", "version")
        return self.activate(name, version)

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
        with self._lock():
            snap = self.load()
            entry = snap.entries.get(name)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered", param="name")
            target = entry.get(version)
            if version == entry.active_version:
                raise ConflictError(f"{target.uid} is active; activate another version first", "version")
            versions = tuple(replace(v, status=status) if v.version == version else v for v in entry.versions)
            entries = dict(snap.entries)
            entries[name] = replace(entry, versions=versions)
            self._write(RegistrySnapshot(entries, snap.active_router), snap)
            return replace(target, status=status)

    def record_metrics(self, name: str, version: int, metrics: dict[str, Any]) -> AdapterVersion:
        """Merge evaluation results into a registered version's `metrics` (the demo registers each
        adapter as soon as it is trained, so a running service gets it at once, and evaluates them
        all at the end). Only this descriptive field changes: weights, checksum and status stay."""
        with self._lock():
            snap = self.load()
            entry = snap.entries.get(name)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered", param="name")
            target = replace(entry.get(version), metrics={**entry.get(version).metrics, **metrics})
            entries = dict(snap.entries)
            entries[name] = replace(entry, versions=tuple(target if v.version == version else v
                                                          for v in entry.versions))
            self._write(RegistrySnapshot(entries, snap.active_router), snap)
            return target

    def withdraw(self, name: str, version: int) -> None:
        """Take back a version that was registered but would not load: it is marked failed and the
        version it replaced is active again (after a first version, none is), in one locked write.
        The failed version stays in the history, so its number is never issued again."""
        with self._lock():
            snap = self.load()
            entry = snap.entries.get(name)
            if entry is None or all(v.version != version for v in entry.versions):
                return
            router = snap.active_router
            active = entry.active_version
            if active == version:
                older = [v.version for v in entry.versions if v.version < version and v.status == "retired"]
                active = max(older) if older else None
            versions = tuple(
                replace(v, status="failed") if v.version == version
                else (replace(v, status="active") if v.version == active else v)
                for v in entry.versions
            )
            entries = dict(snap.entries)
            entries[name] = replace(entry, active_version=active, versions=versions)
            if router == name and active is None:
                router = None
            self._write(RegistrySnapshot(entries, router), snap)

    def remove(self, name: str) -> AdapterEntry:
        """Retire adapter `name`: nothing of it serves any more, and its whole history stays in the
        file (`activate` or `restore` brings it back). Removing a removed adapter changes nothing."""
        with self._lock():
            snap = self.load()
            entry = snap.entries.get(name)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered", param="name")
            if entry.removed:
                return entry
            versions = tuple(_retire(v) if v.status in ("active", "candidate") else v for v in entry.versions)
            retired = replace(entry, active_version=None, versions=versions, removed_at=_now(),
                              removed_version=entry.active_version)
            entries = {**snap.entries, name: retired}
            router = None if snap.active_router == name else snap.active_router
            self._write(RegistrySnapshot(entries, router), snap)
            return retired


def _retire(version: AdapterVersion) -> AdapterVersion:
    return replace(version, status="retired")
