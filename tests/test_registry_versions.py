"""Version numbers never repeat for a name, removal keeps the history, the file format stays
readable both ways, and vLLM's integer LoRA ids come from one process-wide counter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.engine.base import AdapterRef
from service.errors import AdapterNotFoundError, ConflictError
from service.registry import AdapterVersion, Registry
from service.settings import Settings


def version(name: str, path: str = "x", kind: str = "task", labels: tuple[str, ...] = ()) -> AdapterVersion:
    return AdapterVersion(name=name, kind=kind, version=0, path=path, labels=labels)  # type: ignore[arg-type]


def test_a_removed_name_registered_again_gets_a_new_number(tmp_path: Path):
    reg = Registry(tmp_path / "loras.json")
    reg.add_version(version("a", "a1"))
    reg.add_version(version("a", "a2"))
    reg.add_version(version("b", "b1"))
    removed = reg.remove("a")
    assert removed.removed and removed.removed_version == 2
    with pytest.raises(AdapterNotFoundError):
        reg.load().task("a")
    again = reg.add_version(version("a", "a3"))
    assert again.version == 3  # not 1: an old a@1 may still be loaded in a running service
    snap = reg.load()
    assert snap.task("a").path == "a3" and not snap.entries["a"].removed
    assert [(v.version, v.status) for v in snap.entries["a"].versions] == [(1, "retired"), (2, "retired"),
                                                                          (3, "active")]


def test_removal_keeps_the_history_and_can_be_undone(tmp_path: Path):
    file = tmp_path / "loras.json"
    reg = Registry(file)
    reg.add_version(version("r", "r1", "router", ("a", "b")))
    reg.add_version(version("r", "r2", "router", ("a", "b")))
    reg.add_version(version("r", "r3", "router", ("a", "b")), activate=False)
    reg.remove("r")
    data = json.loads(file.read_text())
    entry = data["adapters"]["r"]
    assert [v["version"] for v in entry["versions"]] == [1, 2, 3]
    assert entry["active_version"] is None and entry["removed_version"] == 2 and entry["removed_at"]
    assert {v["status"] for v in entry["versions"]} == {"retired"}  # the candidate is not shadowed either
    assert data["active_router"] is None and reg.load().router() is None
    before = file.read_text()
    reg.remove("r")  # a second removal changes nothing
    assert file.read_text() == before
    assert reg.restore("r").version == 2  # the version that was active
    snap = reg.load()
    assert snap.router().path == "r2" and snap.active_router == "r" and not snap.entries["r"].removed
    with pytest.raises(ConflictError):
        reg.restore("r")  # not removed: a version must be named
    reg.remove("r")
    assert reg.activate("r", 1).version == 1  # activating any version restores too
    reg.remove("r")
    assert reg.activate("r").version == 1  # and so does a rollback without a version: the one active at removal
    with pytest.raises(AdapterNotFoundError):
        reg.restore("nope")


def test_a_withdrawn_first_version_keeps_its_number(tmp_path: Path):
    reg = Registry(tmp_path / "loras.json")
    first = reg.add_version(version("a", "a1"))
    reg.withdraw("a", first.version)
    with pytest.raises(AdapterNotFoundError):
        reg.load().task("a")
    assert reg.load().entries["a"].versions[0].status == "failed"
    assert reg.add_version(version("a", "a2")).version == 2


def test_candidate_then_activate(tmp_path: Path):
    """The registration path the service uses: add as a candidate, load it, then activate it."""
    reg = Registry(tmp_path / "loras.json")
    cand = reg.add_version(version("a", "a1"), activate=False)
    assert cand.status == "candidate"
    with pytest.raises(AdapterNotFoundError):
        reg.load().task("a")  # a new name's candidate serves nothing yet
    assert reg.activate("a", cand.version).status == "active"
    assert reg.load().task("a").path == "a1"
    second = reg.add_version(version("a", "a2"), activate=False)
    assert reg.load().task("a").path == "a1"  # the active version keeps serving meanwhile
    reg.activate("a", second.version)
    assert [v.status for v in reg.load().entries["a"].versions] == ["retired", "active"]
    router = reg.add_version(version("r", "r1", "router", ("a", "b")), activate=False)
    assert reg.load().router() is None
    reg.activate("r", router.version)
    assert reg.load().router().path == "r1"


def test_revision_counts_writes_and_old_files_still_load(tmp_path: Path):
    file = tmp_path / "loras.json"
    old = {"format": 2, "active_router": None, "adapters": {
        "a": {"kind": "task", "active_version": 2, "versions": [
            {"version": 1, "path": "a1", "status": "retired"}, {"version": 2, "path": "a2", "status": "active"}]},
    }}
    file.write_text(json.dumps(old))
    reg = Registry(file)
    snap = reg.load()
    assert snap.revision == 2 and snap.entries["a"].next_version == 3  # computed from the versions
    reg.add_version(version("b"))
    data = json.loads(file.read_text())
    assert data["revision"] == 3 and data["adapters"]["a"]["next_version"] == 3
    reg.remove("a")
    assert json.loads(file.read_text())["revision"] == 4
    # the number survives even if the versions themselves are edited out of the file by hand
    data = json.loads(file.read_text())
    data["adapters"]["a"]["versions"] = []
    file.write_text(json.dumps(data))
    assert reg.add_version(version("a", "a9")).version == 3
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps({"lights": "/l", "router": "/r"}))
    assert Registry(seed).load().task("lights").version == 1


def test_cli_remove_keeps_versions_and_restore_brings_them_back(tmp_path: Path):
    file = tmp_path / "loras.json"
    reg = Registry(file)
    reg.add_version(version("alpha", "a1"))
    reg.add_version(version("alpha", "a2"))
    env = {"LORAMUX_REGISTRY": str(file), "PATH": ""}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "loramux", "adapters", *args], capture_output=True,
                              text=True, env=env, timeout=120)

    removed = cli("remove", "alpha", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert "restore" in removed.stdout
    entry = reg.load().entries["alpha"]
    assert entry.removed and [v.version for v in entry.versions] == [1, 2]
    restored = cli("restore", "alpha")
    assert restored.returncode == 0 and "version 2 is active" in restored.stdout, restored.stderr
    assert reg.load().task("alpha").path == "a2"


def test_vllm_lora_ids_come_from_one_process_wide_counter(tmp_path: Path):
    """Every engine handle takes its vLLM id from the one counter: never handed out twice, stable per
    (name, version, folder), and the vLLM engine asks for nothing else."""
    from service.engine import base, vllm_engine

    settings = Settings(registry=tmp_path / "r.json", adapter_root=tmp_path, cache_dir=tmp_path)
    model = type("Base", (), {"path": tmp_path, "name": "m", "sha256": ""})()
    monkey = pytest.MonkeyPatch()
    monkey.setattr(vllm_engine, "_vision_language", lambda base: False)
    try:
        engine = vllm_engine.VLLMEngine(settings, model)
    finally:
        monkey.undo()
    v1 = AdapterRef("delta", 1, tmp_path / "delta-1")
    ids = {v1.lora_id, AdapterRef("delta", 2, tmp_path / "delta-2").lora_id,
           AdapterRef("other", 1, tmp_path / "other").lora_id,
           AdapterRef("delta", 1, tmp_path / "delta-again").lora_id}  # same name@1, other weights
    assert len(ids) == 4  # never handed out twice
    assert AdapterRef("delta", 1, tmp_path / "delta-1").lora_id == v1.lora_id  # stable
    assert base.LORA_IDS.fresh() not in ids
    pytest.importorskip("vllm")
    assert engine.lora_request(v1).lora_int_id == v1.lora_id
