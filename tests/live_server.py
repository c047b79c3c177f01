"""Private live servers for the reliability, durability, fuzzing and load tests.

Each test module that changes a server's state (registers, deletes, kills it) gets its own copy of
the conftest adapters and registry, so the session-wide `server` other modules share never sees
its registrations. The servers themselves (`start_server`, torch on one thread) and the log check
(`crashes`) live in `loadtests.harness`, which the chaos run uses too.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx

from loadtests.harness import SINGLE_THREAD, ServerProcess, crashes, start_server

__all__ = ["SINGLE_THREAD", "crashes", "metric", "private_copy", "start_server"]


def private_copy(served_registry: Path, adapter_root: Path, dest: Path) -> tuple[Path, Path]:
    """Copy the conftest registry and the adapters it names into `dest` (paths are stored relative
    to the adapter root, so the copied registry is valid as is). Returns (adapter root, registry)."""
    dest.mkdir(parents=True, exist_ok=True)
    data = json.loads(served_registry.read_text())
    for entry in data["adapters"].values():
        for version in entry["versions"]:
            if not (dest / version["path"]).exists():
                shutil.copytree(adapter_root / version["path"], dest / version["path"])
    registry = dest / "loras.json"
    shutil.copy(served_registry, registry)
    return dest, registry


def metric(server: ServerProcess, name: str, headers: dict[str, str] | None = None) -> float:
    """One unlabelled Prometheus sample from /metrics."""
    text = httpx.get(f"{server.url}/metrics", headers=headers or {}, timeout=30).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))
