"""The training steps as Modal functions: the functions the `loramux` CLI calls, on the volumes.

Why this shape: each function is a thin wrapper that reloads the volumes it reads, calls what the CLI
command calls (`build_routing_dataset`, `train_adapter`, `evaluate_router`/`evaluate_expert`/
`evaluate_stacked`, `register_adapter`, `onboard`, the registry's router methods) and commits what it
wrote, adapters before models; registry writes commit themselves (`volume_sync.guard_registry_writes`).
Paths are relative to the adapters volume and may not leave it. The GPU steps run on
`LORAMUX_MODAL_TRAIN_GPU` (evaluation goes through vLLM, as the service does, sharded over the GPUs of
that string); HF_TOKEN goes only to the steps that may download the base model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import modal

from deploy.modal_app import resources
from deploy.modal_app.config import CONFIG, MINUTES, ModalConfig, container_env
from deploy.modal_app.images import training_image
from deploy.modal_app.volume_sync import commit, guard_registry_writes, reload

if TYPE_CHECKING:
    from service.settings import Settings

app = modal.App(f"{CONFIG.app_name}-training")


def training_options(config: ModalConfig, environ: Mapping[str, str], gpu: str | None = None,
                     download: bool = True) -> dict[str, Any]:
    """`app.function` options of a training step on `gpu` (None: CPU only). `download`: the step may fetch
    the base model (train, eval, register, ...), so it gets the HF secret; the others do not."""
    options: dict[str, Any] = {
        "image": training_image,
        "volumes": resources.VOLUMES,
        "secrets": [resources.hf_secret] if download else [],
        "env": container_env(config, environ, gpu or ""),
    }
    if gpu:
        options["gpu"] = gpu
    return options


def _relative(path: Path, settings: Settings) -> str:
    """Paths returned to the caller are relative to the adapters volume, as `modal volume get` wants them."""
    return str(path.resolve().relative_to(settings.adapter_root))


def _inside(path: str | Path, settings: Settings) -> Path:
    """A path the caller gave, relative to the adapters volume; refused if it leaves the volume."""
    from service.adapter_validation import resolve_inside_root

    return resolve_inside_root(path, settings.adapter_root)


@app.function(**training_options(CONFIG, os.environ, download=False), cpu=2.0, memory=4096, timeout=30 * MINUTES)
def remote_dataset(
    sources: list[str],
    out: str | None = None,
    uploads: dict[str, bytes] | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    eval_fraction: float = 0.1,
    balance: str = "upsample",
    max_per_class: int | None = None,
) -> dict[str, Any]:
    """`loramux dataset build` on the adapters volume: NAME=FILE sources (files on the volume, or `uploads`
    sent from the caller's machine) -> train/val/eval + card. No GPU: it only reads and splits text."""
    from service.settings import Settings
    from training.data.routing_dataset import build_routing_dataset, default_out_dir, parse_source_args

    reload(resources.adapters_volume)
    settings = Settings()
    parsed = parse_source_args(sources)
    out_dir = _inside(out, settings) if out else default_out_dir(settings.adapter_root)
    resolved: dict[str, Path] = {}
    for name, file in parsed.items():
        if uploads and name in uploads:
            target = out_dir.with_name(f"{out_dir.name}_sources") / f"{name}.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(uploads[name])
            resolved[name] = target
        else:
            resolved[name] = _inside(file, settings)
    fractions = (1.0 - val_fraction - eval_fraction, val_fraction, eval_fraction)
    result = build_routing_dataset(resolved, out_dir, fractions, seed, balance, max_per_class)
    commit(resources.adapters_volume)
    return {"path": _relative(result.path, settings), "labels": result.labels, "counts": result.counts}


@app.function(**training_options(CONFIG, os.environ, gpu=CONFIG.training_gpu), timeout=CONFIG.train_timeout)
def remote_train(kind: str, dataset: str, run_name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """`loramux train` on a GPU: LoRA SFT of the base model, `runs/<run_name>/final/` on the adapters volume.
    `options` are `training.train.sft.TrainConfig` fields (rank, alpha, learning_rate, max_steps, ...)."""
    from service.settings import Settings
    from training.train.sft import TrainConfig, train_adapter

    reload(resources.adapters_volume)
    settings = Settings()
    options = dict(options or {})
    if "target_modules" in options:
        options["target_modules"] = tuple(options["target_modules"])
    if options.get("runs_dir"):
        options["runs_dir"] = _inside(options["runs_dir"], settings)
    config = TrainConfig(kind=kind, dataset=_inside(dataset, settings), run_name=run_name,  # type: ignore[arg-type]
                         **options)
    result = train_adapter(config, settings)
    commit(resources.adapters_volume, resources.models_volume)
    return {"final_dir": _relative(result.final_dir, settings), "metrics": result.metadata.get("metrics", {}),
            "seconds": round(result.seconds, 1)}


@app.function(**training_options(CONFIG, os.environ, gpu=CONFIG.training_gpu), timeout=CONFIG.train_timeout)
def remote_eval(
    kind: str,
    dataset: str,
    adapter: str | None = None,
    name: str | None = None,
    split: str = "eval",
    limit: int | None = None,
    labels: list[str] | None = None,
) -> dict[str, Any]:
    """`loramux eval` on a GPU, through the serving engine (vLLM): the report is written under `reports/` on the
    adapters volume and returned with its text rendering."""
    from service.registry import Registry
    from service.settings import Settings
    from training.cli import _adapter_path
    from training.evaluate.reports import report_text, write_report
    from training.evaluate.router_and_experts import evaluate_expert, evaluate_router

    reload(resources.adapters_volume, resources.registry_volume)
    settings = Settings()
    path = _adapter_path(settings, _inside(adapter, settings) if adapter else None, name, kind)
    candidates = list(labels) if labels else None
    if kind == "router" and name and candidates is None:
        version = Registry(settings.registry).load().entries[name].active
        candidates = list(version.labels) if version and version.labels else None
    data = _inside(dataset, settings)
    if kind == "router":
        evaluation = evaluate_router(path, data, settings, labels=candidates, split=split, limit=limit)
    else:
        evaluation = evaluate_expert(path, data, settings, split=split, limit=limit)
    tag = name or (path.parent.name if path.name == "final" else path.name)
    out_dir = settings.adapter_root / "reports" / f"eval_{tag}_{datetime.now():%Y%m%d_%H%M%S}"
    paths = write_report(evaluation.report, out_dir)
    commit(resources.adapters_volume, resources.models_volume)
    return {"report": evaluation.report, "text": report_text(evaluation.report),
            "paths": {k: _relative(p, settings) for k, p in paths.items()}}


def _run_folder(run: str, settings: Settings) -> Path:
    """`--routing-run`: a run name (`runs/<run>/`, as `train` writes it) or a folder on the adapters volume."""
    named = settings.adapter_root / "runs" / run
    return named if "/" not in run and named.is_dir() else _inside(run, settings)


@app.function(**training_options(CONFIG, os.environ, gpu=CONFIG.training_gpu), timeout=CONFIG.train_timeout)
def remote_stacked(
    routing_dataset: str,
    routing_run: str | None = None,
    max_samples: int | None = None,
    split: str = "eval",
    router: str | None = None,
    max_tokens: int = 160,
) -> dict[str, Any]:
    """Stacked inference as an evaluation (`loramux eval --kind stacked`) on a GPU: every request of the routing
    dataset's split routed by the router (the run `routing_run`, else the registered `router` or the active
    one), answered by the registered expert it chose, scored against its reference, next to the true expert's
    and the base model's answers. The report goes under `reports/` on the adapters volume and is returned."""
    from service.settings import Settings
    from training.evaluate.reports import report_text, write_report
    from training.evaluate.stacked import evaluate_stacked, setup_from_registry
    from training.evaluate.stacked_report import summary

    reload(resources.adapters_volume, resources.registry_volume)
    settings = Settings()
    setup = setup_from_registry(settings, router, _run_folder(routing_run, settings) if routing_run else None)
    evaluation = evaluate_stacked(setup, _inside(routing_dataset, settings), settings, split=split, limit=max_samples,
                                  max_tokens=max_tokens)
    out_dir = settings.adapter_root / "reports" / f"stacked_{setup.router.name}_{datetime.now():%Y%m%d_%H%M%S}"
    paths = write_report(evaluation.report, out_dir)
    commit(resources.adapters_volume, resources.models_volume)
    return {"report": summary(evaluation.report), "text": report_text(evaluation.report),
            "paths": {k: _relative(p, settings) for k, p in paths.items()}}


@app.function(**training_options(CONFIG, os.environ), cpu=2.0, memory=8192, timeout=30 * MINUTES)
def remote_register(
    kind: str,
    name: str,
    path: str,
    description: str = "",
    labels: list[str] | None = None,
    activate: bool = True,
) -> dict[str, Any]:
    """`loramux register`: validate the adapter against the base model and add a version to the registry,
    committed by the write itself (`guard_registry_writes`); serving containers pick it up within
    LORAMUX_MODAL_VOLUME_RELOAD_S."""
    from service.settings import Settings
    from training.register.commands import RegistryContext, register_adapter

    reload(resources.adapters_volume, resources.registry_volume)
    guard_registry_writes()
    settings = Settings()
    version = register_adapter(kind, name, _inside(path, settings), description, labels, activate,  # type: ignore[arg-type]
                               RegistryContext(settings))
    commit(resources.models_volume)
    return {"name": version.name, "kind": version.kind, **version.to_json()}


@app.function(**training_options(CONFIG, os.environ, gpu=CONFIG.training_gpu), timeout=CONFIG.train_timeout)
def remote_onboard(
    name: str,
    dataset: str,
    adapter: str | None = None,
    train: bool = False,
    upload: bytes | None = None,
    router: str | None = None,
    floor: float | None = None,
    margin: float | None = None,
    promote: bool = True,
    expert_steps: int = 40,
    router_steps: int = 80,
    eval_limit: int | None = None,
) -> dict[str, Any]:
    """`loramux onboard` on a GPU: register the expert (trained first with `train`), retrain the router on the
    registered experts' datasets, gate it, promote it or leave it a candidate that serving containers shadow.
    The adapters volume is committed before the registry, so no container sees a version without its files."""
    from service.settings import Settings
    from training.register.onboard import onboard, step_options

    reload(resources.adapters_volume, resources.registry_volume)
    guard_registry_writes()
    settings = Settings()
    if upload is not None:
        data = settings.adapter_root / "datasets" / "uploads" / f"{name}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_bytes(upload)
    else:
        data = _inside(dataset, settings)
    expert_options, router_options = step_options(expert_steps, router_steps)
    result = onboard(name, data, _inside(adapter, settings) if adapter else None, train, settings,
                     router_name=router, floor=floor, margin=margin, promote=promote, eval_limit=eval_limit,
                     expert_options=expert_options, router_options=router_options)
    # the registry writes committed themselves, adapters first
    commit(resources.adapters_volume, resources.models_volume)
    return {**result.to_json(), "routing_dataset": _relative(result.routing_dataset, settings),
            "report_path": _relative(result.report_path, settings)}


@app.function(**training_options(CONFIG, os.environ, download=False), cpu=1.0, memory=2048, timeout=5 * MINUTES)
def remote_router(action: str, name: str | None = None, version: int | None = None) -> dict[str, Any]:
    """`loramux router promote|rollback|status` on the shared registry volume; serving containers switch
    routers between requests within LORAMUX_MODAL_VOLUME_RELOAD_S."""
    from service.registry import Registry
    from service.settings import Settings

    reload(resources.registry_volume)
    guard_registry_writes()
    registry = Registry(Settings().registry)
    if action == "promote":
        registry.promote_router(name, version)
    elif action == "rollback":
        registry.rollback_router(name)
    elif action != "status":
        raise ValueError(f"action must be promote, rollback or status, not {action!r}")
    entry = registry.load().entries[registry.router_name(name)]
    return {"router": entry.name, "active_version": entry.active_version,
            "versions": [{"version": v.version, "status": v.status, "labels": list(v.labels)} for v in entry.versions]}
