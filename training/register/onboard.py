"""Onboarding a new expert into the live service, behind an evaluation gate.

`loramux onboard` registers the expert (training it first if asked), rebuilds the routing dataset
from the datasets of every registered expert (the registry remembers each one's dataset and
fingerprint), retrains the router (warm-started from the active router's weights when the label
set only grows), evaluates candidate and active router on the same combined eval split, and
registers the candidate. The gate promotes it only if its accuracy reaches the floor and no
existing expert's recall drops by more than the margin; otherwise the candidate is refused and
never serves. The running service picks the promoted router up between requests.

Onboarding a name that already serves (new weights for an existing expert) must not touch
production before the gate: the new expert version is registered as a *candidate*, the routing
dataset is built from its dataset, and it is activated together with the router only when the gate
passes and promotion was asked for. Until then the version that was active keeps answering; a
candidate left by `--no-promote` or a refused gate can be activated by hand
(`loramux adapters rollback NAME --version N`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.base_model import BaseModelInfo, resolve_base_model
from service.registration import register_adapter as service_register
from service.registry import AdapterVersion, Registry
from service.settings import Settings
from training.data.chats import DatasetError, fingerprint_files, read_chats, write_jsonl


@dataclass
class GateResult:
    passed: bool
    reasons: list[str]
    accuracy: float
    floor: float
    margin: float
    recall_drops: dict[str, float] = field(default_factory=dict)


def gate(candidate: dict[str, Any], active: dict[str, Any] | None, floor: float, margin: float) -> GateResult:
    """Promote only if accuracy >= floor and no existing expert's recall drops by more than margin.
    Reports are `loramux eval` router reports on the same eval split."""
    reasons = []
    accuracy = float(candidate["accuracy"])
    if accuracy < floor:
        reasons.append(f"accuracy {accuracy:.4f} is below the floor {floor:.4f}")
    drops: dict[str, float] = {}
    if active is not None:
        for label, old in active.get("per_class", {}).items():
            if label not in active.get("labels", []) or not old.get("support"):
                continue
            new = candidate.get("per_class", {}).get(label)
            new_recall = float(new["recall"]) if new else 0.0
            drop = float(old["recall"]) - new_recall
            drops[label] = round(drop, 6)
            if drop > margin:
                reasons.append(f"recall of {label!r} drops by {drop:.4f} (from {old['recall']:.4f} to "
                               f"{new_recall:.4f}), more than the margin {margin:.4f}")
    return GateResult(not reasons, reasons, accuracy, floor, margin, drops)


@dataclass
class OnboardResult:
    expert: str
    expert_version: int
    router: str
    candidate_version: int
    promoted: bool
    gate: GateResult
    routing_dataset: Path
    report_path: Path
    seconds: dict[str, float]
    expert_active: bool = True  # False: a new version of a serving name, waiting as a candidate

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["routing_dataset"] = str(self.routing_dataset)
        data["report_path"] = str(self.report_path)
        return data


def expert_sources(settings: Settings, scratch: Path, pending: AdapterVersion | None = None) -> dict[str, Path]:
    """One JSONL of chats per registered task expert, from the dataset recorded at registration
    (a file as is; a train/val/eval folder concatenated); `pending`, a candidate version of an
    expert being onboarded, stands in for its name's active version."""
    snapshot = Registry(settings.registry).load()
    sources: dict[str, Path] = {}
    versions = {v.name: v for v in snapshot.active_versions("task")}
    if pending is not None:
        versions[pending.name] = pending
    for version in versions.values():
        recorded = version.dataset.get("path")
        if not recorded:
            raise DatasetError(settings.registry, None,
                               f"expert {version.name!r} has no recorded dataset; re-register it with one")
        path = Path(recorded)
        if not path.is_absolute():
            path = settings.adapter_root / path
        if path.is_dir():
            rows = []
            for split in ("train", "val", "eval"):
                if (path / f"{split}.jsonl").is_file():
                    rows.extend(r.to_json() for r in read_chats(path / f"{split}.jsonl", need_assistant=False))
            path = scratch / f"{version.name}.jsonl"
            write_jsonl(path, rows)
        sources[version.name] = path
    return sources


