"""Onboarding figures on a live demo service: the time from `loramux onboard` to the first request
the new expert serves through routing, and how often the candidate router agrees with the active
one in shadow routing over the combined eval split.

Run it on a copy of a demo adapter root (it registers adapters and switches the active router):

    cp -a config datasets runs /tmp/demo_copy/   # after `loramux demo`
    python -m loadtests.onboard_timing --root /tmp/demo_copy --expert robots

Steps, with one server running the whole time (shadow fraction 1): build the expert's dataset,
`loramux onboard --train --no-promote` (expert training, routing dataset, warm-started router,
evaluation of both routers), every combined eval example through /route (the candidate shadows),
`loramux router promote`, then routed /generate requests until one is served by the new expert.
The server gets one thread (`OMP_NUM_THREADS=1`), the CLI the rest: on a small machine that is
what a co-located operator would do; two processes spinning on all cores slow each other down
many times over.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from loadtests.harness import ServerProcess
from service.settings import PROJECT_ROOT
from training.data.chats import read_chats
from training.data.task_datasets import build_task_datasets


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "loramux", *args], env={**os.environ, **env},
                          capture_output=True, text=True, cwd=PROJECT_ROOT)
    if done.returncode != 0:
        raise SystemExit(f"loramux {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def _agreed(client: httpx.Client) -> int:
    return sum(stats["agreed"] for stats in client.get("/admin/routers").json()["shadow"].values())


def _shadow_pass(url: str, eval_file: Path, expert: str) -> dict[str, object]:
    """Every eval example through /route; the server counts agreement, split here by gold label
    (the active router cannot name the new expert, so agreement on the old experts is the figure)."""
    agree: Counter[str] = Counter()
    total: Counter[str] = Counter()
    with httpx.Client(base_url=url, timeout=120) as client:
        agreed = _agreed(client)
        for record in read_chats(eval_file):
            group = "new" if record.messages[-1]["content"].strip() == expert else "old"
            client.post("/route", json={"prompt": record.user_text}).raise_for_status()
            now = _agreed(client)
            agree[group], total[group], agreed = agree[group] + now - agreed, total[group] + 1, now
        stats = client.get("/admin/routers").json()["shadow"]
    return {group: f"{agree[group]}/{total[group]} = {agree[group] / max(total[group], 1):.1%}"
            for group in ("old", "new")} | {"server_stats": stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="a copy of a demo adapter root (config/loras.json)")
    parser.add_argument("--expert", default="robots")
    parser.add_argument("--per-expert", type=int, default=400)
    parser.add_argument("--expert-steps", type=int, default=40)
    parser.add_argument("--router-steps", type=int, default=80)
    args = parser.parse_args()
    root = args.root.resolve()
    env = {"LORAMUX_REGISTRY": str(root / "config" / "loras.json"), "LORAMUX_ADAPTER_ROOT": str(root),
           "LORAMUX_CACHE_DIR": str(PROJECT_ROOT / ".cache"), "LORAMUX_REGISTRY_POLL_S": "0.5",
           "LORAMUX_SHADOW_FRACTION": "1.0"}
    dataset = build_task_datasets(root / "datasets" / "onboard", (args.expert,), args.per_expert, seed=0)[args.expert]
    server = ServerProcess({**env, "OMP_NUM_THREADS": "1"}, startup_timeout=600).start(root / "onboard_server.log")
    try:
        started = time.perf_counter()
        out = _cli(env, "onboard", "--name", args.expert, "--dataset", str(dataset.path), "--train",
                   "--expert-steps", str(args.expert_steps), "--router-steps", str(args.router_steps), "--no-promote")
        onboarded = time.perf_counter()
        print(out.strip())
        report = json.loads(Path(out.split("report: ")[1].strip()).read_text())
        shadow = _shadow_pass(server.url, Path(report["routing_dataset"]) / "eval.jsonl", args.expert)
        shadowed = time.perf_counter()
        print(_cli(env, "router", "promote").strip())
        promoted = time.perf_counter()
        probe = read_chats(dataset.path / "eval.jsonl", need_assistant=False)[0].user_text
        while True:
            body = httpx.post(f"{server.url}/generate", json={"prompt": probe, "max_tokens": 8}, timeout=120).json()
            if body.get("adapter") == args.expert:
                break
            time.sleep(0.2)
        served = time.perf_counter()
    finally:
        server.stop()
    steps = report["seconds"]
    print(f"onboard command: {onboarded - started:.1f}s "
          f"({', '.join(f'{k} {v:.1f}s' for k, v in steps.items())})")
    print(f"candidate accuracy {report['candidate_report']['accuracy']:.4f}, active accuracy "
          f"{report['active_report']['accuracy']:.4f} (on the combined eval split; the active router "
          f"cannot name {args.expert})")
    print(f"shadow agreement over the combined eval split: old experts {shadow['old']}, "
          f"{args.expert} {shadow['new']} ({shadowed - onboarded:.1f}s)")
    print(f"promote -> first request served by {args.expert}: {served - promoted:.2f}s")
    print(f"onboard start -> first routed request served by {args.expert} (without the shadow pass): "
          f"{(onboarded - started) + (served - promoted):.1f}s")


if __name__ == "__main__":
    main()
