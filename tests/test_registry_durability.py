"""The registry survives concurrent writers and `kill -9`: the file is always one whole JSON
document and holds every entry whose registration was acknowledged.

tests/test_training_registry.py already runs concurrent `register_adapter` processes on one name
and kills a writer at fixed delays. These tests add what "acknowledged" means: a writer prints an
ACK only after `add_version` returned (the admin API answers 201 only then), and every ACK must be
in the file after any kill; a reader polls the file during the writes; the writer is killed inside
its write (fsync slowed down to widen that window); and the server itself is killed with -9 while
the admin API registers.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.registry import Registry
from tests.live_server import private_copy, start_server
from tests.support import PROJECT_ROOT

# argv: registry, prefix, count, slow-fsync seconds. Adds `count` task adapters named
# `{prefix}-{i}` (plus a version of "shared" every third) and prints "ACK name" after each returns.
WRITER = """
import os, sys, time
from service.registry import AdapterVersion, Registry
registry, prefix, count, slow = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
if slow:
    real_fsync = os.fsync
    def fsync(fd):
        time.sleep(slow)
        real_fsync(fd)
    os.fsync = fsync
reg = Registry(registry)
print("ready", flush=True)
for i in range(count):
    name = f"{prefix}-{i}"
    reg.add_version(AdapterVersion(name=name, kind="task", version=0, path=name))
    print("ACK", name, flush=True)
    if i % 3 == 0:
        v = reg.add_version(AdapterVersion(name="shared", kind="task", version=0, path=name))
        print("ACK", f"shared@{v.version}", flush=True)
"""

# argv: registry, seconds. Parses the file as fast as it can; prints how often, or the first failure.
READER = """
import json, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
end, reads = time.monotonic() + seconds, 0
while time.monotonic() < end:
    try:
        with open(path) as handle:
            text = handle.read()
    except FileNotFoundError:
        continue
    try:
        json.loads(text)
    except ValueError as exc:
        print("INVALID", exc, repr(text[:200]), flush=True)
        sys.exit(1)
    reads += 1
print("reads", reads, flush=True)
"""


def spawn(script: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=PROJECT_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})


def acks(output: str) -> list[str]:
    return [line.split()[1] for line in output.splitlines() if line.startswith("ACK ")]


def check_holds(registry: Path, acknowledged: list[str]) -> dict:
    """The file parses, and every acknowledged name (and `shared@version`) is in it."""
    data = json.loads(registry.read_text())
    adapters = data["adapters"]
    for ack in acknowledged:
        name, _, version = ack.partition("@")
        assert name in adapters, f"acknowledged {ack} was lost"
        if version:
            assert int(version) in [v["version"] for v in adapters[name]["versions"]], f"acknowledged {ack} lost"
    return data


def test_concurrent_writers_lose_nothing_and_a_reader_never_sees_half_a_file(tmp_path: Path):
    registry = tmp_path / "loras.json"
    reader = spawn(READER, registry, 8)
    writers = [spawn(WRITER, registry, f"p{k}", 15, 0) for k in range(6)]
    outputs = [w.communicate(timeout=120) for w in writers]
    for writer, (_, err) in zip(writers, outputs, strict=True):
        assert writer.returncode == 0, err[-2000:]
    acknowledged = [ack for out, _ in outputs for ack in acks(out)]
    assert len(acknowledged) == 6 * (15 + 5)
    data = check_holds(registry, acknowledged)
    assert len(data["adapters"]) == 6 * 15 + 1
    shared = data["adapters"]["shared"]
    # no lost update: 30 concurrent versions of one name got 30 distinct, contiguous numbers
    assert [v["version"] for v in shared["versions"]] == list(range(1, 31))
    assert [v["status"] for v in shared["versions"]].count("active") == 1
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, out + err
    assert int(out.split()[-1]) > 0
    assert not list(tmp_path.glob("*.tmp"))


def test_kill_9_inside_a_write_keeps_every_acknowledged_entry(tmp_path: Path):
    registry = tmp_path / "loras.json"
    acknowledged: list[str] = []
    rng = random.Random(8)
    mid_write = 0
    for round_ in range(10):
        # fsync sleeps 30 ms: the kill lands inside a write (temp file written, not yet renamed)
        # about half the time
        writer = spawn(WRITER, registry, f"r{round_}", 1000, 0.03)
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        time.sleep(0.2 + rng.random() * 0.5)
        writer.send_signal(signal.SIGKILL)
        out, _ = writer.communicate(timeout=30)  # what it printed before dying: its ACKs
        acknowledged += acks(out)
        mid_write += bool(list(tmp_path.glob("*.tmp")))  # killed between temp file and rename
        check_holds(registry, acknowledged)
    assert len(acknowledged) > 10 and mid_write >= 1
    # the dead writers' lock is free (flock dies with its process) and their temp files are swept
    started = time.monotonic()
    writer = spawn(WRITER, registry, "after", 1, 0)
    out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0 and time.monotonic() - started < 30, err
    check_holds(registry, [*acknowledged, *acks(out)])
    assert not list(tmp_path.glob("*.tmp"))
    shared = Registry(registry).load().entries["shared"]
    assert [v.version for v in shared.versions] == list(range(1, len(shared.versions) + 1))


@pytest.mark.slow
def test_kill_9_of_the_server_during_admin_registrations(served_registry, adapter_root, tmp_path: Path):
    """Acknowledged = answered 201 by the admin API. Kill the server mid-stream of registrations."""
    root, registry = private_copy(served_registry, adapter_root, tmp_path / "root")
    server = start_server(root, registry, tmp_path / "server.log", admin_api_keys="admin", api_keys="user")
    acknowledged: list[str] = []
    errors: list[str] = []

    def register() -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer admin"}, timeout=30) as client:
            for i in range(1000):
                name = f"reg-{i}"
                try:
                    r = client.post("/admin/adapters", json={"name": name, "path": "alpha"})
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code != 201:
                    errors.append(r.text)
                    return
                acknowledged.append(name)

    client = threading.Thread(target=register, daemon=True)
    try:
        client.start()
        assert wait_until(lambda: len(acknowledged) >= 3, 60)
        time.sleep(random.Random(3).random())
        assert server.proc is not None
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=30)
        client.join(timeout=60)
    finally:
        server.stop()
    assert errors == []
    data = check_holds(registry, acknowledged)
    assert {"alpha", "beta", "gamma", "router"} <= set(data["adapters"])
    snapshot = Registry(registry).load()
    assert all(snapshot.entries[name].active is not None for name in acknowledged)


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
