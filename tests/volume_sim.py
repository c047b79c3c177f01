"""Modal's volume and dict semantics on local folders, for registry writers in separate processes.

Each simulated container has its own copy of the registry file; `FolderVolume.commit` publishes it
(the last commit of a file wins, as on Modal) and `reload` replaces the copy with the published one.
`FolderLocks` is a `modal.Dict` reduced to what the write lock uses, with the same atomicity:
put-if-absent (a hard link, which fails if the name exists), get, and pop (a rename).
`python -m tests.volume_sim` is one writer container (see tests/test_registry_writers.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

FILE = "loras.json"


def _publish(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    tmp.write_bytes(source.read_bytes())
    os.replace(tmp, target)


class FolderVolume:
    def __init__(self, local: Path, published: Path):
        self.local, self.published = local, published

    def commit(self) -> None:
        if (self.local / FILE).exists():
            _publish(self.local / FILE, self.published / FILE)

    def reload(self) -> None:
        if (self.published / FILE).exists():
            _publish(self.published / FILE, self.local / FILE)


class FolderLocks:
    def __init__(self, folder: Path):
        self.folder = folder

    def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        tmp = self.folder / f".{key}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(value))
        try:
            if skip_if_exists:
                os.link(tmp, self.folder / key)
            else:
                os.replace(tmp, self.folder / key)
                return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return json.loads((self.folder / key).read_text())
        except FileNotFoundError:
            return default

    def pop(self, key: str, default: Any = None) -> Any:
        taken = self.folder / f".taken.{uuid.uuid4().hex}"
        try:
            os.rename(self.folder / key, taken)
        except FileNotFoundError:
            return default
        value = json.loads(taken.read_text())
        taken.unlink()
        return value


def writer(container: Path, published: Path, locks: Path, name: str, writes: int, guarded: bool) -> None:
    """One container registering `writes` adapters the way the Modal functions and admin API do."""
    from deploy.volume_writes import VolumeWriteGuard
    from service.registry import AdapterVersion, Registry, use_write_guard

    volume = FolderVolume(container, published)
    if guarded:
        use_write_guard(VolumeWriteGuard(FolderLocks(locks), volume, poll_s=0.01), container / "locks")
    rng = random.Random(name)
    volume.reload()
    for k in range(writes):
        registry = Registry(container / FILE)
        registry.add_version(AdapterVersion(name=f"{name}-{k}", kind="task", version=0, path=f"runs/{name}-{k}",
                                            base_model="b", base_model_sha256="", created="", sha256=""))
        if not guarded:
            volume.commit()  # what a function or the refresher did after a write: publish it
        time.sleep(rng.uniform(0, 0.02))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--container", type=Path, required=True)
    parser.add_argument("--published", type=Path, required=True)
    parser.add_argument("--locks", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--writes", type=int, default=8)
    parser.add_argument("--unguarded", action="store_true")
    args = parser.parse_args()
    args.container.mkdir(parents=True, exist_ok=True)
    writer(args.container, args.published, args.locks, args.name, args.writes, not args.unguarded)


if __name__ == "__main__":
    main()
