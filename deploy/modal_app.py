"""loramux on Modal: the GPU vLLM service and the training steps, in one app.

Why one file and these choices:

- The container serves the *same* FastAPI app as `loramux serve` (`service.api.app.create_app`), with the
  state built once per container by the same `build_state` the local server's lifespan uses, in
  `@modal.enter()`: the vLLM engine starts once, not per request, and every request of the container
  shares its continuous batch (`@modal.concurrent`).
- The image installs the project from its own `pyproject.toml` (the dependencies with the `vllm` and
  `train` extras, then the project itself with `--no-deps`): no second list of versions to drift.
- Three Volumes: the base model cache (written once, read by every container), the adapters (training
  runs, datasets, reports; pushed with `modal volume put`), and the registry on its own, so a
  registration is one small file that every serving container reloads without touching the weights.
  Modal Volumes are not shared file systems: a writer commits, a reader reloads, and of two commits of
  one file the last wins. So every registry write, in any container, is one transaction: commit the
  adapters, take a lock held in a `modal.Dict`, reload the registry, write, commit
  (`deploy/volume_writes.py`); the serving containers reload the adapters before the registry, so the
  service never reads a registry entry whose files it cannot see yet.
- The training steps are Modal functions that call the functions the `loramux` CLI calls
  (`build_routing_dataset`, `train_adapter`, `evaluate_router`/`evaluate_expert`/`evaluate_stacked`,
  `register_adapter`);
  a `local_entrypoint` per step replaces the seed's shell scripts.
- Every knob is an environment variable read at deploy time (`LORAMUX_MODAL_<FIELD>`, see `ModalConfig`),
  and the resolved values are handed to the containers, which import this file again and must agree.
  Any other `LORAMUX_*` service setting set at deploy time (say `LORAMUX_ROUTE_THRESHOLD`) is forwarded,
  except the API keys, which only ever come from the Modal secret.

Commands (see deploy/README.md):

    modal deploy deploy/modal_app.py
    modal run deploy/modal_app.py::dataset --sources lights=lights.jsonl,calendar=calendar.jsonl --out datasets/routing
    modal run deploy/modal_app.py::train --kind router --dataset datasets/routing --run-name router-v2
    modal run deploy/modal_app.py::eval --kind router --dataset datasets/routing --adapter runs/router-v2/final
    modal run deploy/modal_app.py::stacked --routing-run router-v2 --routing-dataset datasets/routing --max-samples 10
    modal run deploy/modal_app.py::register --kind router --name router --path runs/router-v2/final
    modal run deploy/modal_app.py::onboard --name robots --dataset robots.jsonl --train --no-promote
    modal run deploy/modal_app.py::router --action promote
    modal run deploy/modal_app.py::smoke
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import modal

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.settings import Settings
    from service.state import ServiceState

log = logging.getLogger("loramux.modal")

MINUTES = 60
HOURS = 60 * MINUTES

# The production base model and the exact revision the adapters are trained against: a new upstream
# commit must not change the weights under registered adapters (their base checksum would no longer match).
PRODUCTION_BASE_MODEL = "Qwen/Qwen3-VL-8B-Instruct"
PRODUCTION_BASE_MODEL_REVISION = "0c351dd01ed87e9c1b53cbc748cba10e6187ff3b"

# vLLM JIT-compiles some kernels (FlashInfer) at start, which needs the CUDA toolkit: a devel image, as in
# Modal's vLLM examples. Python 3.11 is the project's version.
CUDA_BASE_IMAGE = "nvidia/cuda:12.8.1-devel-ubuntu22.04"
PYTHON_VERSION = "3.11"
IMAGE_EXTRAS = ("vllm", "train")

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # only read on the deploying machine (image build)
PROJECT_IN_IMAGE = "/root/loramux"

# Where the volumes are mounted; the service settings point here (fixed: they must match the mounts).
MODELS_DIR = "/models"
ADAPTERS_DIR = "/adapters"
REGISTRY_DIR = "/registry"
REGISTRY_FILE = f"{REGISTRY_DIR}/loras.json"

ENV_PREFIX = "LORAMUX_MODAL_"
SECRET_SETTINGS = frozenset({"LORAMUX_API_KEYS", "LORAMUX_ADMIN_API_KEYS"})  # only from the Modal secret
LOCAL_ONLY_SETTINGS = frozenset({"LORAMUX_HOST", "LORAMUX_PORT"})  # Modal binds the endpoint, not uvicorn
VOLUME_SETTINGS = {
    "LORAMUX_CACHE_DIR": MODELS_DIR,
    "LORAMUX_ADAPTER_ROOT": ADAPTERS_DIR,
    "LORAMUX_REGISTRY": REGISTRY_FILE,
}


@dataclass(frozen=True)
class ModalConfig:
    """Deploy-time knobs; each field is `LORAMUX_MODAL_<FIELD>` in the environment of `modal deploy`/`modal run`."""

    app_name: str = "loramux"
    gpu: str = "H100"  # any Modal GPU string: "H100", "A100-80GB", "L40S", "H100:2"
    train_gpu: str = ""  # default: the same as `gpu`
    base_model: str = PRODUCTION_BASE_MODEL  # a Hugging Face hub id vLLM serves with LoRA
    base_model_revision: str = ""  # default: the pinned revision for the production model, else the hub's main
    max_model_len: int = 8192
    max_inputs: int = 64  # requests one container takes at once (they decode in one vLLM batch)
    target_inputs: int | None = None  # the autoscaler's target per container (default: max_inputs)
    min_containers: int = 0  # >0 keeps warm GPUs (no cold start, but billed while idle)
    max_containers: int | None = None
    scaledown_window: int = 15 * MINUTES  # idle seconds before a container stops (Modal allows 2..3600)
    startup_timeout: int = 30 * MINUTES  # first start downloads ~17 GB of weights and compiles
    request_timeout: int = 10 * MINUTES  # one HTTP request (streams included)
    train_timeout: int = 6 * HOURS
    volume_reload_s: float = 10.0  # how often a serving container looks for new registrations
    models_volume: str = "loramux-models"
    adapters_volume: str = "loramux-adapters"
    registry_volume: str = "loramux-registry"
    registry_lock: str = "loramux-registry-lock"  # a modal.Dict: one registry writer at a time, every container
    api_keys_secret: str = "loramux-api-keys"  # holds LORAMUX_API_KEYS (and optionally LORAMUX_ADMIN_API_KEYS)
    hf_secret: str = "huggingface"  # holds HF_TOKEN (gated or private models; faster downloads)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ModalConfig:
        """Read `LORAMUX_MODAL_*`; a bad value fails the deploy at import, before anything is created."""
        values: dict[str, Any] = {}
        for spec in fields(cls):
            raw = environ.get(ENV_PREFIX + spec.name.upper(), "").strip()
            if not raw:
                continue
            kind = str(spec.type).replace(" | None", "")
            try:
                values[spec.name] = int(raw) if kind == "int" else float(raw) if kind == "float" else raw
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX}{spec.name.upper()}={raw!r} is not a valid {kind}") from exc
        return cls(**values)

    @property
    def training_gpu(self) -> str:
        return self.train_gpu or self.gpu

    @property
    def revision(self) -> str | None:
        """The pinned revision applies to the production model only; another model uses its own or main."""
        if self.base_model_revision:
            return self.base_model_revision
        return PRODUCTION_BASE_MODEL_REVISION if self.base_model == PRODUCTION_BASE_MODEL else None

    @property
    def base_model_setting(self) -> str:
        """`LORAMUX_BASE_MODEL`: `repo@revision`, which `service.base_model.resolve_base_model` downloads."""
        if self.revision and "@" not in self.base_model:
            return f"{self.base_model}@{self.revision}"
        return self.base_model

    def to_env(self) -> dict[str, str]:
        """The resolved knobs, for the containers: they import this file again and must build the same objects
        (volume names, reload interval) as the deploying machine did."""
        return {ENV_PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) not in (None, "")}


def container_env(config: ModalConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """Environment of every container: the service settings for the GPU (vLLM, bf16, volume paths), any
    `LORAMUX_*` setting given at deploy time, and the resolved deploy config."""
    env = {
        "LORAMUX_ENGINE": "vllm",
        "LORAMUX_DTYPE": "bfloat16",
        "LORAMUX_MAX_MODEL_LEN": str(config.max_model_len),
        "LORAMUX_MAX_QUEUE": str(config.max_inputs),  # admission matches Modal's per-container concurrency
        "LORAMUX_MAX_BATCH_SIZE": str(config.max_inputs),  # and every admitted request decodes in the batch
        "LORAMUX_REQUEST_TIMEOUT_S": str(max(1, config.request_timeout - 30)),  # our 504 before Modal's cut
    }
    env.update({k: v for k, v in environ.items()
                if k.startswith("LORAMUX_") and not k.startswith(ENV_PREFIX)
                and k not in SECRET_SETTINGS | LOCAL_ONLY_SETTINGS})
    env.update(VOLUME_SETTINGS)
    env.update({
        "LORAMUX_BASE_MODEL": config.base_model_setting,
        "HF_HOME": f"{MODELS_DIR}/hf",  # hub metadata and xet cache live with the weights
        "VLLM_CACHE_ROOT": f"{MODELS_DIR}/vllm",  # torch.compile artifacts survive cold starts
        "HF_XET_HIGH_PERFORMANCE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    env.update(config.to_env())
    return env


CONFIG = ModalConfig.from_env(os.environ)
ENV = container_env(CONFIG, os.environ)

# ---- image, volumes, secrets ------------------------------------------------------------------------------

image = (
    modal.Image.from_registry(CUDA_BASE_IMAGE, add_python=PYTHON_VERSION)
    .entrypoint([])  # the CUDA image's entrypoint prints a banner and would wrap Modal's
    # the dependencies, from the project's pyproject (this layer is rebuilt only when the pyproject changes)
    .pip_install_from_pyproject(str(PROJECT_ROOT / "pyproject.toml"), optional_dependencies=list(IMAGE_EXTRAS))
    # then the project itself, as a package (`loramux` on PATH), without resolving anything again
    .add_local_file(PROJECT_ROOT / "pyproject.toml", f"{PROJECT_IN_IMAGE}/pyproject.toml", copy=True)
    .add_local_file(PROJECT_ROOT / "README.md", f"{PROJECT_IN_IMAGE}/README.md", copy=True)
    .add_local_dir(PROJECT_ROOT / "service", f"{PROJECT_IN_IMAGE}/service", copy=True, ignore=["**/__pycache__"])
    .add_local_dir(PROJECT_ROOT / "training", f"{PROJECT_IN_IMAGE}/training", copy=True, ignore=["**/__pycache__"])
    .run_commands(f"python -m pip install --no-deps {PROJECT_IN_IMAGE}")
)

models_volume = modal.Volume.from_name(CONFIG.models_volume, create_if_missing=True)
adapters_volume = modal.Volume.from_name(CONFIG.adapters_volume, create_if_missing=True)
registry_volume = modal.Volume.from_name(CONFIG.registry_volume, create_if_missing=True)
registry_locks = modal.Dict.from_name(CONFIG.registry_lock, create_if_missing=True)
VOLUMES: dict[str | os.PathLike[str], modal.Volume] = {
    MODELS_DIR: models_volume,
    ADAPTERS_DIR: adapters_volume,
    REGISTRY_DIR: registry_volume,
}

api_keys_secret = modal.Secret.from_name(CONFIG.api_keys_secret, required_keys=["LORAMUX_API_KEYS"])
hf_secret = modal.Secret.from_name(CONFIG.hf_secret)

app = modal.App(CONFIG.app_name)


def running_in_modal() -> bool:
    """True inside a Modal container. Outside (tests, `.local()` calls) volumes are plain folders: no commit."""
    return not modal.is_local()


def commit(*volumes: Any) -> None:
    """Publish this container's writes to the other containers (in order: adapters before the registry)."""
    if running_in_modal():
        for volume in volumes:
            volume.commit()