def step_options(expert_steps: int, router_steps: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The expert's and the router's training options for `onboard` (the CLI's and Modal's)."""
    return ({"max_steps": expert_steps, "batch_size": 8, "progress": False},
            {"max_steps": router_steps, "batch_size": 16, "progress": False})


def onboard(
    name: str,
    dataset: Path,
    adapter: Path | None = None,
    train: bool = False,
    settings: Settings | None = None,
    router_name: str | None = None,
    floor: float | None = None,
    margin: float | None = None,
    promote: bool = True,
    expert_options: dict[str, Any] | None = None,
    router_options: dict[str, Any] | None = None,
    eval_limit: int | None = None,
) -> OnboardResult:
    from training.data.routing_dataset import build_routing_dataset
    from training.train.sft import TrainConfig, train_adapter

    settings = settings or Settings()
    floor = settings.gate_min_accuracy if floor is None else floor
    margin = settings.gate_max_recall_drop if margin is None else margin
    registry = Registry(settings.registry)
    base = _base(settings)  # once: every step below trains, evaluates or validates against it
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    seconds: dict[str, float] = {}
    dataset = Path(dataset).resolve()
    if dataset.is_file():
        read_chats(dataset)  # garbage in: a clear error naming file and line, before any training
    if (adapter is None) == (not train):
        raise DatasetError(dataset, None, "give exactly one of --adapter DIR or --train")

    started = time.perf_counter()
    if train:
        result = train_adapter(TrainConfig(kind="task", dataset=dataset, run_name=f"{name}-{stamp}",
                                           **(expert_options or {})), settings, base)
        adapter = result.final_dir
    seconds["expert_train"] = time.perf_counter() - started
    assert adapter is not None
    fingerprint = fingerprint_files(sorted(dataset.glob("*.jsonl")) if dataset.is_dir() else [dataset])
    snapshot = registry.load()
    serving = snapshot.entries.get(name)
    replaces = serving is not None and serving.active is not None  # new weights for a name that serves
    expert = service_register(settings, base, "task", name, adapter, activate=not replaces,
                              dataset={"path": str(dataset), "fingerprint": fingerprint})

    active = snapshot.router(router_name or settings.router)
    router_name = active.name if active else (router_name or "router")
    scratch = settings.adapter_root / "datasets" / f"onboard_{name}_{stamp}"
    scratch.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sources = expert_sources(settings, scratch, expert if replaces else None)
    routing = build_routing_dataset(sources, scratch / "routing")
    seconds["routing_dataset"] = time.perf_counter() - started

    labels = sorted(sources)
    options = dict(router_options or {})
    if active is not None and set(active.labels) <= set(labels):
        options.setdefault("init_adapter", settings.adapter_root / active.path)  # warm start: labels only grow
    started = time.perf_counter()
    trained = train_adapter(TrainConfig(kind="router", dataset=routing.path, run_name=f"router-{stamp}",
                                        **options), settings, base)
    seconds["router_train"] = time.perf_counter() - started

    started = time.perf_counter()
    review = review_candidate(settings, router_name, trained.final_dir, routing.path, labels, floor, margin,
                              promote, eval_limit, base, expert if replaces else None)
    seconds["evaluation"] = time.perf_counter() - started
    report_path = scratch / "onboard_report.json"
    result = OnboardResult(name, expert.version, router_name, review.version, review.promoted, review.gate,
                           routing.path, report_path, seconds, expert_active=not replaces or review.promoted)
    report_path.write_text(json.dumps({**result.to_json(), "candidate_report": review.candidate_report,
                                       "active_report": review.active_report}, indent=2, default=str))
    return result


@dataclass
class Review:
    version: int
    promoted: bool
    gate: GateResult
    candidate_report: dict[str, Any]
    active_report: dict[str, Any] | None


def review_candidate(settings: Settings, router_name: str, candidate_dir: Path, routing_dataset: Path,
                     labels: list[str], floor: float, margin: float, promote: bool = True,
                     eval_limit: int | None = None, base: BaseModelInfo | None = None,
                     expert: AdapterVersion | None = None) -> Review:
    """Evaluate a trained router beside the active one on the same eval split, register it as a
    candidate version, and promote it only if it passes the gate; a refused candidate is marked
    failed, so it can neither serve nor be shadowed. Both routers are evaluated on one engine.
    `expert`, a candidate version of an expert that already serves, is activated just before the
    router on promotion, and otherwise left as it is."""
    from training.evaluate.router_and_experts import EngineSession, evaluate_router_async

    base = base or _base(settings)
    registry = Registry(settings.registry)
    active = registry.load().router(router_name)

    async def evaluate_both() -> tuple[dict[str, Any], dict[str, Any] | None]:
        async with EngineSession(settings, base) as session:
            candidate = await evaluate_router_async(session, candidate_dir, routing_dataset, labels, limit=eval_limit)
            if active is None:
                return candidate.report, None
            old_labels = [label for label in active.labels if label in labels]
            current = await evaluate_router_async(session, settings.adapter_root / active.path, routing_dataset,
                                                  old_labels, limit=eval_limit)
            return candidate.report, current.report

    candidate_report, active_report = asyncio.run(evaluate_both())
    verdict = gate(candidate_report, active_report, floor, margin)
    candidate = service_register(settings, base, "router", router_name, candidate_dir,
                                 labels=tuple(labels), activate=False)
    promoted = False
    if not verdict.passed:
        registry.set_status(router_name, candidate.version, "failed")
    elif promote:
        if expert is not None:
            registry.activate(expert.name, expert.version)
        registry.activate(router_name, candidate.version)
        promoted = True
    return Review(candidate.version, promoted, verdict, candidate_report, active_report)


def _base(settings: Settings) -> BaseModelInfo:
    return resolve_base_model(settings.base_model, settings.cache_dir, settings.base_model_name)
