"""`loramux demo`: from public data to registered, evaluated adapters on a 2-core CPU.

Builds the expert datasets (home-assistant-intents + ctparse) and the routing dataset from the same
files, trains the router and then each expert (a few hundred steps in total: the plan below is
sized for about 20 minutes on 2 cores), registering each adapter the moment it is trained, so a
service running beside the demo (`loramux demo --serve`, which `make run` uses) answers routed
requests minutes after start and grows one expert at a time. While it builds, the build status
(`service.build_status`) tells the service what is coming, so a request for an expert not trained
yet is a 503 with Retry-After rather than a wrong expert or a 404. At the end everything is
evaluated through the serving engine on the held-out eval splits, then the whole pipeline on the
routing eval split (`training.evaluate.stacked`: route, answer with the chosen expert, score, next
to the true expert and the base model); the results go into each adapter's `loramux.json` and a
short report.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from service.base_model import BaseModelInfo, resolve_base_model
from service.build_status import BuildStatusWriter, status_path
from service.registry import Registry
from service.settings import Settings
from training.data.chats import write_json
from training.data.routing_dataset import build_routing_dataset
from training.data.task_datasets import DEMO_EXPERTS, build_task_datasets
from training.evaluate.reports import pct, write_report
from training.evaluate.router_and_experts import EngineSession, evaluate_expert_async, evaluate_router_async
from training.evaluate.stacked import evaluate_stacked_async, router_folder_spec, setup_from_folders
from training.register.commands import RegistryContext, register_adapter
from training.train.metadata import read_metadata, update_metrics
from training.train.sft import TrainConfig, train_adapter

ROUTER_NAME = "router"
STACKED = "stacked"  # the report of the whole pipeline: route, answer with the chosen expert, score
WITH_TOOLS = "with_tools"  # an expert's report on the same requests with its tools declared


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of the demo. Experts get 100 steps of 8 (about 2.5 epochs): at 40 steps (under one epoch)
    they still looped or invented tool names (media: 60% valid tool calls); the router needs far less
    (80 steps of 16 gave 100% on the held-out split)."""

    experts: tuple[str, ...] = DEMO_EXPERTS
    per_expert: int = 400
    seed: int = 0
    expert: TrainConfig = field(default_factory=lambda: TrainConfig(
        kind="task", dataset=Path(), run_name="", max_steps=100, batch_size=8, learning_rate=2e-3, dropout=0.0,
        save_steps=20, eval_examples=0))
    router: TrainConfig = field(default_factory=lambda: TrainConfig(
        kind="router", dataset=Path(), run_name="", max_steps=80, batch_size=16, learning_rate=1e-3, dropout=0.0,
        save_steps=40, eval_examples=0))
    expert_eval_limit: int | None = 60
    router_eval_limit: int | None = None
    stacked_eval_limit: int | None = 60
    expert_max_tokens: int = 160

    @classmethod
    def quick(cls, seed: int = 0) -> DemoPlan:
        """A few steps each: exercises every stage in a couple of minutes (tests, smoke runs)."""
        base = cls()
        return cls(
            experts=("lights", "timer", "calendar"),
            per_expert=30,
            seed=seed,
            expert=replace(base.expert, max_steps=2, batch_size=4, save_steps=1000),
            router=replace(base.router, max_steps=2, batch_size=4, save_steps=1000),
            expert_eval_limit=4,
            router_eval_limit=6,
            stacked_eval_limit=6,
            expert_max_tokens=24,
        )