def reload(*volumes: Any) -> None:
    """See what other containers committed (a warm container may have mounted the volume long ago)."""
    if running_in_modal():
        for volume in volumes:
            volume.reload()


LOCK_DIR = Path("/tmp/loramux-locks")  # the registry's file lock, off the volume (container-local)


def guard_registry_writes() -> None:
    """Make every registry write of this container one transaction across containers (commit the
    adapters, take the shared lock, reload, write, commit: `deploy.volume_writes`). Outside Modal the
    file lock alone serializes writers, as for `loramux serve`."""
    from deploy.volume_writes import VolumeWriteGuard
    from service.registry import use_write_guard

    if running_in_modal():
        use_write_guard(VolumeWriteGuard(registry_locks, registry_volume, before=(adapters_volume,)), LOCK_DIR)


# ---- the service ------------------------------------------------------------------------------------------


def service_settings() -> Settings:
    """The service settings of a serving container, from its environment. The Modal endpoint is public, so the
    rule for binding a public address applies: without LORAMUX_API_KEYS (or LORAMUX_ALLOW_INSECURE=true) the
    container refuses to start instead of serving an open endpoint."""
    from service.settings import Settings

    return Settings(host="0.0.0.0")


@dataclass
class VolumeRefresher:
    """Keeps a serving container's view of the adapters and the registry current.

    One `tick`: reload the adapters, then the registry, under the registry's local file lock (a reload
    never lands in the middle of this container's own write). The service's own registry watcher
    (`LORAMUX_REGISTRY_POLL_S`) then loads, swaps or unloads adapters. This container's admin writes
    need no publishing here: each was committed inside its own write transaction
    (`guard_registry_writes`), so none can slip between a check and a commit. A reload refused because
    a file is open (an adapter being read) is retried on the next tick; the registry is not reloaded in
    a tick whose adapters reload failed."""

    registry_file: Path
    adapters: Any
    registry: Any

    def tick(self) -> str:
        from service.registry import Registry

        with Registry(self.registry_file).read_lock():
            self.adapters.reload()
            self.registry.reload()
        return "reloaded"

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.tick)
            except Exception as exc:  # open files, a transient API error: the next tick tries again
                log.warning("volume refresh skipped: %s", exc)


