"""The benchmark's report: the matrix as tables, the ratios issue 17 sets targets for (each with its
target and whether this run met it), the fraction of the measured matrix-multiply peak the embedded
engine's decoding reaches, and a PNG of throughput and time per output token against concurrency.

`results` is the JSON `make bench` writes: `machine`, `reference` (seed, base model batched, FLOPs per
token), and one section per server (`service_hf`, `service_vllm`, `vllm_server_lora`,
`vllm_server_base`), each with its `grid` of points (`c16_t32_3`: concurrency 16, 32 new tokens, 3
adapters mixed; mix `base` is the base model on the same server) and, for our service, `routing`,
`label_sets` and `realistic`."""

from __future__ import annotations

import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

Results = dict[str, Any]
# name -> (comparison, bound): ">=" or "<=" the bound
TARGETS: dict[str, tuple[str, float]] = {
    "service_hf_over_seed_c16_t32": (">=", 10.0),
    "realistic_hf_pinned_over_seed": (">=", 8.0),
    "realistic_hf_routed_over_seed": (">=", 8.0),
    "hf_over_vllm_server_lora_c16_t32": (">=", 1.5),
    "hf_over_vllm_server_lora_c64_t32": (">=", 1.5),
    "hf_over_vllm_server_nolora_c16_t32": (">=", 1.0),
    "hf_over_vllm_server_nolora_c64_t32": (">=", 1.0),
    "lora_3_over_base_hf_c16_t32": (">=", 0.9),
    "lora_3_over_base_vllm_c16_t32": (">=", 0.9),
    "lora_12_over_3_hf_c16_t32": (">=", 0.9),
    "lora_12_over_3_vllm_c16_t32": (">=", 0.9),
    "tok_s_256_over_32_hf_c16": (">=", 0.9),
    "tok_s_256_over_32_vllm_c16": (">=", 0.9),
    "auto_over_pinned_hf_c1": ("<=", 1.15),
    "auto_over_pinned_hf_c16": ("<=", 1.10),
    "auto_over_pinned_hf_c64": ("<=", 1.10),
    "auto_over_pinned_vllm_c1": ("<=", 1.15),
    "auto_over_pinned_vllm_c16": ("<=", 1.10),
    "auto_over_pinned_vllm_c64": ("<=", 1.10),
    "service_vllm_over_vllm_server_min": (">=", 0.9),
    **{f"route_over_1token_{s}_{e}": ("<=", 1.2) for e in ("hf", "vllm") for s in ("distinct", "shared", "many")},
}
ENGINES = {"hf": "service_hf", "vllm": "service_vllm"}


