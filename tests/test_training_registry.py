"""Registration: validated, atomic under concurrent writers, never half-written, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.base_model import BaseModelInfo
from service.errors import AdapterValidationError
from service.registry import Registry
from service.settings import Settings
from tests.support import PROJECT_ROOT, make_lora_adapter
from training.register.commands import RegistryContext, list_adapters, register_adapter, rollback_adapter

# Registers the adapter at argv[1] as task adapter argv[2], argv[3] times, into $LORAMUX_REGISTRY.
WRITER = """
import sys
from service.adapter_validation import base_modules
from service.base_model import resolve_base_model
from service.settings import Settings
from training.register.commands import RegistryContext, register_adapter
settings = Settings()
base = resolve_base_model(settings.base_model, settings.cache_dir)
context = RegistryContext(settings, base, base_modules(base))
print("ready", flush=True)
for _ in range(int(sys.argv[3])):
    register_adapter("task", sys.argv[2], sys.argv[1], context=context)
"""


def _env(root: Path, registry: Path) -> dict[str, str]:
    return {**os.environ, "LORAMUX_ADAPTER_ROOT": str(root), "LORAMUX_REGISTRY": str(registry),
            "LORAMUX_CACHE_DIR": str(PROJECT_ROOT / ".cache"), "PYTHONPATH": str(PROJECT_ROOT)}


@pytest.fixture(scope="module")
def adapter(base_model: BaseModelInfo, adapter_root: Path) -> Path:
    return make_lora_adapter(base_model, adapter_root / "reg-adapter", seed=11, rank=4)


@pytest.fixture()
def context(base_model: BaseModelInfo, adapter_root: Path, tmp_path: Path) -> RegistryContext:
    from service.adapter_validation import base_modules

    settings = Settings(adapter_root=adapter_root, registry=tmp_path / "loras.json")
    return RegistryContext(settings, base_model, base_modules(base_model))


@pytest.mark.slow
def test_concurrent_registrations_from_several_processes(adapter: Path, adapter_root: Path, tmp_path: Path) -> None:
    registry = tmp_path / "loras.json"
    processes, per_process = 4, 5
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(adapter), name, str(per_process)],
                         env=_env(adapter_root, registry), cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for name in ("shared", "shared", "other", "shared")
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    snapshot = Registry(registry).load()
    shared = snapshot.entries["shared"]
    # no lost update: every registration got its own version number, contiguous, one active
    assert [v.version for v in shared.versions] == list(range(1, 3 * per_process + 1))
    assert shared.active_version == 3 * per_process
    assert [v.status for v in shared.versions].count("active") == 1
    assert [v.version for v in snapshot.entries["other"].versions] == list(range(1, per_process + 1))
    assert not list(tmp_path.glob("*.tmp"))
    assert processes == len(procs)


@pytest.mark.slow
def test_killed_writer_leaves_a_valid_registry(adapter: Path, adapter_root: Path, tmp_path: Path) -> None:
    registry = tmp_path / "loras.json"
    env = _env(adapter_root, registry)
    for delay in (0.05, 0.3, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(adapter), "victim", "1000"], env=env,
                                cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while not registry.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        data = json.loads(registry.read_text())  # a whole JSON document, never half a file
        versions = [v["version"] for v in data["adapters"]["victim"]["versions"]]
        assert versions == list(range(1, len(versions) + 1))
    assert Registry(registry).load().entries["victim"].active is not None


def test_failed_write_keeps_the_previous_registry(context: RegistryContext, adapter: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    register_adapter("task", "steady", adapter, context=context)
    before = context.settings.registry.read_bytes()

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("service.registry.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        register_adapter("task", "steady", adapter, context=context)
    assert context.settings.registry.read_bytes() == before
    assert not list(context.settings.registry.parent.glob("*.tmp"))


def test_validation_refuses_bad_adapters(context: RegistryContext, adapter: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterValidationError, match="outside the adapter root"):
        register_adapter("task", "escape", tmp_path, context=context)
    with pytest.raises(AdapterValidationError, match="must be letters"):
        register_adapter("task", "bad name!", adapter, context=context)
    with pytest.raises(AdapterValidationError, match="at least two labels"):
        register_adapter("router", "lonely-router", adapter, context=context)
    assert not context.settings.registry.exists()


def test_versions_and_rollback(context: RegistryContext, adapter: Path) -> None:
    first = register_adapter("task", "alpha", adapter, description="one", context=context)
    second = register_adapter("task", "alpha", adapter, description="two", context=context)
    assert (first.version, second.version) == (1, 2)
    assert list_adapters(context.settings)[0]["version"] == 2
    assert rollback_adapter("alpha", settings=context.settings).version == 1
    assert Registry(context.settings.registry).load().entries["alpha"].active.description == "one"


def test_cli_register_list_and_errors(adapter: Path, adapter_root: Path, tmp_path: Path) -> None:
    registry = tmp_path / "cli.json"
    env = _env(adapter_root, registry)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "loramux", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    done = cli("register", "--kind", "task", "--name", "gamma", "--path", str(adapter), "--description", "g")
    assert done.returncode == 0, done.stderr
    assert "registered gamma version 1" in done.stdout
    listed = cli("adapters", "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["name"] == "gamma"
    refused = cli("register", "--kind", "task", "--name", "delta", "--path", str(tmp_path))
    assert refused.returncode != 0 and "outside the adapter root" in refused.stderr + refused.stdout
    assert "Traceback" not in refused.stderr
    missing = cli("adapters", "rollback", "gamma")
    assert missing.returncode != 0 and "no earlier version" in missing.stderr + missing.stdout
