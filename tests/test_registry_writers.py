"""Registry writers in separate containers (issue 13, item 12), as real processes.

On Modal every container has its own copy of the registry volume and the last commit of a file
wins, so two containers that each register an adapter could lose one registration. Here three
processes, each with its own copy of the file (Modal's volume and dict semantics on folders:
`tests.volume_sim`), register eight adapters each, at the same time, through the service's own
`Registry` with the Modal app's write guard: every registration must be in the published file.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from service.registry import AdapterVersion, Registry
from service.settings import PROJECT_ROOT

WRITERS, WRITES = 3, 8


def run_writers(tmp_path: Path, unguarded: bool = False) -> dict:
    published, locks = tmp_path / "published", tmp_path / "locks"
    published.mkdir()
    locks.mkdir()
    command = [sys.executable, "-m", "tests.volume_sim", "--published", str(published), "--locks", str(locks),
               "--writes", str(WRITES), *(["--unguarded"] if unguarded else [])]
    procs = [subprocess.Popen([*command, "--container", str(tmp_path / f"c{i}"), "--name", f"w{i}"],
                              cwd=PROJECT_ROOT, stderr=subprocess.PIPE, text=True) for i in range(WRITERS)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    return json.loads((published / "loras.json").read_text())


def test_concurrent_writers_in_separate_containers_lose_nothing(tmp_path: Path) -> None:
    data = run_writers(tmp_path)
    names = set(data["adapters"])
    expected = {f"w{i}-{k}" for i in range(WRITERS) for k in range(WRITES)}
    assert names == expected, f"lost: {sorted(expected - names)}"
    assert data["revision"] == WRITERS * WRITES  # one revision per write: none was overwritten


def test_registry_writes_keep_the_files_permissions(tmp_path: Path) -> None:
    path = tmp_path / "loras.json"
    registry = Registry(path)
    version = AdapterVersion(name="a", kind="task", version=0, path="runs/a", base_model="b",
                             base_model_sha256="", created="", sha256="")
    registry.add_version(version)
    os.chmod(path, 0o640)
    registry.add_version(version)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