@dataclass
class DemoResult:
    skipped: bool
    seconds: float = 0.0
    report_dir: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def run_demo(
    settings: Settings | None = None,
    plan: DemoPlan | None = None,
    if_missing: bool = False,
    echo: Callable[[str], Any] = print,
    base: BaseModelInfo | None = None,
    resume: str | None = None,
    on_started: Callable[[], Any] | None = None,
) -> DemoResult:
    """`resume` is the stamp of an interrupted demo (`datasets/demo_<stamp>`): its datasets are
    rebuilt identically (seeded), finished adapters are reused and unfinished runs continue from
    their last checkpoint, so a demo cut off after most of its training does not start over.

    Each adapter is registered the moment it is trained, router first (it answers for every
    expert; a request routed to one not trained yet gets a 503 with Retry-After, see
    `service.build_status`), so a service running beside the demo grows live. `on_started` is called
    once the base model is ready and the build status says what is coming (`loramux demo --serve`
    starts its server there)."""
    settings = settings or Settings()
    plan = plan or DemoPlan()
    registry = Registry(settings.registry)
    if if_missing and registry.load().entries:
        echo(f"registry {settings.registry} already has adapters; demo skipped")
        return DemoResult(skipped=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    served_at: dict[str, float] = {}
    echo("[demo] base model")
    base = base or resolve_base_model(settings.base_model, settings.cache_dir, settings.base_model_name)
    stamp = resume or f"{datetime.now():%Y%m%d_%H%M%S}"
    root = settings.adapter_root
    data_root = root / "datasets" / f"demo_{stamp}"
    if resume and not data_root.is_dir():
        raise FileNotFoundError(f"no interrupted demo to resume: {data_root} does not exist")
    order = [ROUTER_NAME, *plan.experts]  # the router first: with it, every request gets a clear answer
    stages = len(order) + 2  # datasets, each adapter, evaluation
    pace = BuildPace(plan)
    coming = {ROUTER_NAME: "router"} | dict.fromkeys(plan.experts, "task")
    status = BuildStatusWriter(status_path(settings.registry), coming, stages)
    try:
        if on_started is not None:
            on_started()

        def lap(name: str, since: float) -> float:
            now = time.perf_counter()
            timings[name] = round(now - since, 1)
            return now

        def stage(index: int, what: str) -> str:
            status.stage(index, what, pace.etas(order[max(0, index - 2):]))
            return f"[{index}/{stages}] {what}"

        echo(f"[demo] {stage(1, 'datasets')} -> {data_root}")
        t = time.perf_counter()
        tasks = build_task_datasets(data_root / "experts", plan.experts, plan.per_expert, plan.seed)
        routing = build_routing_dataset({n: d.all_file for n, d in tasks.items()}, data_root / "routing",
                                        seed=plan.seed)
        t = lap("datasets", t)

        context = RegistryContext(settings, base)
        finals: dict[str, Path] = {}
        versions = {}
        for index, name in enumerate(order, start=2):
            if name == ROUTER_NAME:
                label = stage(index, f"router over {', '.join(routing.labels)}")
                config = replace(plan.router, dataset=routing.path, run_name=f"demo_{stamp}_{ROUTER_NAME}",
                                 seed=plan.seed, description="demo router", progress_label=label)
            else:
                label = stage(index, f"expert {name}")
                config = replace(plan.expert, dataset=tasks[name].path, run_name=f"demo_{stamp}_{name}",
                                 seed=plan.seed, description=f"demo expert: {name}", progress_label=label)
            finals[name] = _train_or_reuse(config, settings, base, echo, label)
            pace.trained(config, time.perf_counter() - t)
            if name == ROUTER_NAME:
                versions[name] = _register_once(context, "router", name, finals[name], "demo router",
                                                list(routing.labels))
            else:
                versions[name] = _register_once(context, "task", name, finals[name], f"demo expert: {name}")
            status.registered(name)
            served_at[name] = round(time.perf_counter() - started, 1)
            echo(f"[demo] {name} registered (version {versions[name].version}) after "
                 f"{served_at[name] / 60:.1f} min; a running service loads it now")
            t = lap(f"train {name}", t)

        echo(f"[demo] {stage(stages, 'evaluating through the serving engine')}")
        report_dir = root / "reports" / f"demo_{stamp}"
        evaluations = asyncio.run(_evaluate(settings, base, plan, finals, tasks, routing.path))
        for name, report in evaluations.items():
            write_report(report, report_dir / name)
        for name, key in [(n, "eval") for n in order] + [(ROUTER_NAME, STACKED)]:
            headline = _headline(evaluations[STACKED if key == STACKED else name])
            update_metrics(finals[name], key, headline)  # the adapter's loramux.json
            context.registry.record_metrics(name, versions[name].version, {key: headline})
        lap("evaluate", t)
    finally:
        status.close()

    seconds = time.perf_counter() - started
    summary = {
        "seconds": round(seconds, 1),
        "timings": timings,
        "registered_after_s": served_at,
        "datasets": str(data_root),
        "adapters": {n: {"path": str(finals[n]), "version": v.version} for n, v in versions.items()},
        "router": _headline(evaluations[ROUTER_NAME]),
        "experts": {n: _headline(evaluations[n]) for n in tasks},
        "stacked": _headline(evaluations[STACKED]),
        "plan": {"experts": list(plan.experts), "per_expert": plan.per_expert,
                 "expert_steps": plan.expert.max_steps, "router_steps": plan.router.max_steps},
    }
    write_json(report_dir / "summary.json", summary)
    for line in summary_lines(summary, report_dir):
        echo(line)
    return DemoResult(False, seconds, report_dir, summary)


class BuildPace:
    """Seconds per training step by kind, for the build status's estimates: a prior measured on a
    2-core CPU (router steps of 16 about 1.4 s, expert steps of 8 about 1.7 s), replaced by what this
    machine did as soon as one adapter of that kind is trained."""

    def __init__(self, plan: DemoPlan):
        self.steps = {"router": plan.router.max_steps, "task": plan.expert.max_steps}
        self.per_step = {"router": 1.4, "task": 1.7}

    def trained(self, config: TrainConfig, seconds: float) -> None:
        if config.max_steps > 0 and seconds > 1:
            self.per_step[config.kind] = seconds / config.max_steps

    def etas(self, names: list[str]) -> dict[str, float]:
        """Seconds until each of `names` (in training order, the first one in training now) is registered."""
        out, total = {}, 0.0
        for name in names:
            kind = "router" if name == ROUTER_NAME else "task"
            total += max(1, self.steps[kind]) * self.per_step[kind]
            out[name] = total
        return out


def _register_once(context: RegistryContext, kind: str, name: str, final: Path, description: str,
                   labels: list[str] | None = None) -> Any:
    """Register `final` as `name`, unless its active version already is this folder (a resumed demo
    registered it before it was cut off): a second identical version would only churn the service."""
    entry = context.registry.load().entries.get(name)
    if entry is not None and entry.active is not None:
        registered = Path(entry.active.path)
        registered = registered if registered.is_absolute() else context.settings.adapter_root / registered
        if registered.resolve() == final.resolve():
            return entry.active
    return register_adapter(kind, name, final, description, labels=labels, context=context)  # type: ignore[arg-type]


def _train_or_reuse(config: TrainConfig, settings: Settings, base: BaseModelInfo, echo: Callable[[str], Any],
                    what: str) -> Path:
    final = (config.runs_dir or settings.adapter_root / "runs") / config.run_name / "final"
    if (final / "adapter_model.safetensors").is_file():
        echo(f"[demo] {what}: reusing {final}")
        return final
    echo(f"[demo] {what}: training, {config.max_steps} steps")
    return train_adapter(config, settings, base).final_dir


async def _evaluate(settings: Settings, base: BaseModelInfo, plan: DemoPlan, finals: dict[str, Path],
                    tasks: dict[str, Any], routing_path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    async with EngineSession(settings, base) as session:
        router = await evaluate_router_async(session, finals[ROUTER_NAME], routing_path,
                                             limit=plan.router_eval_limit)
        out[ROUTER_NAME] = router.report
        for name, data in tasks.items():
            expert = await evaluate_expert_async(session, finals[name], data.path, limit=plan.expert_eval_limit,
                                                 max_tokens=plan.expert_max_tokens)
            # the same requests as an agent framework sends them, with the expert's tools declared; an
            # expert trained on bare requests gets the very same prompts (prompts.tools_to_show), so its
            # answers are the ones just scored and are not generated a second time
            if read_metadata(finals[name]).get("tools_in_prompt", True) is False:
                declared = {**expert.report, "declared_tools": len(data.tool_schemas)}
            else:
                declared = (await evaluate_expert_async(session, finals[name], data.path,
                                                        limit=plan.expert_eval_limit,
                                                        max_tokens=plan.expert_max_tokens,
                                                        declared_tools=data.tool_schemas)).report
            out[name] = {**expert.report, WITH_TOOLS: declared}
        setup = setup_from_folders(router_folder_spec(finals[ROUTER_NAME], ROUTER_NAME),
                                   {name: finals[name] for name in tasks})
        stacked = await evaluate_stacked_async(session, setup, routing_path, limit=plan.stacked_eval_limit,
                                               max_tokens=plan.expert_max_tokens)
        out[STACKED] = stacked.report
    return out


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    if report["kind"] == STACKED:
        return {key: round(report[key], 4) if isinstance(report[key], float) else report[key]
                for key in ("n", "routing_accuracy", "end_to_end", "oracle", "base", "outcomes")}
    if report["kind"] == "router":
        return {
            "examples": report["examples"],
            "accuracy": round(report["accuracy"], 4),
            "macro_f1": round(report["macro_f1"], 4),
            "invalid_name_rate": report["invalid_name_rate"],
            "free_generation_invalid_name_rate": report["free_generation"]["invalid_name_rate"],
            "ece": round(report["calibration"]["ece"], 4),
            "brier": round(report["calibration"]["brier"], 4),
        }
    headline = {
        "examples": report["examples"],
        "exact_match": round(report["exact_match"], 4),
        "valid_tool_call_rate": round(report["valid_tool_call_rate"], 4),
    }
    if WITH_TOOLS in report:
        headline[WITH_TOOLS] = _headline(report[WITH_TOOLS])
    return headline


def summary_lines(summary: dict[str, Any], report_dir: Path) -> list[str]:
    router = summary["router"]
    lines = [
        "",
        f"demo finished in {summary['seconds'] / 60:.1f} min  (reports: {report_dir})",
        f"  router   accuracy {pct(router['accuracy'])} on {router['examples']} held-out examples, "
        f"invalid names {pct(router['invalid_name_rate'])} (free generation "
        f"{pct(router['free_generation_invalid_name_rate'])}), ECE {router['ece']:.3f}",
    ]
    for name, expert in summary["experts"].items():
        line = (f"  {name:8s} valid tool calls {pct(expert['valid_tool_call_rate'])}, "
                f"exact match {pct(expert['exact_match'])} on {expert['examples']} examples")
        declared = expert.get(WITH_TOOLS)
        if declared:
            line += (f"; with its tools declared {pct(declared['valid_tool_call_rate'])}, "
                     f"{pct(declared['exact_match'])}")
        lines.append(line)
    stacked = summary.get(STACKED)
    if stacked:
        outcomes = stacked["outcomes"]
        lines.append(f"  stacked  routing {pct(stacked['routing_accuracy'])}, end to end {pct(stacked['end_to_end'])}, "
                     f"oracle {pct(stacked['oracle'])}, base {pct(stacked['base'])} on {stacked['n']} requests "
                     f"({outcomes['lost_to_routing']} lost to routing, {outcomes['lost_by_expert']} by the expert)")
    if summary.get("registered_after_s"):
        lines.append("  serving after: " + ", ".join(f"{k} {v / 60:.1f} min"
                                                      for k, v in summary["registered_after_s"].items()))
    lines.append("  timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in summary["timings"].items()))
    return lines
