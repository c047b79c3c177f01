"""What is still being built: adapters a builder (`loramux demo --serve`) will register soon.

The service answers as soon as its base model is loaded, while the demo trains its adapters and
registers each one the moment it is ready (the same registry and hot loading production uses).
Meanwhile a request for a name that does not exist *yet* deserves a different answer from one
for a name that will never exist: "retry in a minute" (503 with `Retry-After`) instead of 404, and
`/ready` and `/v1/models` say what is coming. The builder says so in a small JSON file next to the
registry (`loras.building.json` beside `loras.json`), rewritten atomically at each stage and
on a heartbeat; the service reads it when it changes. A builder that died (its process gone on
this host, or no heartbeat for `STALE_AFTER_S`) builds nothing, so a killed demo never leaves
names "coming" forever. The builder removes the file when it is done.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.errors import ServiceUnavailableError

log = logging.getLogger(__name__)
STALE_AFTER_S = 300.0  # a builder writes at least every HEARTBEAT_S; silence this long means it died
HEARTBEAT_S = 20.0


def status_path(registry: Path) -> Path:
    """The build-status file of a registry: `config/loras.json` -> `config/loras.building.json`."""
    return registry.with_name(f"{registry.stem}.building.json")


@dataclass(frozen=True)
class Pending:
    """One adapter a live builder will register: its kind and the builder's estimate of when."""

    name: str
    kind: str
    ready_at: float | None  # the builder's estimate (epoch seconds), None when unknown
    # registered, and being loaded by the service: it stays "coming" until the service serves it, or
    # a request in the second between the registry write and the load would be told it does not exist
    registered: bool = False

    def retry_after(self, now: float | None = None) -> int:
        """Seconds a client should wait before asking again (at least 5, at most 120; 2 once registered)."""
        if self.registered:
            return 2
        if self.ready_at is None:
            return 30
        return int(min(120, max(5, self.ready_at - (now or time.time()))))


@dataclass(frozen=True)
class BuildState:
    """A live builder's last word: what it is doing, and the names it builds that a service may not
    serve yet (those still to be trained, and those registered a moment ago, while they load)."""

    stage: str
    stage_index: int
    stage_total: int
    updated: float
    pending: dict[str, Pending] = field(default_factory=dict)
    host: str = ""  # the builder's machine: one on this host competes with the server for its cores

    def find(self, name: str | None = None, kind: str | None = None) -> Pending | None:
        """The pending adapter called `name` (or the first of `kind`)."""
        return next((p for p in self.pending.values()
                     if (name is None or p.name == name) and (kind is None or p.kind == kind)), None)

    def still_building(self, what: str, name: str | None = None, kind: str | None = None,
                       param: str | None = None) -> ServiceUnavailableError | None:
        """The 503 for a request that needs something this builder has not registered (or the
        service not loaded) yet: it says what is being built and when to retry (`Retry-After`), or
        None when `name` (or any adapter of `kind`) is not coming."""
        pending = self.find(name, kind)
        if pending is None:
            return None
        wait = pending.retry_after()
        doing = ("is loading" if pending.registered else
                 f"is still being built (stage {self.stage_index} of {self.stage_total}: {self.stage})")
        return ServiceUnavailableError(f"{what} {doing}; retry in about {wait} s", param=param,
                                       headers={"Retry-After": str(wait)})

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "stage_index": self.stage_index,
            "stage_total": self.stage_total,
            "pending": {n: {"kind": p.kind, "registered": p.registered, "retry_after_s": p.retry_after()}
                        for n, p in self.pending.items()},
        }


