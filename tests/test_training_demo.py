"""The demo's wiring: skipped when adapters exist, and a quick end-to-end run into a temp registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.registry import Registry
from service.settings import Settings
from tests.conftest import QuickDemo
from training.demo import DemoPlan, run_demo


def test_if_missing_does_nothing_when_the_registry_has_adapters(tmp_path: Path) -> None:
    registry = tmp_path / "loras.json"
    registry.write_text(json.dumps({"someone": "adapters/someone"}))
    lines: list[str] = []
    result = run_demo(Settings(adapter_root=tmp_path, registry=registry), if_missing=True, echo=lines.append)
    assert result.skipped and "skipped" in lines[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "datasets").exists()


@pytest.mark.slow
def test_quick_demo_trains_evaluates_and_registers(quick_demo: QuickDemo) -> None:
    settings, summary, report_dir = quick_demo.settings, quick_demo.summary, quick_demo.report_dir
    lines = quick_demo.lines
    plan = DemoPlan.quick()
    snapshot = Registry(settings.registry).load()
    assert snapshot.active_router == "router"
    assert snapshot.entries["router"].active.labels == tuple(sorted(plan.experts))
    for name in plan.experts:
        version = snapshot.entries[name].active
        assert version.kind == "task" and version.path.startswith("runs/") and version.version == 1
        assert version.metrics["eval"] == summary["experts"][name]  # evaluated after registration, recorded
    assert (report_dir / "router" / "confusion.png").is_file()
    # the headline accuracy is the share of the confusion matrix on its diagonal, over every eval example
    confusion = json.loads((report_dir / "router" / "report.json").read_text())["confusion"]
    right = sum(row[confusion["columns"].index(label)]
                for label, row in zip(confusion["labels"], confusion["matrix"], strict=True))
    total = sum(map(sum, confusion["matrix"]))
    assert total == summary["router"]["examples"] > 0
    assert summary["router"]["accuracy"] == round(right / total, 4)
    assert any("demo finished" in line for line in lines)
    # the whole pipeline's figures, next to the router's and the experts' (issue 16)
    stacked = summary["stacked"]
    written = json.loads((report_dir / "stacked" / "report.json").read_text())
    assert stacked["n"] == written["n"] == plan.stacked_eval_limit == sum(stacked["outcomes"].values())
    assert {k: stacked[k] for k in ("routing_accuracy", "end_to_end", "oracle", "base")} == {
        k: round(written[k], 4) for k in ("routing_accuracy", "end_to_end", "oracle", "base")}
    assert len((report_dir / "stacked" / "examples.jsonl").read_text().splitlines()) == stacked["n"]
    assert snapshot.entries["router"].active.metrics["stacked"] == stacked
    printed = next(line for line in lines if line.strip().startswith("stacked"))
    assert f"on {stacked['n']} requests" in printed and "end to end" in printed


@pytest.mark.slow
def test_the_service_answers_while_the_demo_builds(quick_demo: QuickDemo) -> None:
    """`make run`'s path: the server answers from the start, and the adapters arrive without a
    restart. While the router or an expert is missing, a request that needs it gets the documented
    503 with Retry-After that says it is being built; nothing else is ever a 5xx."""
    seen, plan = quick_demo.seen, DemoPlan.quick()
    assert all(s.status in (200, 503) for s in seen), [s for s in seen if s.status not in (200, 503)]
    for s in (s for s in seen if s.status == 503):
        assert s.what in ("auto", "pinned"), s
        message = s.body["error"]["message"]
        assert int(s.retry_after) >= 1 and ("still being built" in message or "is loading" in message), s
        assert s.body["error"]["type"] == "service_unavailable"
    pinned_late = [s for s in seen if s.what == "pinned"]
    assert pinned_late[0].status == 503 and pinned_late[-1].status == 200  # the last expert arrived live
    ready = [s for s in seen if s.what == "ready"]
    assert all(s.status == 200 for s in ready)  # ready as soon as the base model is: it answers
    assert plan.experts[-1] in ready[0].body["building"]["pending"] and ready[-1].body["building"] is None
    first_models = {m["id"]: m["status"] for m in next(s for s in seen if s.what == "models").body["data"]}
    assert first_models[plan.experts[-1]] == "building"
    last_models = {m["id"]: m["status"] for m in [s for s in seen if s.what == "models"][-1].body["data"]}
    assert {last_models[name] for name in (*plan.experts, "router", "auto")} == {"serving"}
    routed = [s for s in seen if s.what == "auto" and s.status == 200]
    assert routed and routed[-1].body["choices"][0]["message"]["content"] is not None
    assert not (quick_demo.settings.registry.parent / "loras.building.json").exists()  # removed when done