@app.cls(
    image=image,
    gpu=CONFIG.gpu,
    volumes=VOLUMES,
    secrets=[api_keys_secret, hf_secret],
    env=ENV,
    min_containers=CONFIG.min_containers,
    max_containers=CONFIG.max_containers,
    scaledown_window=CONFIG.scaledown_window,
    startup_timeout=CONFIG.startup_timeout,
    timeout=CONFIG.request_timeout,
)
@modal.concurrent(max_inputs=CONFIG.max_inputs, target_inputs=CONFIG.target_inputs)
class Server:
    """One GPU container: the vLLM engine, the registry's adapters, the HTTP API."""

    state: ServiceState
    refresher: asyncio.Task[None] | None = None

    @modal.enter()
    async def start(self) -> None:
        """Download (first time) and load the base model, start vLLM, load the registered adapters: once per
        container, on the event loop that then serves the requests (the engine's tasks live there)."""
        from service.api.app import build_state

        # Modal's blocking volume calls go to a thread: this method runs on the container's event loop
        await asyncio.to_thread(reload, adapters_volume, registry_volume)
        guard_registry_writes()  # admin writes from this replica: one writer across all containers
        self.state = await build_state(service_settings())
        await asyncio.to_thread(commit, models_volume)  # the first download serves every later cold start
        if running_in_modal():
            refresher = VolumeRefresher(Path(REGISTRY_FILE), adapters_volume, registry_volume)
            self.refresher = asyncio.create_task(refresher.run(CONFIG.volume_reload_s), name="volume-refresh")

    @modal.exit()
    async def stop(self) -> None:
        """Drain: stop watching, unload, shut the engine down (Modal sends SIGTERM first, then waits)."""
        from service.api.app import close_state

        if self.refresher is not None:
            self.refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.refresher
        await close_state(self.state)

    @modal.asgi_app()
    def web(self) -> FastAPI:
        """The same FastAPI app as `loramux serve`, over the state built in `start`."""
        from service.api.app import create_app

        return create_app(self.state.settings, self.state)


