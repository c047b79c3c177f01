"""Stacked inference as an evaluation (issue 16): route, answer with the chosen expert, score.

One module-scoped world, trained for real on the CPU: the demo's expert data (home-assistant-intents,
ctparse) for three experts, a routing dataset built from it, a router trained on it and a second
router trained on the same requests with every label replaced by another expert's (a derangement, so
it is deliberately wrong on every class). The experts are real LoRAs trained on the demo's user texts,
each answering every request with its own signature tool call (`{"name": "<expert>", "arguments": {}}`):
a few steps teach it, and a request answered by any other expert is then wrong, so routing decides
the end-to-end score and the test can tell a good router from a bad one in seconds, where experts
trained on the real tool calls would need minutes before scoring anything.

The figures are recomputed here from the per-example JSONL the report writes (never taken from the
report alone), the `--server` run goes through a real uvicorn server on 127.0.0.1, and the Modal
function runs its own body locally with `.local()`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.base_model import BaseModelInfo
from service.settings import PROJECT_ROOT, Settings
from tests.support import ServerProcess
from training.data.chats import read_chats, write_jsonl
from training.data.routing_dataset import build_routing_dataset
from training.data.task_datasets import build_task_datasets
from training.data.tool_calls import format_tool_call
from training.evaluate.answer_scores import ExpertMetric, score_answer
from training.evaluate.stacked import evaluate_stacked, setup_from_registry
from training.register.commands import RegistryContext, register_adapter
from training.train.sft import TrainConfig, train_adapter

EXPERTS = ("calendar", "lights", "timer")
DERANGED = dict(zip(EXPERTS, (*EXPERTS[1:], EXPERTS[0]), strict=True))  # every label another expert's
MAX_TOKENS = 16  # a signature call is ~12 tokens
pytestmark = pytest.mark.slow
QUICK = {"dropout": 0.0, "save_steps": 1000, "progress": False, "eval_examples": 0}


def signature(expert: str) -> str:
    return format_tool_call(expert, {})


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loramux", *args], env={**os.environ, **env},
                          capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=900)


def _examples(report_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (report_dir / "examples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, base_model: BaseModelInfo) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("stacked")
    settings = Settings(adapter_root=root, registry=root / "config" / "loras.json",
                        cache_dir=PROJECT_ROOT / ".cache")
    tasks = build_task_datasets(root / "datasets" / "experts", EXPERTS, per_expert=30, seed=0)
    files = {}
    for name, data in tasks.items():
        rows = []
        for record in read_chats(data.all_file):
            row = record.to_json()
            row["messages"][-1]["content"] = signature(name)
            rows.append(row)
        files[name] = root / "datasets" / "signature" / f"{name}.jsonl"
        write_jsonl(files[name], rows)
    routing = build_routing_dataset(files, root / "datasets" / "routing", seed=0).path

    # the deliberately wrong router: the same requests, each labelled with another expert (train and val)
    shuffled = root / "datasets" / "routing_shuffled"
    for split in ("train", "val"):
        rows = []
        for record in read_chats(routing / f"{split}.jsonl"):
            row = record.to_json()
            row["messages"][-1]["content"] = DERANGED[row["messages"][-1]["content"]]
            rows.append(row)
        write_jsonl(shuffled / f"{split}.jsonl", rows)
    (shuffled / "card.json").write_text((routing / "card.json").read_text())

    def train(kind: str, dataset: Path, run: str, steps: int, batch: int) -> Path:
        config = TrainConfig(kind=kind, dataset=dataset, run_name=run, max_steps=steps, batch_size=batch,  # type: ignore[arg-type]
                             learning_rate=3e-3, early_stopping=False, calibrate=False, **QUICK)
        return train_adapter(config, settings, base_model).final_dir

    context = RegistryContext(settings, base_model)
    finals = {name: train("task", files[name], f"expert-{name}", 5, 4) for name in EXPERTS}
    for name, final in finals.items():
        register_adapter("task", name, final, f"signature expert {name}", context=context)
    router = train("router", routing, "router", 10, 8)
    register_adapter("router", "router", router, "router", labels=list(EXPERTS), context=context)
    wrong = train("router", shuffled, "router-shuffled", 10, 8)
    register_adapter("router", "router-shuffled", wrong, "deranged labels", labels=list(EXPERTS), context=context)
    env = {"LORAMUX_REGISTRY": str(settings.registry), "LORAMUX_ADAPTER_ROOT": str(root),
           "LORAMUX_CACHE_DIR": str(settings.cache_dir), "OMP_NUM_THREADS": "1"}
    return {"root": root, "settings": settings, "routing": routing, "router": router, "wrong": wrong, "env": env,
            "eval_records": read_chats(routing / "eval.jsonl")}


@pytest.fixture(scope="module")
def good_run(world: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`loramux eval --kind stacked --router router --json`: the CLI, the registry's experts, the good router."""
    out = world["root"] / "reports" / "good"
    done = _cli(world["env"], "eval", "--kind", "stacked", "--dataset", str(world["routing"]), "--router", "router",
                "--max-tokens", str(MAX_TOKENS), "--out", str(out), "--json")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert {**report, "examples_file": "examples.jsonl"} == json.loads((out / "report.json").read_text())
    return report, _examples(out)


