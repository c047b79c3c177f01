"""`make loadtest`: Locust headless against a running server, then the figures.

    python -m loadtests.run_locust --host http://127.0.0.1:8000 --users 8 --run-time 30s

Runs `loadtests/locustfile.py` in a Locust subprocess (Locust monkey-patches the process it runs
in with gevent, so it gets its own), prints requests/s, p50/p95/p99 and failures per request type
and in total, writes `<report-dir>/locust.html` (and the CSV stats beside it), and exits non-zero
when any request failed or none was made.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

from service.settings import PROJECT_ROOT

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", required=True, help="base URL of a running loramux server")
    parser.add_argument("--users", type=int, default=8, help="concurrent simulated users")
    parser.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all in 1 s)")
    parser.add_argument("--run-time", default="30s", help="how long to run, e.g. 30s, 2m")
    parser.add_argument("--api-key", default=None, help="bearer key (default: LORAMUX_LOADTEST_API_KEY or "
                                                        "the first of LORAMUX_API_KEYS)")
    parser.add_argument("--max-tokens", type=int, default=None, help="max_tokens per generation (default 16)")
    parser.add_argument("--report-dir", type=Path, default=PROJECT_ROOT / "reports", help="HTML and CSV go here")
    return parser.parse_args(argv)


def run_locust(args: argparse.Namespace) -> int:
    args.report_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.api_key:
        env["LORAMUX_LOADTEST_API_KEY"] = args.api_key
    if args.max_tokens:
        env["LORAMUX_LOADTEST_MAX_TOKENS"] = str(args.max_tokens)
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", args.host, "--users", str(args.users), "--spawn-rate", str(args.spawn_rate or args.users),
        "--run-time", args.run_time, "--stop-timeout", "30",
        "--csv", str(args.report_dir / "locust"), "--html", str(args.report_dir / "locust.html"),
    ]
    return subprocess.run(cmd, env=env, cwd=PROJECT_ROOT).returncode


def read_stats(report_dir: Path) -> list[dict[str, str]]:
    with (report_dir / "locust_stats.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def print_figures(rows: list[dict[str, str]]) -> dict[str, float]:
    """One line per request type and the aggregate; returns the aggregate's figures."""
    header = f"{'request':<48} {'reqs':>6} {'fail':>5} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    total: dict[str, float] = {}
    for row in rows:
        label = "TOTAL" if row["Name"] == "Aggregated" else f"{row['Type']} {row['Name']}"
        figures = {
            "requests": float(row["Request Count"]),
            "failures": float(row["Failure Count"]),
            "rps": float(row["Requests/s"]),
            "p50": float(row["50%"]) if row["50%"] not in ("", "N/A") else 0.0,
            "p95": float(row["95%"]) if row["95%"] not in ("", "N/A") else 0.0,
            "p99": float(row["99%"]) if row["99%"] not in ("", "N/A") else 0.0,
        }
        print(f"{label[:48]:<48} {figures['requests']:>6.0f} {figures['failures']:>5.0f} {figures['rps']:>7.2f} "
              f"{figures['p50']:>8.0f} {figures['p95']:>8.0f} {figures['p99']:>8.0f}")
        if row["Name"] == "Aggregated":
            total = figures
    return total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    code = run_locust(args)
    try:
        rows = read_stats(args.report_dir)
    except FileNotFoundError:
        print("locust wrote no statistics", file=sys.stderr)
        return code or 2
    total = print_figures(rows)
    t = {key: total.get(key, 0.0) for key in ("rps", "p50", "p95", "p99", "failures", "requests")}
    print(f"\nrequests/s {t['rps']:.2f}  p50 {t['p50']:.0f} ms  p95 {t['p95']:.0f} ms  p99 {t['p99']:.0f} ms  "
          f"failures {t['failures']:.0f} of {t['requests']:.0f}")
    print(f"report: {args.report_dir / 'locust.html'}")
    if total.get("failures", 0) > 0 or total.get("requests", 0) == 0:
        return code or 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
