"""The build status: what a live builder will register soon, and never a claim from a dead one.

The real path (a `loramux demo --serve` feeding a real server) is `test_training_demo.py`; these
are the rules around it, where a mistake would leave a service answering "being built" forever,
or crash it on a file it does not own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from service.build_status import (
    STALE_AFTER_S,
    BuildStatusReader,
    BuildStatusWriter,
    Pending,
    parse,
    status_path,
)


def test_a_live_builder_is_seen_until_each_name_is_registered_and_the_file_is_gone(tmp_path: Path) -> None:
    path = status_path(tmp_path / "loras.json")
    assert path.name == "loras.building.json"
    reader = BuildStatusReader(path)
    assert reader.current() is None and reader.still_building("x", "lights") is None
    writer = BuildStatusWriter(path, {"router": "router", "lights": "task", "timer": "task"}, stage_total=5)
    try:
        writer.stage(2, "router over lights, timer", {"router": 60, "lights": 200, "timer": 340})
        state = reader.current()
        assert state is not None and state.stage_index == 2 and set(state.pending) == {"router", "lights", "timer"}
        assert reader.pending(kind="router")[0].name == "router"
        error = reader.still_building("adapter 'timer'", "timer", param="model")
        assert error is not None and error.status_code == 503 and error.param == "model"
        assert 300 > int(error.headers["Retry-After"]) >= 5 and "stage 2 of 5" in error.message
        writer.registered("router")  # until a service has loaded it, it is still coming, in a moment
        router = reader.pending(kind="router")[0]
        assert router.registered and router.retry_after() == 2 and not reader.pending("lights")[0].registered
    finally:
        writer.close()
    assert not path.exists() and reader.current() is None


def test_a_dead_or_silent_builder_builds_nothing(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    now = time.time()
    status = {"pid": int(gone.stdout), "host": socket.gethostname(), "updated": now, "stage": "expert timer",
              "stage_index": 3, "stage_total": 9, "pending": {"timer": {"kind": "task", "ready_at": now + 60}}}
    assert parse(status) is None  # killed with -9: its file stayed behind, its process did not
    assert parse({**status, "pid": os.getpid()}) is not None
    assert parse({**status, "pid": os.getpid(), "updated": now - STALE_AFTER_S - 1}) is None  # no heartbeat
    # on another host (a shared volume) only the heartbeat can tell
    assert parse({**status, "host": "elsewhere"}) is not None


def test_a_malformed_status_file_is_ignored_never_raised(tmp_path: Path) -> None:
    path = tmp_path / "loras.building.json"
    reader = BuildStatusReader(path)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "updated": time.time()}
    for content in ("{not json", "[]", json.dumps({**mine, "pending": "lights"}),
                    json.dumps({**mine, "pending": {"lights": {"ready_at": "soon"}}}), json.dumps({"pid": "x"})):
        path.write_text(content)
        os.utime(path, ns=(time.time_ns(), time.time_ns()))
        assert reader.current() is None, content


def test_retry_after_is_bounded_and_follows_the_estimate() -> None:
    now = 1000.0
    assert Pending("a", "task", None).retry_after(now) == 30
    assert Pending("a", "task", now + 42).retry_after(now) == 42
    assert Pending("a", "task", now - 100).retry_after(now) == 5  # late: ask again soon
    assert Pending("a", "task", now + 3600).retry_after(now) == 120