def _alive(data: dict[str, Any], now: float) -> bool:
    if now - float(data.get("updated", 0)) > STALE_AFTER_S:
        return False
    if data.get("host") == socket.gethostname():
        try:
            os.kill(int(data.get("pid", 0)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, OverflowError):
            return True  # another user's process exists; a malformed pid is judged by the heartbeat
    return True


def parse(data: Any, now: float | None = None) -> BuildState | None:
    """A status file's content as a BuildState, or None when its builder is gone or it is malformed
    (the file is ours, but an unreadable one must never break the service: it just builds nothing)."""
    now = now or time.time()
    if not isinstance(data, dict) or not _alive(data, now):
        return None
    try:
        pending = {
            str(name): Pending(str(name), str(info.get("kind", "task")),
                               None if info.get("ready_at") is None else float(info["ready_at"]),
                               bool(info.get("registered", False)))
            for name, info in dict(data.get("pending", {})).items()
        }
        return BuildState(str(data.get("stage", "")), int(data.get("stage_index", 0)),
                          int(data.get("stage_total", 0)), float(data["updated"]), pending,
                          str(data.get("host", "")))
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


class BuildStatusReader:
    """The service's view of the file: re-read only when it changed, judged alive at every call."""

    def __init__(self, path: Path):
        self.path = path
        self._signature: tuple[int, int] | None = None
        self._data: Any = None

    def current(self) -> BuildState | None:
        try:
            st = self.path.stat()
        except OSError:
            self._signature, self._data = None, None
            return None
        signature = (st.st_mtime_ns, st.st_size)
        if signature != self._signature:
            try:
                self._data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self._data = None
            self._signature = signature
        return parse(self._data)

    def pending(self, name: str | None = None, kind: str | None = None) -> tuple[Pending, BuildState] | None:
        """The pending adapter called `name` (or the first of `kind`), with the builder's state."""
        state = self.current()
        found = None if state is None else state.find(name, kind)
        return None if found is None else (found, state)

    def still_building(self, what: str, name: str | None = None, kind: str | None = None,
                       param: str | None = None) -> ServiceUnavailableError | None:
        """`BuildState.still_building` of the current build (None without one)."""
        state = self.current()
        return None if state is None else state.still_building(what, name, kind, param)


class BuildStatusWriter:
    """The builder's side: `stage(...)` at each step of the work, `registered(name)` once a name
    serves, `close()` at the end (also on failure). A heartbeat thread keeps the file fresh during
    long stages, so readers can tell a slow builder from a dead one."""

    def __init__(self, path: Path, pending: dict[str, str], stage_total: int):
        self.path = path
        self.stage_total = stage_total
        self._pending: dict[str, dict[str, Any]] = {n: {"kind": k, "ready_at": None} for n, k in pending.items()}
        self._stage, self._index = "starting", 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="build-status", daemon=True)
        self._write()
        self._thread.start()

    def stage(self, index: int, name: str, etas: dict[str, float] | None = None) -> None:
        """Stage `index` (1-based) of `stage_total` begins; `etas`: seconds until each name is registered."""
        with self._lock:
            self._stage, self._index = name, index
            now = time.time()
            for pending_name, eta in (etas or {}).items():
                if pending_name in self._pending:
                    self._pending[pending_name]["ready_at"] = round(now + eta, 1)
            self._write()

    def registered(self, name: str) -> None:
        """`name` is in the registry: the service serves it as soon as it has loaded it."""
        with self._lock:
            if name in self._pending:
                self._pending[name].update(registered=True, ready_at=round(time.time(), 1))
            self._write()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            self.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                if not self._stop.is_set():
                    self._write()

    def _write(self) -> None:
        data = {"builder": "loramux demo", "pid": os.getpid(), "host": socket.gethostname(), "updated": time.time(),
                "stage": self._stage, "stage_index": self._index, "stage_total": self.stage_total,
                "pending": self._pending}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.replace(tmp, self.path)


async def share_cpu_while_building(reader: BuildStatusReader, engine: Any, every_s: float = 2.0) -> None:
    """Run for the server's life: while a builder on this host trains, the engine computes on one
    thread (`Engine.share_cpu`), and on all of them again once the build is over."""
    sharing = False
    while True:
        build = reader.current()
        local = build is not None and build.host == socket.gethostname()
        if local != sharing:
            await engine.share_cpu(local)
            sharing = local
            log.info("%s", "a build runs on this host: the engine computes on one thread until it is done"
                     if local else "the build is over: the engine computes on all its threads again")
        await asyncio.sleep(every_s)