@pytest.fixture(scope="module")
def shuffled_run(world: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The same evaluation in this process (`evaluate_stacked`) with the deranged router's folder."""
    from training.evaluate.reports import write_report

    settings = world["settings"]
    evaluation = evaluate_stacked(setup_from_registry(settings, router_path=world["wrong"]), world["routing"],
                                  settings, max_tokens=MAX_TOKENS)
    out = world["root"] / "reports" / "shuffled"
    write_report(evaluation.report, out)
    return json.loads((out / "report.json").read_text()), _examples(out)


def test_the_routing_dataset_keeps_each_request_and_its_reference(world: dict[str, Any]) -> None:
    for record in world["eval_records"]:
        expert = record.metadata["adapter"]
        assert record.metadata["reference"] == signature(expert)
        request = record.metadata["request"]
        # what a user sends: the source chat without its answer and without the expert's system prompt
        assert [m["role"] for m in request] == ["user"] and request[0]["content"] == record.user_text


def test_counts_add_up_and_every_figure_follows_from_the_examples(world: dict[str, Any], good_run: Any) -> None:
    report, rows = good_run
    n = len(world["eval_records"])
    assert report["n"] == n == len(rows) >= 6
    assert sum(report["outcomes"].values()) == n
    # every request in exactly one class, each class decided by its own two scores
    for row in rows:
        score, oracle = row["scores"]["end_to_end"]["score"], row["scores"]["oracle"]["score"]
        expected = "correct" if score else ("lost_to_routing" if oracle else "lost_by_expert")
        assert row["outcome"] == expected, row
        if row["chosen"] == row["expert"]:  # routed right: the end-to-end answer is the oracle answer
            assert row["oracle_answer"] == row["answer"]
    for key in ("correct", "lost_to_routing", "lost_by_expert"):
        assert report["outcomes"][key] == sum(r["outcome"] == key for r in rows)
    assert report["routing_accuracy"] == sum(r["top"] == r["expert"] for r in rows) / n
    for key in ("end_to_end", "oracle", "base"):
        assert math.isclose(report[key], sum(r["scores"][key]["score"] for r in rows) / n)
    assert report["misrouted"] == sum(r["chosen"] != r["expert"] for r in rows)
    # the scores are the expert's metric applied to what was answered, against the dataset's reference
    by_text = {r.user_text: r for r in world["eval_records"]}
    for row in rows:
        assert row["reference"] == by_text[row["text"]].metadata["reference"]
        metric = ExpertMetric.of({"tools": [row["expert"]]}, row["reference"])
        assert score_answer(row["answer"], row["reference"], metric).score == row["scores"]["end_to_end"]["score"]
    for name, figures in report["per_expert"].items():
        own = [r for r in rows if r["expert"] == name]
        assert figures["support"] == len(own) and figures["routed_to"] == sum(r["chosen"] == name for r in rows)
        assert math.isclose(figures["oracle"], sum(r["scores"]["oracle"]["score"] for r in own) / len(own))
    # a trained router and experts that know their answer: far above the bare base model
    assert report["routing_accuracy"] >= 0.8 and report["end_to_end"] >= 0.8 > report["base"]
    assert report["latency_ms"]["route"]["p50"] > 0 and report["latency_ms"]["answer"]["p95"] > 0
    assert (world["root"] / "reports" / "good" / "stacked.png").is_file()


def test_a_router_with_shuffled_labels_drives_end_to_end_down_while_oracle_stays(good_run: Any,
                                                                                shuffled_run: Any) -> None:
    good, _ = good_run
    bad, rows = shuffled_run
    assert bad["n"] == good["n"] and sum(bad["outcomes"].values()) == bad["n"]
    assert bad["routing_accuracy"] <= good["routing_accuracy"] - 0.5
    assert bad["end_to_end"] <= good["end_to_end"] - 0.5
    assert abs(bad["oracle"] - good["oracle"]) <= 1 / good["n"]  # the true experts did not change
    assert bad["base"] == good["base"]
    assert bad["outcomes"]["lost_to_routing"] >= bad["n"] // 2
    assert bad["misrouted"] == sum(r["chosen"] != r["expert"] for r in rows) > good["misrouted"]


@pytest.fixture(scope="module")
def server(world: dict[str, Any]) -> Iterator[ServerProcess]:
    """The registry served by `loramux serve`, routing with the deranged router (`LORAMUX_ROUTER`): its
    decisions are wrong and varied, so equal decisions mean something."""
    env = {**world["env"], "LORAMUX_ROUTER": "router-shuffled", "LORAMUX_MAX_MODEL_LEN": "512"}
    proc = ServerProcess(env).start(world["root"] / "server.log")
    yield proc
    proc.stop()


def test_through_a_live_server_the_decisions_equal_the_local_run(world: dict[str, Any], shuffled_run: Any,
                                                                 server: ServerProcess) -> None:
    local, local_rows = shuffled_run
    out = world["root"] / "reports" / "server"
    done = _cli(world["env"], "eval", "--kind", "stacked", "--dataset", str(world["routing"]), "--server",
                server.url, "--max-tokens", str(MAX_TOKENS), "--out", str(out), "--json")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:] + server.log()
    remote = json.loads(done.stdout)
    rows = _examples(out)
    assert remote["backend"] == server.url and remote["router"]["name"] == "router-shuffled"
    assert [r["text"] for r in rows] == [r["text"] for r in local_rows]
    assert [r["chosen"] for r in rows] == [r["chosen"] for r in local_rows]
    for mine, theirs in zip(rows, local_rows, strict=True):
        assert math.isclose(mine["confidence"], theirs["confidence"], abs_tol=2e-3), (mine, theirs)
    assert remote["routing_accuracy"] == local["routing_accuracy"] and remote["oracle"] == local["oracle"]
    assert sum(remote["outcomes"].values()) == remote["n"] == local["n"]


@pytest.mark.filterwarnings("ignore:The .* function is executing locally:UserWarning")
def test_the_modal_function_runs_locally(world: dict[str, Any], shuffled_run: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`modal run -m deploy.modal_app::stacked --routing-run router-shuffled ...`'s body, on this CPU: the run
    named routes (not the registry's active router), the registered experts answer."""
    pytest.importorskip("modal")
    import deploy.modal_app as modal_app

    for key, value in world["env"].items():
        monkeypatch.setenv(key, value)
    result = modal_app.remote_stacked.local("datasets/routing", routing_run="router-shuffled", max_samples=4,
                                            max_tokens=MAX_TOKENS)
    report = result["report"]
    assert report["n"] == 4 and sum(report["outcomes"].values()) == 4 and report["router"]["name"] == "router-shuffled"
    assert "routing accuracy" in result["text"]
    rows = _examples(world["root"] / Path(result["paths"]["examples"]).parent)
    _, local_rows = shuffled_run
    decided = {r["text"]: r["chosen"] for r in local_rows}
    assert [decided[r["text"]] for r in rows] == [r["chosen"] for r in rows]
