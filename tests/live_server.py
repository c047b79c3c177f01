"""Private live servers for the reliability, durability, fuzzing and load tests.

Each test module that changes a server's state (registers, deletes, kills it) gets its own copy of
the conftest adapters and registry, so the session-wide `server` other modules share never sees
its registrations. The servers run torch on one thread: these tests put the server, the test
client (and Locust or schemathesis) on the same two cores, and OpenMP threads spin-waiting for a
busy core make each decode step up to ten times slower and the timings flaky.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx

from tests.conftest import CACHE_DIR
from tests.support import ServerProcess

SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


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


def start_server(root: Path, registry: Path, log_path: Path, **settings: object) -> ServerProcess:
    """`loramux serve` on 127.0.0.1 over `registry`; each keyword is a setting (`max_queue=8`)."""
    env = {
        "LORAMUX_REGISTRY": str(registry),
        "LORAMUX_ADAPTER_ROOT": str(root),
        "LORAMUX_CACHE_DIR": str(CACHE_DIR),
        "LORAMUX_REGISTRY_POLL_S": "0.2",
        **SINGLE_THREAD,
        **{f"LORAMUX_{name.upper()}": str(value).lower() if isinstance(value, bool) else str(value)
           for name, value in settings.items()},
    }
    return ServerProcess(env).start(log_path)


def metric(server: ServerProcess, name: str, headers: dict[str, str] | None = None) -> float:
    """One unlabelled Prometheus sample from /metrics."""
    text = httpx.get(f"{server.url}/metrics", headers=headers or {}, timeout=30).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


CRASH_MARKERS = ("Traceback", "unhandled error", "engine step failed", "Exception in ASGI application")


def crashes(server: ServerProcess) -> list[str]:
    """Lines of the server log that show an unhandled error (each would have been a 5xx or a hang)."""
    text = server.log_path.read_text() if server.log_path else ""
    return [line for line in text.splitlines() if any(marker in line for marker in CRASH_MARKERS)]
