"""The registry file: both formats, versions, activation and rollback, removal, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.errors import AdapterNotFoundError, BadRequestError, ConflictError
from service.registry import AdapterVersion, Registry


def version(name: str, kind: str = "task", path: str = "x", labels: tuple[str, ...] = ()) -> AdapterVersion:
    return AdapterVersion(name=name, kind=kind, version=0, path=path, labels=labels)  # type: ignore[arg-type]


def test_seed_format_is_read(tmp_path: Path):
    file = tmp_path / "loras.json"
    file.write_text(json.dumps({"calendar": "/loras/calendar", "lights": "/loras/lights", "router": "/loras/router"}))
    snap = Registry(file).load()
    assert snap.task("calendar").path == "/loras/calendar"
    router = snap.router()
    assert router is not None and router.name == "router"
    assert router.labels == ("calendar", "lights")


def test_versions_activate_rollback_remove(tmp_path: Path):
    reg = Registry(tmp_path / "loras.json")
    assert reg.add_version(version("a", path="a1")).version == 1
    assert reg.add_version(version("a", path="a2")).version == 2
    snap = reg.load()
    assert snap.task("a").path == "a2"
    assert [v.status for v in snap.entries["a"].versions] == ["retired", "active"]
    reg.activate("a")  # roll back
    assert reg.load().task("a").path == "a1"
    with pytest.raises(ConflictError):
        reg.activate("a")  # nothing older than version 1
    reg.activate("a", 2)
    assert reg.load().task("a").version == 2
    reg.remove("a")
    with pytest.raises(AdapterNotFoundError):
        reg.load().task("a")


def test_candidate_versions_do_not_serve_until_promoted(tmp_path: Path):
    reg = Registry(tmp_path / "loras.json")
    reg.add_version(version("r", kind="router", path="r1", labels=("a", "b")))
    cand = reg.add_version(version("r", kind="router", path="r2", labels=("a", "b", "c")), activate=False)
    assert cand.status == "candidate"
    snap = reg.load()
    assert snap.router().path == "r1"
    reg.activate("r", cand.version)
    assert reg.load().router().path == "r2"


def test_kind_conflict_is_refused(tmp_path: Path):
    reg = Registry(tmp_path / "loras.json")
    reg.add_version(version("a"))
    with pytest.raises(ConflictError):
        reg.add_version(version("a", kind="router", labels=("x", "y")))


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path):
    reg = Registry(tmp_path / "loras.json")
    for i in range(5):
        reg.add_version(version(f"a{i}"))
    assert json.loads((tmp_path / "loras.json").read_text())["format"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loras.json", "loras.json.lock"]


def test_an_emptied_file_is_unreadable_not_an_empty_registry(tmp_path: Path):
    """Writers never leave the file empty, so an empty one was truncated by someone else. Read as "no
    adapters" it would unload every adapter, and the next write would erase every acknowledged entry:
    both the reader and the writer refuse it instead, and the restored file has every entry back."""
    reg = Registry(tmp_path / "loras.json")
    reg.add_version(version("a"))
    kept = reg.path.read_text()
    for emptied in ("", "\n  \n"):
        reg.path.write_text(emptied)
        with pytest.raises(BadRequestError, match="empty"):
            reg.load()
        with pytest.raises(BadRequestError, match="empty"):
            reg.add_version(version("b"))
        assert reg.path.read_text() == emptied  # the refused write wrote nothing
    reg.path.write_text(kept)
    assert reg.add_version(version("b")).version == 1
    assert sorted(reg.load().entries) == ["a", "b"]


def test_router_promote_and_rollback_cli(tmp_path: Path):
    import subprocess
    import sys

    file = tmp_path / "loras.json"
    reg = Registry(file)
    reg.add_version(version("router", kind="router", path="r1", labels=("a", "b")))
    reg.add_version(version("router", kind="router", path="r2", labels=("a", "b", "c")), activate=False)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "loramux", "router", *args, "--registry", str(file)],
                              capture_output=True, text=True)

    assert "* router@1 active" in cli("status").stdout
    assert cli("promote").returncode == 0
    assert reg.load().router().path == "r2"
    assert cli("rollback").returncode == 0
    assert reg.load().router().path == "r1"
    assert cli("promote", "--version", "9").returncode != 0
    refused = cli("promote")  # the candidate was activated and retired: nothing left to promote
    assert refused.returncode == 2 and "has no candidate version" in refused.stderr
    assert "Traceback" not in refused.stderr
