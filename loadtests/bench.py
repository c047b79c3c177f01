"""`make bench`: the picture a user sizes hardware from, measured in one run on this machine, one server
at a time so that no two share the cores.

The matrix (`bench_grid`): concurrency 1, 16 and 64 x 32 and 256 new tokens x 3 and 12 adapters mixed
(and the base model on the same server, for LoRA's cost), each point streamed through
`/v1/chat/completions` for output tok/s, requests/s, TTFT and time per output token (p50, p99)
(`bench_load`), against:

- our service on the embedded engine and on vLLM (`loramux serve`, the adapters pinned by name), plus
  its routing figures (`bench_routing`) and the realistic row (`bench_realistic`: the demo's trained
  experts on their own eval requests, pinned and routed);
- vLLM's own OpenAI server on the same adapters, and without LoRA (`bench_vllm`);
- the seed's one-at-a-time `set_adapter` serving and the base model batched with `generate`, and the
  machine's matrix-multiply peak (`bench_reference`).

It prints the tables, the ratios against issue 17's targets and the fraction of the peak the embedded
engine's decoding reaches (`bench_report`), and writes reports/bench.json (rewritten after every
section, so an interrupted run keeps what it measured) and reports/bench.png. About an hour with vLLM
(`--engine hf`: about 20 minutes); `--quick` runs the same code on a tiny grid in a minute or two.
The benchmark builds its own adapters (random LoRA weights, `loadtests.harness`), and reads the demo's
for the realistic row.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from loadtests.bench_grid import ADAPTERS, FULL, MORE_ADAPTERS, QUICK, Grid, measure_grid
from loadtests.bench_realistic import DemoSet, demo_set, measure_realistic
from loadtests.bench_reference import matmul_peak_gflops, reference_figures
from loadtests.bench_report import peak_fraction, print_report, ratios, verdicts, write_png
from loadtests.bench_routing import label_set_latency, routing_latency
from service.base_model import BaseModelInfo, resolve_base_model
from service.registration import register_adapter
from service.settings import PROJECT_ROOT, Settings

CACHE_DIR = PROJECT_ROOT / ".cache"
# vLLM: 12 adapters and the router, KV for 64 x 300 tokens; a deadline past the longest point (64 x 256 tokens
# take about two minutes here, over the 120 s default)
SERVICE_ENV = {"LORAMUX_MAX_LORAS": "14", "LORAMUX_KV_CACHE_GB": "2.0", "LORAMUX_REQUEST_TIMEOUT_S": "1800"}


def make_adapters(base: BaseModelInfo, root: Path) -> dict[str, Path]:
    from loadtests.harness import make_lora_adapter

    paths = {name: make_lora_adapter(base, root / name, seed=i + 1, scale=0.5)
             for i, name in enumerate((*ADAPTERS, *MORE_ADAPTERS))}
    paths["router"] = make_lora_adapter(base, root / "router", seed=99, scale=3.0)
    return paths


def service(env: dict[str, str], log: Path) -> Any:
    from loadtests.harness import ServerProcess

    return ServerProcess({"LORAMUX_CACHE_DIR": str(CACHE_DIR), **SERVICE_ENV, **env},
                         startup_timeout=900).start(log)


def measure_service(base: BaseModelInfo, root: Path, engine: str, grid: Grid, quick: bool,
                    demo: DemoSet | None) -> dict[str, Any]:
    """Our service on `engine`: the matrix (base model, 3 and 12 adapters), routing, the label sets
    (each on a server of its own) and the realistic row (on the demo's registry)."""
    registry = root / f"loras-{engine}.json"
    settings = Settings(registry=registry, adapter_root=root, cache_dir=CACHE_DIR)
    for name in (*ADAPTERS, *MORE_ADAPTERS):
        register_adapter(settings, base, "task", name, root / name)
    register_adapter(settings, base, "router", "router", root / "router", labels=ADAPTERS)
    label = f"service ({engine})"
    section: dict[str, Any] = {}
    server = service({"LORAMUX_REGISTRY": str(registry), "LORAMUX_ADAPTER_ROOT": str(root),
                      "LORAMUX_ENGINE": engine}, root / f"server-{engine}.log")
    try:
        section["grid"] = measure_grid(server.url, base.name, grid, ["base", *grid.mixes], label)
        concurrency = grid.concurrency
        section["routing"] = asyncio.run(routing_latency(server.url, rounds=2 if quick else 8,
                                                         concurrency=concurrency))
    finally:
        server.stop()
    if demo is not None:
        server = service({"LORAMUX_REGISTRY": str(demo.registry), "LORAMUX_ADAPTER_ROOT": str(demo.root),
                          "LORAMUX_ENGINE": engine}, root / f"server-{engine}-demo.log")
        try:
            section["realistic"] = {"pinned": measure_realistic(server.url, demo, False, label),
                                    "routed": measure_realistic(server.url, demo, True, label)}
        finally:
            server.stop()
    if not quick:
        section["label_sets"] = label_set_latency(base, root, engine, CACHE_DIR)
    return section


def measure_vllm_servers(base: BaseModelInfo, root: Path, paths: dict[str, Path], grid: Grid,
                         demo: DemoSet | None) -> dict[str, Any]:
    """vLLM's own server with the benchmark's 12 adapters (the 3 and 12 mixes), with the demo's experts
    (the realistic row, pinned: it cannot route), and without LoRA (every point on the base model)."""
    from loadtests.bench_vllm import vllm_server

    out: dict[str, Any] = {}
    adapters = {name: paths[name] for name in (*ADAPTERS, *MORE_ADAPTERS)}
    with vllm_server(base, root / "vllm-server-lora.log", adapters) as url:
        out["vllm_server_lora"] = {"grid": measure_grid(url, base.name, grid, grid.mixes, "vLLM server, LoRA")}
    if demo is not None:
        with vllm_server(base, root / "vllm-server-demo.log", demo.paths, max_lora_rank=demo.max_rank) as url:
            out["vllm_server_lora"]["realistic"] = {"pinned": measure_realistic(url, demo, False, "vLLM server")}
    with vllm_server(base, root / "vllm-server-base.log") as url:
        out["vllm_server_base"] = {"grid": measure_grid(url, base.name, grid, ["base"], "vLLM server, no LoRA",
                                                        every_point=True)}
    return out


def finish(results: dict[str, Any], out: Path) -> None:
    """Ratios, verdicts and the peak fraction from what is measured so far; JSON written."""
    results["ratios"] = verdicts(ratios(results))
    results["peak_fraction"] = peak_fraction(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


def main() -> None:
    have_vllm = importlib.util.find_spec("vllm") is not None
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["hf", "vllm", "all"], default="all" if have_vllm else "hf")
    parser.add_argument("--quick", action="store_true", help="a tiny grid, no label sets: checks the benchmark")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "reports" / "bench.json")
    parser.add_argument("--demo-registry", type=Path, default=Settings().registry,
                        help="the demo's registry, for the realistic row (skipped when absent)")
    parser.add_argument("--demo-root", type=Path, default=PROJECT_ROOT, help="the demo's adapter root")
    args = parser.parse_args()
    grid = QUICK if args.quick else FULL
    engines = ["hf", "vllm"] if args.engine == "all" else [args.engine]
    base = resolve_base_model("smollm2", CACHE_DIR)
    # --quick: two requests per expert, short answers (a quick demo's experts may not stop on their own)
    demo = demo_set(args.demo_registry, args.demo_root, *((2, 24) if args.quick else ()))
    if demo is None:
        print(f"realistic row skipped: no demo at {args.demo_registry} (`loramux demo` builds it)")
    results: dict[str, Any] = {"machine": {
        "cores": len(os.sched_getaffinity(0)),
        "peak_gflops_float32": matmul_peak_gflops("float32"),
        "peak_gflops_bfloat16": matmul_peak_gflops("bfloat16"),
    }}
    with tempfile.TemporaryDirectory(prefix="loramux-bench-") as tmp:
        root = Path(tmp)
        paths = make_adapters(base, root)
        results["reference"] = reference_figures(base, paths, grid, demo)
        finish(results, args.out)
        for engine in engines:
            results[f"service_{engine}"] = measure_service(base, root, engine, grid, args.quick, demo)
            finish(results, args.out)
        if "vllm" in engines:
            results.update(measure_vllm_servers(base, root, paths, grid, demo))
            finish(results, args.out)
    print_report(results)
    png = write_png(results, args.out.with_suffix(".png"))
    print(f"\nwritten: {args.out}, {png}")


if __name__ == "__main__":  # vLLM spawns its engine processes, which re-import the main module
    main()
