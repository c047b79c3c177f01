"""How a container publishes its writes to the volumes and sees the others'.

Modal Volumes are not shared file systems: a writer commits, a reader reloads, and of two commits of
one file the last wins. Hence three rules, each with one owner here:

- every registry write, in any container, is one transaction (commit the adapters, take the lock
  held in a `modal.Dict`, reload the registry, write, commit: `deploy/volume_writes.py`), installed
  by `guard_registry_writes`, so two containers never drop each other's registrations;
- a serving replica reloads in the reverse order of the writers' commits: the registry, then the
  adapters (`VolumeRefresher`). A writer commits an entry's files before the entry, so an entry seen
  at the registry's reload had its files committed before it, and the adapters' reload that follows
  brings them: a tick never ends with an entry whose files are missing. (The opposite order can: a
  write committed between the two reloads shows the entry, but not its files, until the next tick.)
- outside Modal (tests, `.local()` calls) the volumes are plain folders: nothing to commit or reload,
  and the registry's file lock alone serializes writers, as for `loramux serve`.

A registration therefore reaches every replica within `LORAMUX_MODAL_VOLUME_RELOAD_S` (the refresher)
plus `LORAMUX_REGISTRY_POLL_S` (the service's own registry watcher) plus the adapter's load time.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import modal

from deploy.modal_app import resources

log = logging.getLogger("loramux.modal")

LOCK_DIR = Path("/tmp/loramux-locks")  # the registry's file lock, off the volume (container-local)


def running_in_modal() -> bool:
    """True inside a Modal container. Outside (tests, `.local()` calls) volumes are plain folders: no commit."""
    return not modal.is_local()


def commit(*volumes: Any) -> None:
    """Publish this container's writes to the other containers (in order: adapters before the registry)."""
    if running_in_modal():
        for volume in volumes:
            volume.commit()


def reload(*volumes: Any) -> None:
    """See what other containers committed (a warm container may have mounted the volume long ago)."""
    if running_in_modal():
        for volume in volumes:
            volume.reload()


def guard_registry_writes() -> None:
    """Make every registry write of this container one transaction across containers (module docstring)."""
    from deploy.volume_writes import VolumeWriteGuard
    from service.registry import use_write_guard

    if running_in_modal():
        guard = VolumeWriteGuard(resources.registry_locks, resources.registry_volume,
                                 before=(resources.adapters_volume,))
        use_write_guard(guard, LOCK_DIR)


@dataclass
class VolumeRefresher:
    """Keeps a serving container's view of the adapters and the registry current.

    One `tick`: reload the registry, then the adapters (module docstring: why this order), under the
    registry's local file lock (a reload never lands in the middle of this container's own write). The
    service's own registry watcher (`LORAMUX_REGISTRY_POLL_S`) then loads, swaps or unloads adapters.
    This container's admin writes need no publishing here: each was committed inside its own write transaction
    (`guard_registry_writes`), so none can slip between a check and a commit. A reload refused because
    a file is open (an adapter being read) is retried on the next tick."""

    registry_file: Path
    adapters: Any
    registry: Any

    def tick(self) -> str:
        from service.registry import Registry

        with Registry(self.registry_file).read_lock():
            self.registry.reload()
            self.adapters.reload()
        return "reloaded"

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.tick)
            except Exception as exc:  # open files, a transient API error: the next tick tries again
                log.warning("volume refresh skipped: %s", exc)
