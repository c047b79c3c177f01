"""The deployed app, composed, and its `modal run -m deploy.modal_app::<step>` commands.

Why here: Modal deploys one App, and `app.include` merges the serving replica (`server.py`) and the
training steps (`training.py`) into it; local entrypoints are not carried by `include`, so they are
declared on the composed app. Each command turns its command line into one remote call, printing what
comes back; a `--sources`/`--dataset` FILE that exists on this machine is uploaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import modal

from deploy.modal_app import server, training
from deploy.modal_app.config import CONFIG
from deploy.modal_app.smoke import smoke_check
from deploy.modal_app.training import (
    remote_dataset,
    remote_eval,
    remote_onboard,
    remote_register,
    remote_router,
    remote_stacked,
    remote_train,
)

app = modal.App(CONFIG.app_name).include(server.app).include(training.app)


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _print_report(result: dict, as_json: bool) -> None:
    """An evaluation's result: its report as JSON, or its text and where the written files are."""
    if as_json:
        _print(result["report"])
    else:
        print(result["text"])
        print(f"\nreport on the volume {CONFIG.adapters_volume}: " + ", ".join(result["paths"].values()))


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


@app.local_entrypoint(name="eval")  # `modal run -m deploy.modal_app::eval`, as `loramux eval`
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
    _print_report(result, as_json)


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
    _print_report(result, as_json)


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


@app.local_entrypoint()
def router(action: str = "status", name: str = "", version: int | None = None) -> None:
    """`--action promote|rollback|status` on the shared registry (`loramux router ...`)."""
    _print(remote_router.remote(action, name or None, version))


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