# ---- training: the CLI's functions on Modal ----------------------------------------------------------------

TRAINING = {"image": image, "volumes": VOLUMES, "secrets": [hf_secret], "env": ENV}


def _relative(path: Path, settings: Settings) -> str:
    """Paths returned to the caller are relative to the adapters volume, as `modal volume get` wants them."""
    return str(path.resolve().relative_to(settings.adapter_root))


def _inside(path: str | Path, settings: Settings) -> Path:
    """A path the caller gave, relative to the adapters volume; refused if it leaves the volume."""
    from service.adapter_validation import resolve_inside_root

    return resolve_inside_root(path, settings.adapter_root)


@app.function(**TRAINING, cpu=2.0, memory=4096, timeout=30 * MINUTES)
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
    from training.routing_dataset import build_routing_dataset, default_out_dir, parse_source_args

    reload(adapters_volume)
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
    commit(adapters_volume)
    return {"path": _relative(result.path, settings), "labels": result.labels, "counts": result.counts}


@app.function(**TRAINING, gpu=CONFIG.training_gpu, timeout=CONFIG.train_timeout)
def remote_train(kind: str, dataset: str, run_name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """`loramux train` on a GPU: LoRA SFT of the base model, `runs/<run_name>/final/` on the adapters volume.
    `options` are `training.train.TrainConfig` fields (rank, alpha, learning_rate, max_steps, ...)."""
    from service.settings import Settings
    from training.train import TrainConfig, train_adapter

    reload(adapters_volume)
    settings = Settings()
    options = dict(options or {})
    if "target_modules" in options:
        options["target_modules"] = tuple(options["target_modules"])
    if options.get("runs_dir"):
        options["runs_dir"] = _inside(options["runs_dir"], settings)
    config = TrainConfig(kind=kind, dataset=_inside(dataset, settings), run_name=run_name,  # type: ignore[arg-type]
                         **options)
    result = train_adapter(config, settings)
    commit(adapters_volume, models_volume)
    return {"final_dir": _relative(result.final_dir, settings), "metrics": result.metadata.get("metrics", {}),
            "seconds": round(result.seconds, 1)}


@app.function(**TRAINING, gpu=CONFIG.training_gpu, timeout=CONFIG.train_timeout)
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
    from training.evaluate import evaluate_expert, evaluate_router
    from training.reports import report_text, write_report

    reload(adapters_volume, registry_volume)
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
    commit(adapters_volume, models_volume)
    return {"report": evaluation.report, "text": report_text(evaluation.report),
            "paths": {k: _relative(p, settings) for k, p in paths.items()}}


def _run_folder(run: str, settings: Settings) -> Path:
    """`--routing-run`: a run name (`runs/<run>/`, as `train` writes it) or a folder on the adapters volume."""
    named = settings.adapter_root / "runs" / run
    return named if "/" not in run and named.is_dir() else _inside(run, settings)


@app.function(**TRAINING, gpu=CONFIG.training_gpu, timeout=CONFIG.train_timeout)
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
    from training.reports import report_text, write_report
    from training.stacked import evaluate_stacked, setup_from_registry
    from training.stacked_report import summary

    reload(adapters_volume, registry_volume)
    settings = Settings()
    setup = setup_from_registry(settings, router, _run_folder(routing_run, settings) if routing_run else None)
    evaluation = evaluate_stacked(setup, _inside(routing_dataset, settings), settings, split=split, limit=max_samples,
                                  max_tokens=max_tokens)
    out_dir = settings.adapter_root / "reports" / f"stacked_{setup.router.name}_{datetime.now():%Y%m%d_%H%M%S}"
    paths = write_report(evaluation.report, out_dir)
    commit(adapters_volume, models_volume)
    return {"report": summary(evaluation.report), "text": report_text(evaluation.report),
            "paths": {k: _relative(p, settings) for k, p in paths.items()}}


@app.function(**TRAINING, cpu=2.0, memory=8192, timeout=30 * MINUTES)
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
    from training.register import RegistryContext, register_adapter

    reload(adapters_volume, registry_volume)
    guard_registry_writes()
    settings = Settings()
    version = register_adapter(kind, name, _inside(path, settings), description, labels, activate,  # type: ignore[arg-type]
                               RegistryContext(settings))
    commit(models_volume)
    return {"name": version.name, "kind": version.kind, **version.to_json()}


@app.function(**TRAINING, gpu=CONFIG.training_gpu, timeout=CONFIG.train_timeout)
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
    from training.onboard import onboard, step_options

    reload(adapters_volume, registry_volume)
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
    commit(adapters_volume, models_volume)  # the registry writes committed themselves, adapters first
    return {**result.to_json(), "routing_dataset": _relative(result.routing_dataset, settings),
            "report_path": _relative(result.report_path, settings)}


@app.function(**TRAINING, cpu=1.0, memory=2048, timeout=5 * MINUTES)
def remote_router(action: str, name: str | None = None, version: int | None = None) -> dict[str, Any]:
    """`loramux router promote|rollback|status` on the shared registry volume; serving containers switch
    routers between requests within LORAMUX_MODAL_VOLUME_RELOAD_S."""
    from service.registry import Registry
    from service.settings import Settings

    reload(registry_volume)
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


# ---- local entrypoints: `modal run deploy/modal_app.py::<step>` -------------------------------------------


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


@app.local_entrypoint()
def dataset(
    sources: str,
    out: str = "",
    seed: int = 0,
    val_fraction: float = 0.1,
    eval_fraction: float = 0.1,
    balance: str = "upsample",
    max_per_class: int | None = None,
) -> None:
    """Routing dataset on the adapters volume. `--sources lights=lights.jsonl,calendar=cal.jsonl`: a FILE that
    exists on this machine is uploaded, otherwise it is a path on the adapters volume."""
    pairs = _split(sources)
    uploads: dict[str, bytes] = {}
    for pair in pairs:
        name, _, file = pair.partition("=")
        if file and Path(file).expanduser().is_file():
            uploads[name.strip()] = Path(file).expanduser().read_bytes()
    result = remote_dataset.remote(pairs, out or None, uploads or None, seed, val_fraction, eval_fraction, balance,
                                   max_per_class)
    _print(result)


@app.local_entrypoint()
def train(
    kind: str,
    dataset: str,
    run_name: str,
    rank: int | None = None,
    alpha: int | None = None,
    dropout: float | None = None,
    target_modules: str = "",
    lr: float | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    max_length: int | None = None,
    seed: int | None = None,
    save_steps: int | None = None,
    resume: bool = True,
    overwrite: bool = False,
    description: str = "",
) -> None:
    """LoRA SFT on a GPU (`loramux train`); unset options keep `TrainConfig`'s defaults."""
    options: dict[str, Any] = {
        "rank": rank, "alpha": alpha, "dropout": dropout, "learning_rate": lr, "epochs": epochs,
        "max_steps": max_steps, "batch_size": batch_size, "grad_accum": grad_accum, "max_length": max_length,
        "seed": seed, "save_steps": save_steps,
    }
    options = {k: v for k, v in options.items() if v is not None}
    if target_modules:
        options["target_modules"] = _split(target_modules)
    options.update(resume=resume, overwrite=overwrite, description=description)
    _print(remote_train.remote(kind, dataset, run_name, options))


@app.local_entrypoint(name="eval")  # `modal run deploy/modal_app.py::eval`, as `loramux eval`
def evaluate(
    kind: str,
    dataset: str,
    adapter: str = "",
    name: str = "",
    split: str = "eval",
    limit: int | None = None,
    labels: str = "",
    as_json: bool = False,
) -> None:
    """Router or expert evaluation on a GPU (`loramux eval`): give `--adapter PATH` (on the volume) or `--name`."""
    result = remote_eval.remote(kind, dataset, adapter or None, name or None, split, limit, _split(labels) or None)
    if as_json:
        _print(result["report"])
    else:
        print(result["text"])
        print(f"\nreport on the volume {CONFIG.adapters_volume}: " + ", ".join(result["paths"].values()))


@app.local_entrypoint()
def stacked(
    routing_dataset: str,
    routing_run: str = "",
    max_samples: int | None = None,
    split: str = "eval",
    router: str = "",
    max_tokens: int = 160,
    as_json: bool = False,
) -> None:
    """Stacked inference over a routing dataset on a GPU, the seed's `--routing-run RUN --routing-dataset DIR
    --max-samples 10`: route, answer with the chosen expert, score; the report is printed and kept on the volume."""
    result = remote_stacked.remote(routing_dataset, routing_run or None, max_samples, split, router or None,
                                   max_tokens)
    if as_json:
        _print(result["report"])
    else:
        print(result["text"])
        print(f"\nreport on the volume {CONFIG.adapters_volume}: " + ", ".join(result["paths"].values()))


@app.local_entrypoint()
def register(
    kind: str,
    name: str,
    path: str,
    description: str = "",
    labels: str = "",
    activate: bool = True,
) -> None:
    """Validated, versioned registration (`loramux register`); the live service loads it without a restart."""
    _print(remote_register.remote(kind, name, path, description, _split(labels) or None, activate))


@app.local_entrypoint()
def onboard(
    name: str,
    dataset: str,
    adapter: str = "",
    train: bool = False,
    router: str = "",
    floor: float | None = None,
    margin: float | None = None,
    promote: bool = True,
    expert_steps: int = 40,
    router_steps: int = 80,
    eval_limit: int | None = None,
) -> None:
    """Add an expert to the live service (`loramux onboard`): `--dataset` is uploaded when it is a file on this
    machine, otherwise a path on the adapters volume."""
    local = Path(dataset).expanduser()
    upload = local.read_bytes() if local.is_file() else None
    result = remote_onboard.remote(name, dataset, adapter or None, train, upload, router or None, floor, margin,
                                   promote, expert_steps, router_steps, eval_limit)
    _print(result)
    if not result["gate"]["passed"]:
        raise SystemExit(3)


@app.local_entrypoint(name="router")
def router_versions(action: str = "status", name: str = "", version: int | None = None) -> None:
    """`--action promote|rollback|status` on the shared registry (`loramux router ...`)."""
    _print(remote_router.remote(action, name or None, version))


# ---- smoke test of a deployed service ---------------------------------------------------------------------


def _request(url: str, api_key: str, body: dict[str, Any] | None, timeout: float) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - the caller's own URL
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            payload = json.loads(exc.read() or b"{}")
        except ValueError:
            payload = {}
        return exc.code, payload


def smoke_check(base_url: str, api_key: str, prompt: str, timeout: float = 600.0) -> dict[str, Any]:
    """`/health`, then one routed request: `POST /route` (which adapter the router picks) and
    `POST /v1/chat/completions` with `model="auto"`. Raises with the failing step; returns what it saw.
    The first call may wait for a cold start (model download, vLLM compile), hence the long timeout."""
    base = base_url.rstrip("/")
    status, health = _request(f"{base}/health", api_key, None, timeout)
    if status != 200 or health.get("status") != "ok":
        raise RuntimeError(f"GET /health answered {status}: {health}")
    status, route = _request(f"{base}/route", api_key, {"prompt": prompt}, timeout)
    if status != 200 or "adapter" not in route:
        raise RuntimeError(f"POST /route answered {status}: {route}")
    body = {"model": "auto", "messages": [{"role": "user", "content": prompt}], "max_tokens": 64}
    status, chat = _request(f"{base}/v1/chat/completions", api_key, body, timeout)
    if status != 200 or not chat.get("choices"):
        raise RuntimeError(f"POST /v1/chat/completions answered {status}: {chat}")
    return {
        "health": health,
        "route": {k: route.get(k) for k in ("adapter", "version", "confidence", "fallback")},
        "chat": {"model": chat.get("model"), "text": chat["choices"][0].get("message", {}).get("content")},
    }


@app.local_entrypoint()
def smoke(url: str = "", prompt: str = "turn on the kitchen lights") -> None:
    """Check a deployed service: `/health` and one routed request. The URL defaults to the deployed app's
    endpoint; the key comes from LORAMUX_API_KEY on this machine."""
    if not url:
        deployed = modal.Cls.from_name(CONFIG.app_name, "Server")
        url = deployed().web.get_web_url() or ""
    if not url:
        raise SystemExit(f"no web endpoint found for the deployed app {CONFIG.app_name!r}: deploy it first")
    result = smoke_check(url, os.environ.get("LORAMUX_API_KEY", ""), prompt)
    _print({"url": url, **result})
