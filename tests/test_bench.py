"""`make bench` is only as good as its measuring: `python -m loadtests.bench --quick` runs the same code as
the full matrix (the real service in a subprocess, streamed chat requests, the seed's serving, the base
model batched, the matmul peak, the quick demo's experts for the realistic row) on a tiny grid, and its
JSON must add up: exact answer lengths, times that fit together, every point and ratio the report
promises, and a PNG. The ratios' arithmetic and verdicts are checked on numbers given by hand."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loadtests.bench_grid import QUICK, SEQUENTIAL_REQUESTS, points
from loadtests.bench_report import ratios, verdicts
from tests.support import PROJECT_ROOT


@pytest.mark.slow
def test_quick_bench_measures_every_point_and_adds_up(quick_demo, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "loadtests.bench", "--quick", "--engine", "hf", "--out", str(out),
           "--demo-registry", str(quick_demo.settings.registry), "--demo-root", str(quick_demo.settings.adapter_root)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    results = json.loads(out.read_text())

    grid = results["service_hf"]["grid"]
    expected = {f"c{c}_t{t}_{mix}" for c, t, mix in points(QUICK, ["base", *QUICK.mixes])}
    assert set(grid) == expected
    for key, point in grid.items():
        concurrency, tokens = (int(part[1:]) for part in key.split("_")[:2])
        requests = concurrency if concurrency > 1 else SEQUENTIAL_REQUESTS.get(tokens, 3)
        # ignore_eos: every answer is exactly its length, counted from the stream's usage
        assert (point["requests"], point["tokens"]) == (requests, requests * tokens), key
        assert point["tok_s"] == pytest.approx(point["tokens"] / point["seconds"], rel=1e-2)
        assert 0 < point["ttft_p50_ms"] <= point["ttft_p99_ms"] < 1000 * point["seconds"]
        assert 0 < point["tpot_p50_ms"] <= point["tpot_p99_ms"]
        # a request's first token and its other tokens fit inside the point's time
        assert point["ttft_p50_ms"] + (tokens - 1) * point["tpot_p50_ms"] <= 1000 * point["seconds"] * 1.05, key

    reference = results["reference"]
    assert set(reference["base_batched"]) == {f"c{c}_t{t}" for c in QUICK.concurrency for t in QUICK.new_tokens}
    assert all(f["tok_s"] > 0 for f in reference["base_batched"].values())
    realistic = results["service_hf"]["realistic"]
    seed = reference["seed"]["realistic"]
    assert realistic["pinned"]["requests"] == realistic["routed"]["requests"] == seed["requests"]
    assert 0 < realistic["pinned"]["tokens"] <= realistic["pinned"]["requests"] * 24  # --quick's cap

    assert results["machine"]["peak_gflops_float32"] > 1
    assert set(results["peak_fraction"]) == set(grid)
    assert all(0 < v < 1 for v in results["peak_fraction"].values())
    for name in ("realistic_hf_pinned_over_seed", "realistic_hf_routed_over_seed", "auto_over_pinned_hf_c1"):
        assert results["ratios"][name]["target"] and results["ratios"][name]["met"] in (True, False)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ratios against the targets" in done.stdout


def test_ratios_and_verdicts_from_given_figures():
    def point(tok_s: float) -> dict:
        return {"tok_s": tok_s}

    results = {
        "reference": {"seed": {"t32": point(10.0), "realistic": point(20.0)}},
        "service_hf": {"grid": {"c16_t32_3": point(120.0), "c16_t32_base": point(100.0), "c16_t32_12": point(114.0),
                                "c16_t256_3": point(96.0), "c64_t32_3": point(150.0)},
                       "realistic": {"pinned": point(200.0), "routed": point(150.0)},
                       "routing": {"auto_over_pinned_c16": 1.2}},
        "service_vllm": {"grid": {"c16_t32_3": point(90.0), "c64_t32_3": point(99.0)}},
        "vllm_server_lora": {"grid": {"c16_t32_3": point(100.0), "c64_t32_3": point(100.0)}},
        "vllm_server_base": {"grid": {"c16_t32_base": point(150.0), "c64_t32_base": point(140.0)}},
    }
    values = ratios(results)
    assert values["service_hf_over_seed_c16_t32"] == pytest.approx(12.0)
    assert values["realistic_hf_pinned_over_seed"] == pytest.approx(10.0)
    assert values["realistic_hf_routed_over_seed"] == pytest.approx(7.5)
    assert values["lora_3_over_base_hf_c16_t32"] == pytest.approx(1.2)
    assert values["lora_12_over_3_hf_c16_t32"] == pytest.approx(0.95)
    assert values["tok_s_256_over_32_hf_c16"] == pytest.approx(0.8)
    assert values["hf_over_vllm_server_lora_c16_t32"] == pytest.approx(1.2)
    assert values["hf_over_vllm_server_nolora_c64_t32"] == pytest.approx(150 / 140)
    assert values["service_vllm_over_vllm_server_min"] == pytest.approx(0.9)  # the worst point, not the mean
    assert "lora_3_over_base_vllm_c16_t32" not in values  # not measured: no ratio, never a made-up one
    judged = verdicts(values)
    assert judged["service_hf_over_seed_c16_t32"]["met"] is True
    assert judged["realistic_hf_routed_over_seed"]["met"] is False
    assert judged["tok_s_256_over_32_hf_c16"]["met"] is False
    assert judged["auto_over_pinned_hf_c16"]["met"] is False  # an upper bound: 1.2 > 1.10
    assert judged["service_vllm_over_vllm_server_min"]["met"] is True
