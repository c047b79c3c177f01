"""`make chaos` in miniature (issue 13, "The abuse-and-fault run"): loadtests/chaos.py on the
conftest adapters with a few seconds per phase and one CLI kill, every abuse family on.

It runs the script as `make chaos` does, in a subprocess (it kills processes, a server and a CLI,
that must not share the test's process), and checks the targets a short run can judge: every normal
request answered 200, no 5xx at all, the in-flight gauge back to 0, no acknowledged registration
missing. The p99 ratio is the one target not asserted: over a few seconds of traffic on a shared
two-core machine it measures the neighbours, not the service (`make chaos` reports it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import PROJECT_ROOT

pytestmark = pytest.mark.slow


def test_a_short_chaos_run_meets_the_targets(served_registry: Path, adapter_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    cmd = [sys.executable, "-m", "loadtests.chaos", "--registry", str(served_registry),
           "--adapter-root", str(adapter_root), "--duration", "3", "--rate", "0.5", "--cli-kills", "1",
           "--cli-registrations", "1", "--poll", "0.3", "--settle-s", "30", "--workdir", str(tmp_path),
           "--json", "--out", str(out)]
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.exists(), f"no result (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads(out.read_text())
    context = json.dumps({k: result[k] for k in ("failures", "status_5xx_examples", "notes", "server_log_errors")},
                         indent=1) + json.dumps(result["normal"]["failed"][:5], indent=1)

    assert result["status_5xx"] == 0, context
    normal = result["normal"]
    assert normal["sent"] >= 10 and normal["by_phase"]["abuse"]["sent"] >= 3, normal["by_phase"]
    assert normal["answered_200_pct"] == 100.0, context
    assert result["in_flight_after"] == 0, context
    registrations = result["registrations"]
    assert registrations["acknowledged"] >= 3, registrations["attempts"]  # 2 admin API + 1 CLI, at least
    assert registrations["acknowledged_then_missing"] == 0, registrations["missing"]
    # the abuse did run, and the drain answered every request it had accepted
    assert set(result["abuse"]["by_kind"]) >= {"oversize", "images", "names", "streams", "adapters", "cli"}
    assert result["sigterm"]["answered_200"] == result["sigterm"]["accepted_before_signal"] > 0
    assert result["sigterm"]["exit_code"] == 0
    assert set(result["failures"]) <= {"p99_ratio"}, context
    assert done.returncode == (1 if result["failures"] else 0)