def _tok_s(results: Results, section: str, point: str) -> float | None:
    return results.get(section, {}).get("grid", {}).get(point, {}).get("tok_s")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(results: Results) -> dict[str, float]:
    """Every ratio the run has the figures for."""
    out: dict[str, float | None] = {}
    seed = results.get("reference", {}).get("seed", {})
    out["service_hf_over_seed_c16_t32"] = _ratio(_tok_s(results, "service_hf", "c16_t32_3"),
                                                 seed.get("t32", {}).get("tok_s"))
    for mode in ("pinned", "routed"):
        real = results.get("service_hf", {}).get("realistic", {}).get(mode, {})
        out[f"realistic_hf_{mode}_over_seed"] = _ratio(real.get("tok_s"), seed.get("realistic", {}).get("tok_s"))
    for c in (16, 64):
        ours = _tok_s(results, "service_hf", f"c{c}_t32_3")
        out[f"hf_over_vllm_server_lora_c{c}_t32"] = _ratio(ours, _tok_s(results, "vllm_server_lora", f"c{c}_t32_3"))
        out[f"hf_over_vllm_server_nolora_c{c}_t32"] = _ratio(ours, _tok_s(results, "vllm_server_base",
                                                                          f"c{c}_t32_base"))
    for engine, section in ENGINES.items():
        out[f"lora_3_over_base_{engine}_c16_t32"] = _ratio(_tok_s(results, section, "c16_t32_3"),
                                                           _tok_s(results, section, "c16_t32_base"))
        out[f"lora_3_over_base_{engine}_c64_t32"] = _ratio(_tok_s(results, section, "c64_t32_3"),
                                                           _tok_s(results, section, "c64_t32_base"))
        out[f"lora_12_over_3_{engine}_c16_t32"] = _ratio(_tok_s(results, section, "c16_t32_12"),
                                                         _tok_s(results, section, "c16_t32_3"))
        out[f"tok_s_256_over_32_{engine}_c16"] = _ratio(_tok_s(results, section, "c16_t256_3"),
                                                        _tok_s(results, section, "c16_t32_3"))
        real = results.get(section, {}).get("realistic", {})
        out[f"realistic_{engine}_routed_over_pinned"] = _ratio(real.get("routed", {}).get("tok_s"),
                                                               real.get("pinned", {}).get("tok_s"))
        out[f"realistic_{engine}_pinned_over_vllm_server"] = _ratio(
            real.get("pinned", {}).get("tok_s"),
            results.get("vllm_server_lora", {}).get("realistic", {}).get("pinned", {}).get("tok_s"))
        routing = results.get(section, {}).get("routing", {})
        for c in (1, 16, 64):
            out[f"auto_over_pinned_{engine}_c{c}"] = routing.get(f"auto_over_pinned_c{c}")
        for key, value in results.get(section, {}).get("label_sets", {}).items():
            if key.startswith("route_over_1token_"):
                out[f"{key}_{engine}"] = value
    ours_vllm = results.get("service_vllm", {}).get("grid", {})
    theirs = results.get("vllm_server_lora", {}).get("grid", {})
    per_point = {p: ours_vllm[p]["tok_s"] / theirs[p]["tok_s"] for p in ours_vllm if p in theirs}
    if per_point:
        out["service_vllm_over_vllm_server_min"] = min(per_point.values())
        out.update({f"service_vllm_over_vllm_server_{p}": v for p, v in per_point.items()})
    return {k: v for k, v in out.items() if v is not None}


def peak_fraction(results: Results) -> dict[str, float]:
    """Fraction of the float32 matrix-multiply peak the embedded engine's decoding reaches at each point:
    tokens/s x FLOPs per token (`bench_reference.decode_flops_per_token`) over the measured peak."""
    peak = results.get("machine", {}).get("peak_gflops_float32")
    flops = results.get("reference", {}).get("flops_per_token", {})
    out = {}
    for point, figures in results.get("service_hf", {}).get("grid", {}).items():
        per_token = flops.get(point.split("_")[1])  # "t32"
        if peak and per_token:
            out[point] = figures["tok_s"] * per_token / (peak * 1e9)
    return out


def verdicts(values: dict[str, float]) -> dict[str, dict[str, Any]]:
    compare: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le}
    out = {}
    for name, value in values.items():
        target = TARGETS.get(name)
        out[name] = {"value": round(value, 3), "target": f"{target[0]} {target[1]}" if target else "",
                     "met": compare[target[0]](value, target[1]) if target else None}
    return out


