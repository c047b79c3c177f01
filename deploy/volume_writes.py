"""One registry writer at a time across Modal containers.

A Modal Volume is not a shared file system: each container works on its own view and publishes it
with `commit()`, and when two containers commit the same file the last commit wins. The registry is
one file written by several kinds of container (admin calls in any serving replica, the register,
onboard and router functions), so the file lock that serializes writers on one machine is not
enough: two containers that each load, change and commit `loras.json` silently drop one change.

`VolumeWriteGuard` makes every registry write one transaction across containers (installed with
`service.registry.use_write_guard`, around the file lock): it commits the volumes the write may
point at (an adapter's files before the entry that names them), takes a lock held in a `modal.Dict`
(`put(..., skip_if_exists=True)` is atomic on Modal's side), reloads the registry volume so the
write starts from the newest committed file, and commits the volume before letting the next writer
in. A holder that died mid-write is recognised by its lease running out (`lease_s`); a write that
outlives its own lease is refused at release time, so its caller hears about it. The registry
file's local lock lives outside the volume (`lock_dir`): an open lock file would make the volume's
reload fail.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from service.errors import ConflictError

log = logging.getLogger("loramux.modal")

LOCK_KEY = "registry-writer"


class Volume(Protocol):
    def commit(self) -> None: ...

    def reload(self) -> None: ...


class LockStore(Protocol):
    """What a `modal.Dict` offers that the lock needs."""

    def put(self, key: Any, value: Any, *, skip_if_exists: bool = False) -> bool: ...

    def get(self, key: Any, default: Any = None) -> Any: ...

    def pop(self, key: Any, default: Any = None) -> Any: ...


@dataclass
class VolumeWriteGuard:
    """`guard(path)` -> a context manager around one registry write (see the module docstring)."""

    locks: LockStore
    volume: Volume
    before: Sequence[Volume] = ()  # committed before the write: the files a new entry points at
    lease_s: float = 120.0  # a holder silent for longer is taken for dead
    wait_s: float = 60.0  # how long a writer waits for the lock before a 409
    poll_s: float = 0.1
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    key: str = LOCK_KEY
    _owner: str = field(default_factory=lambda: uuid.uuid4().hex)

    @contextlib.contextmanager
    def __call__(self, path: Path) -> Iterator[None]:
        for volume in self.before:
            volume.commit()
        token = self._acquire()
        try:
            self.volume.reload()
            yield
            self.volume.commit()
        except BaseException:
            self._release(token, quiet=True)  # the write's own error is the one to hear about
            raise
        self._release(token)

    def _acquire(self) -> str:
        token = f"{self._owner}:{uuid.uuid4().hex}"
        give_up = time.monotonic() + self.wait_s
        while True:
            now = self.clock()
            if self.locks.put(self.key, {"token": token, "expires": now + self.lease_s}, skip_if_exists=True):
                return token
            held = self.locks.get(self.key)
            if held is not None and float(held.get("expires", 0)) < now:
                self._break(held)
                continue
            if time.monotonic() >= give_up:
                raise ConflictError("another registry write is in progress; try again")
            self.sleep(self.poll_s)

    def _break(self, stale: dict[str, Any]) -> None:
        """Remove a dead holder's lock; if another writer took it in the meantime, put theirs back."""
        log.warning("registry write lock of a writer gone silent since %.0f is broken", stale.get("expires", 0))
        taken = self.locks.pop(self.key, None)
        if taken is not None and taken.get("token") != stale.get("token"):
            self.locks.put(self.key, taken, skip_if_exists=True)

    def _release(self, token: str, quiet: bool = False) -> None:
        held = self.locks.get(self.key)
        if held is None or held.get("token") != token:
            if quiet:
                return
            # our lease ran out and someone else holds the lock: our commit may have raced theirs
            raise ConflictError("a registry write took longer than its lease; check the registry and retry")
        self.locks.pop(self.key, None)
