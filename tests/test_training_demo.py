"""The demo's wiring: skipped when adapters exist, and a quick end-to-end run into a temp registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.registry import Registry
from service.settings import Settings
from training.demo import DemoPlan, run_demo


def test_if_missing_does_nothing_when_the_registry_has_adapters(tmp_path: Path) -> None:
    registry = tmp_path / "loras.json"
    registry.write_text(json.dumps({"someone": "adapters/someone"}))
    lines: list[str] = []
    result = run_demo(Settings(adapter_root=tmp_path, registry=registry), if_missing=True, echo=lines.append)
    assert result.skipped and "skipped" in lines[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "datasets").exists()


@pytest.mark.slow
def test_quick_demo_trains_evaluates_and_registers(quick_demo) -> None:
    settings, result, lines = quick_demo
    plan = DemoPlan.quick()
    snapshot = Registry(settings.registry).load()
    assert snapshot.active_router == "router"
    assert snapshot.entries["router"].active.labels == tuple(sorted(plan.experts))
    for name in plan.experts:
        version = snapshot.entries[name].active
        assert version.kind == "task" and version.path.startswith("runs/")
        assert "eval" in version.metrics  # evaluation results travel into the registry
    assert result.report_dir is not None and (result.report_dir / "router" / "confusion.png").is_file()
    # the headline accuracy is the share of the confusion matrix on its diagonal, over every eval example
    confusion = json.loads((result.report_dir / "router" / "report.json").read_text())["confusion"]
    right = sum(row[confusion["columns"].index(label)]
                for label, row in zip(confusion["labels"], confusion["matrix"], strict=True))
    total = sum(map(sum, confusion["matrix"]))
    assert total == result.summary["router"]["examples"] > 0
    assert result.summary["router"]["accuracy"] == round(right / total, 4)
    assert any("demo finished" in line for line in lines)
    # the whole pipeline's figures, next to the router's and the experts' (issue 16)
    stacked = result.summary["stacked"]
    written = json.loads((result.report_dir / "stacked" / "report.json").read_text())
    assert stacked["n"] == written["n"] == plan.stacked_eval_limit == sum(stacked["outcomes"].values())
    assert {k: stacked[k] for k in ("routing_accuracy", "end_to_end", "oracle", "base")} == {
        k: round(written[k], 4) for k in ("routing_accuracy", "end_to_end", "oracle", "base")}
    assert len((result.report_dir / "stacked" / "examples.jsonl").read_text().splitlines()) == stacked["n"]
    assert snapshot.entries["router"].active.metrics["stacked"] == stacked
    printed = next(line for line in lines if line.strip().startswith("stacked"))
    assert f"on {stacked['n']} requests" in printed and "end to end" in printed