def print_report(results: Results) -> None:
    for section, body in results.items():
        grid = body.get("grid") if isinstance(body, dict) else None
        if not grid:
            continue
        print(f"\n== {section}: the matrix ==")
        print(f"{'point':<16}{'tok/s':>9}{'req/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}")
        for point, f in grid.items():
            cells = [f.get(k) for k in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")]
            print(f"{point:<16}{f['tok_s']:>9.1f}{f['req_s']:>8.2f}"
                  + "".join(f"{c:>10.1f}" if c is not None else f"{'-':>10}" for c in cells))
    reference = results.get("reference", {})
    if reference:
        print("\n== references (tok/s) ==")
        for point, f in reference.get("base_batched", {}).items():
            print(f"base model batched {point:<12}{f['tok_s']:>9.1f}")
        for point, f in reference.get("seed", {}).items():
            print(f"seed one at a time {point:<12}{f['tok_s']:>9.1f}  (the same at every concurrency)")
    for section in (*ENGINES.values(), "vllm_server_lora"):
        for mode, f in results.get(section, {}).get("realistic", {}).items():
            print(f"{section} realistic {mode:<7}{f['tok_s']:>9.1f} tok/s  {f['req_s']:.2f} req/s  "
                  f"TTFT p50 {f['ttft_p50_ms']:.0f} ms")
    machine = results.get("machine", {})
    fractions = results.get("peak_fraction", {})
    if fractions:
        best = max(fractions, key=fractions.__getitem__)
        print(f"\n== matmul peak: {machine.get('peak_gflops_float32', 0):.0f} GFLOP/s float32, "
              f"{machine.get('peak_gflops_bfloat16', 0):.0f} bfloat16 ==")
        print(f"embedded engine decoding reaches {100 * fractions[best]:.1f}% of the float32 peak at {best} "
              f"({', '.join(f'{p} {100 * v:.1f}%' for p, v in fractions.items() if p.endswith('_3'))})")
    print("\n== ratios against the targets ==")
    print(f"{'figure':<44}{'value':>8}  {'target':<8} met")
    for name, v in results.get("ratios", {}).items():
        if v["target"] or not name.startswith("service_vllm_over_vllm_server_c"):
            met = {True: "yes", False: "NO", None: ""}[v["met"]]
            print(f"{name:<44}{v['value']:>8.2f}  {v['target']:<8} {met}")


def write_png(results: Results, path: Path) -> Path:
    """Throughput and time per output token (p50) against concurrency: one line per server and mix,
    one column per answer length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({int(p.split("_")[1][1:]) for body in results.values() if isinstance(body, dict)
                      for p in body.get("grid", {})})
    fig, axes = plt.subplots(2, max(1, len(lengths)), figsize=(6 * max(1, len(lengths)), 8), squeeze=False)
    for column, tokens in enumerate(lengths):
        for section, body in results.items():
            grid = body.get("grid", {}) if isinstance(body, dict) else {}
            mixes = sorted({p.split("_", 2)[2] for p in grid if p.split("_")[1] == f"t{tokens}"})
            for mix in mixes:
                points = sorted((int(p.split("_")[0][1:]), f) for p, f in grid.items()
                                if p.split("_")[1] == f"t{tokens}" and p.split("_", 2)[2] == mix)
                if len(points) < 2:
                    continue
                xs = [c for c, _ in points]
                label = f"{section} ({mix})"
                axes[0][column].plot(xs, [f["tok_s"] for _, f in points], marker="o", label=label)
                axes[1][column].plot(xs, [f.get("tpot_p50_ms") or 0 for _, f in points], marker="o", label=label)
        batched = sorted((int(p.split("_")[0][1:]), f["tok_s"])
                         for p, f in results.get("reference", {}).get("base_batched", {}).items()
                         if p.endswith(f"_t{tokens}"))
        if len(batched) > 1:
            axes[0][column].plot([c for c, _ in batched], [v for _, v in batched], marker="s", linestyle=":",
                                 color="black", label="base model batched (generate)")
        seed = results.get("reference", {}).get("seed", {}).get(f"t{tokens}")
        if seed:
            axes[0][column].axhline(seed["tok_s"], color="grey", linestyle="--", label="seed (one at a time)")
        axes[0][column].set_title(f"{tokens} new tokens: output tokens/s")
        axes[1][column].set_title(f"{tokens} new tokens: time per output token, p50 (ms)")
        for row in (0, 1):
            axes[row][column].set_xscale("log", base=2)
            axes[row][column].set_xlabel("concurrent requests")
            axes[row][column].grid(True, alpha=0.3)
        axes[0][column].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
