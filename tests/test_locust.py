"""The 30-second headless Locust run CI keeps: `python -m loadtests.run_locust` (what `make
loadtest` runs) against a demo server (the quick demo's trained experts and router) with API keys,
0 failures."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.live_server import crashes, start_server
from tests.support import PROJECT_ROOT, ServerProcess

KEY = "locust-key"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def load_server(quick_demo, tmp_path_factory) -> Iterator[ServerProcess]:
    settings = quick_demo.settings
    server = start_server(settings.adapter_root, settings.registry, tmp_path_factory.mktemp("locust") / "server.log",
                          api_keys=KEY, admin_api_keys="locust-admin")
    yield server
    server.stop()


def test_30s_headless_locust_run_has_no_failures(load_server: ServerProcess, tmp_path):
    cmd = [sys.executable, "-m", "loadtests.run_locust", "--host", load_server.url, "--users", "4",
           "--run-time", "30s", "--report-dir", str(tmp_path)]
    env = {**os.environ, "LORAMUX_LOADTEST_API_KEY": KEY, "LORAMUX_LOADTEST_MAX_TOKENS": "8"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=PROJECT_ROOT, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    summary = re.search(r"requests/s ([\d.]+)\s+p50 (\d+) ms\s+p95 (\d+) ms\s+p99 (\d+) ms\s+failures (\d+) of (\d+)",
                        output)
    assert summary, output[-3000:]
    print(done.stdout[-4000:])  # the figures, per request type, in the -s / CI log
    assert int(summary.group(5)) == 0 and int(summary.group(6)) > 0
    with (tmp_path / "locust_stats.csv").open(newline="") as handle:
        names = {row["Name"] for row in csv.DictReader(handle)}
    # every kind of traffic ran: routing, routed and pinned generation, routed and pinned streaming chat
    assert {"/route", "/generate [routed]", "/generate [pinned]", "/v1/chat/completions [stream, routed]",
            "/v1/chat/completions [stream, pinned]"} <= names, names
    assert (tmp_path / "locust.html").stat().st_size > 10_000
    assert crashes(load_server) == []
