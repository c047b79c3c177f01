"""Training subcommands of `loramux`: dataset, train, eval, register, adapters, demo.

Each command is a thin shell over a plain function (`build_routing_dataset`, `train_adapter`,
`evaluate_router`, `register_adapter`, `run_demo`, ...) so the Modal deployment and the tests call
the same code. Expected failures (bad data, bad options, a refused adapter) become one-line
errors with a non-zero exit code and no traceback.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

try:  # typer >= 0.20 ships its own click
    from typer._click.exceptions import UsageError as CliUsageError
except ImportError:  # pragma: no cover - older typer on real click
    from click import UsageError as CliUsageError

F = TypeVar("F", bound=Callable[..., Any])


class AdapterKind(StrEnum):
    router = "router"
    task = "task"


class EvalKind(StrEnum):
    router = "router"
    task = "task"
    stacked = "stacked"  # route, answer with the chosen expert, score (training.evaluate.stacked)


class CliError(Exception):
    """An expected failure: printed as one plain `error: ...` line (exit code 2), like `loramux serve`.

    Plain text rather than click's boxed panel, so long messages (file paths with line numbers)
    are never wrapped or cut by the terminal width."""


def _friendly_errors(fn: F) -> F:
    """Turn the package's expected errors into one `error: ...` line, exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from service.engine.errors import EngineError
        from service.errors import LoramuxError
        from training.data.chats import DatasetError
        from training.data.splits import SplitError
        from training.train.sft import TrainError

        try:
            return fn(*args, **kwargs)
        except (CliError, DatasetError, SplitError, TrainError, FileNotFoundError) as exc:
            message = str(exc)
        except (LoramuxError, EngineError) as exc:  # the service's refusals, and an engine's (evaluation)
            message = exc.message
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2)

    return wrapper  # type: ignore[return-value]


def _settings() -> Any:
    from service.settings import Settings

    try:
        return Settings()
    except ValueError as exc:
        raise CliError(f"settings: {exc}") from None


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


dataset_app = typer.Typer(help="Build datasets: routing data from per-adapter chats, demo expert data.",
                          no_args_is_help=True)
adapters_app = typer.Typer(help="Registry management: list, show, rollback, remove, restore.", no_args_is_help=True)


@dataset_app.command("build")
@_friendly_errors
def dataset_build(
    source: Annotated[list[str], typer.Option(help="NAME=FILE.jsonl: chats adapter NAME should answer (repeat)")],
    out: Annotated[Path | None, typer.Option(help="output folder (default datasets/routing_<timestamp>)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the split and of balancing")] = 0,
    val_fraction: Annotated[float, typer.Option(help="share of each adapter's texts for validation")] = 0.1,
    eval_fraction: Annotated[float, typer.Option(help="share of each adapter's texts for evaluation")] = 0.1,
    balance: Annotated[str, typer.Option(help="train split balancing: upsample, cap or none")] = "upsample",
    max_per_class: Annotated[int | None, typer.Option(help="at most this many texts per adapter")] = None,
) -> None:
    """Routing dataset (train/val/eval + card) from per-adapter chat files."""
    from training.data.routing_dataset import build_routing_dataset, default_out_dir, parse_source_args

    sources = parse_source_args(source)
    out_dir = out or default_out_dir(Path.cwd())
    fractions = (1.0 - val_fraction - eval_fraction, val_fraction, eval_fraction)
    result = build_routing_dataset(sources, out_dir, fractions, seed, balance, max_per_class)
    typer.echo(f"routing dataset written to {result.path}")
    for split, counts in result.counts.items():
        typer.echo(f"  {split:5s} " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    processing = result.card["processing"]
    typer.echo(f"  dropped: {processing['duplicates dropped']} duplicates, {processing['ambiguous texts dropped']}")
    typer.echo(f"  balance ({balance}): " + ", ".join(
        f"{k} {v['before']}->{v['after']}" for k, v in processing["balance report"].items()))


@dataset_app.command("experts")
@_friendly_errors
def dataset_experts(
    out: Annotated[Path | None, typer.Option(help="output folder (default datasets/experts_<timestamp>)")] = None,
    experts: Annotated[str, typer.Option(help="comma-separated experts")] = ",".join(
        ("lights", "climate", "timer", "media", "lists", "calendar")),
    per_expert: Annotated[int, typer.Option(help="records per expert")] = 400,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Expert datasets from home-assistant-intents (hassil) and the ctparse corpus."""
    from training.data.routing_dataset import default_out_dir
    from training.data.task_datasets import build_task_datasets

    out_dir = out or default_out_dir(Path.cwd(), "experts")
    names = [n.strip() for n in experts.split(",") if n.strip()]
    try:
        built = build_task_datasets(out_dir, names, per_expert, seed)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    typer.echo(f"expert datasets written to {out_dir}")
    for name, data in built.items():
        typer.echo(f"  {name:9s} {data.counts}  ({data.all_file})")


def train_command(
    kind: Annotated[AdapterKind, typer.Option(help="router or task")],
    dataset: Annotated[Path, typer.Option(help="folder with train/val/eval.jsonl, or one chat JSONL file")],
    run_name: Annotated[str, typer.Option(help="runs/<run-name>/ gets the checkpoints and final/")],
    runs_dir: Annotated[Path | None, typer.Option(help="default: <adapter_root>/runs")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank")] = 16,
    alpha: Annotated[int, typer.Option(help="LoRA alpha")] = 32,
    dropout: Annotated[float, typer.Option(help="LoRA dropout")] = 0.05,
    target_modules: Annotated[str, typer.Option(help="comma-separated module names")] = (
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
    lr: Annotated[float | None, typer.Option(help="learning rate (default: 2e-3 routers, 1e-3 experts)")] = None,
    epochs: Annotated[float | None, typer.Option(
        help="epochs (ignored when --max-steps > 0; default: derived from the dataset's size)")] = None,
    max_steps: Annotated[int, typer.Option(help="optimizer steps; > 0 overrides --epochs")] = -1,
    batch_size: Annotated[int, typer.Option(help="examples per device step")] = 16,
    grad_accum: Annotated[int, typer.Option(help="gradient accumulation steps")] = 1,
    max_length: Annotated[int, typer.Option(help="longer examples are dropped (reported)")] = 256,
    seed: Annotated[int, typer.Option()] = 0,
    save_steps: Annotated[int, typer.Option(help="checkpoint every N steps")] = 50,
    early_stopping: Annotated[bool, typer.Option(
        help="routers: validate about once per epoch, keep the best weights, stop when it stops improving")] = True,
    calibrate: Annotated[bool, typer.Option(help="routers: fit the confidence temperature on the val split")] = True,
    resume: Annotated[bool, typer.Option(help="continue from the last checkpoint if any")] = True,
    overwrite: Annotated[bool, typer.Option(help="replace a finished run of the same name")] = False,
    description: Annotated[str, typer.Option()] = "",
) -> None:
    """LoRA SFT (TRL SFTTrainer + peft); writes runs/NAME/final/ with loramux.json."""
    from training.train.sft import TrainConfig, train_adapter

    config = TrainConfig(
        kind=kind.value,  # type: ignore[arg-type]
        dataset=dataset,
        run_name=run_name,
        runs_dir=runs_dir,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        target_modules=tuple(t.strip() for t in target_modules.split(",") if t.strip()),
        learning_rate=lr,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_length=max_length,
        seed=seed,
        save_steps=save_steps,
        early_stopping=early_stopping,
        calibrate=calibrate,
        resume=resume,
        overwrite=overwrite,
        description=description,
    )
    result = train_adapter(config, _settings())
    typer.echo(f"adapter written to {result.final_dir}")
    if result.plan is not None:
        typer.echo(f"  plan: {result.plan.why}")
    typer.echo(f"  length filter: {result.length_report.summary()}")
    if result.metadata.get("calibration"):
        cal = result.metadata["calibration"]
        if "val_ece_before" in cal:
            typer.echo(f"  calibration: temperature {cal['temperature']}, validation ECE "
                       f"{cal['val_ece_before']} -> {cal['val_ece_after']}")
    typer.echo("  metrics: " + ", ".join(f"{k}={v}" for k, v in result.metadata["metrics"].items()))


def eval_command(
    kind: Annotated[EvalKind, typer.Option(help="router, task or stacked (route, answer with the chosen expert, "
                                                "score)")],
    dataset: Annotated[Path, typer.Option(help="dataset folder (its eval split is used) or a chat JSONL")],
    adapter: Annotated[Path | None, typer.Option(help="adapter folder (a run folder or its final/)")] = None,
    name: Annotated[str | None, typer.Option(help="a registered adapter instead of --adapter")] = None,
    split: Annotated[str, typer.Option(help="train, val or eval")] = "eval",
    limit: Annotated[int | None, typer.Option("--limit", "--max-samples",
                                              help="evaluate a seeded sample of this many examples")] = None,
    labels: Annotated[str | None, typer.Option(help="router candidates, comma-separated (default: its labels)")]
    = None,
    router: Annotated[str | None, typer.Option(help="stacked: the registered router (default: the active one)")]
    = None,
    server: Annotated[str | None, typer.Option(
        help="stacked: evaluate through the service at this URL (key from LORAMUX_API_KEY)")] = None,
    max_tokens: Annotated[int, typer.Option(help="stacked: new tokens per answer")] = 160,
    out: Annotated[Path | None, typer.Option(help="report folder (default reports/eval_<name>_<timestamp>)")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON report instead of tables")] = False,
    with_tools: Annotated[bool, typer.Option(
        "--with-tools", help="task: every request declares the expert's tools (the dataset card's tool_schemas), "
                             "as an agent framework sends them")] = False,
) -> None:
    """Router (accuracy, P/R/F1, confusion, invalid names, calibration), expert, or stacked evaluation
    (routing accuracy, end-to-end, oracle and base scores, where the gap goes, per expert)."""
    from training.evaluate.reports import report_text, write_report
    from training.evaluate.router_and_experts import EngineSession, evaluate_expert_async, evaluate_router_async

    kind_name = kind.value
    settings = _settings()
    if kind_name == "stacked":
        _eval_stacked(settings, dataset, split, limit, router, server, max_tokens, out, as_json)
        return
    candidates = [x.strip() for x in labels.split(",") if x.strip()] if labels else None
    path = _adapter_path(settings, adapter, name, kind_name)
    if kind_name == "router" and name and candidates is None:
        from service.registry import Registry

        version = Registry(settings.registry).load().entries[name].active
        candidates = list(version.labels) if version and version.labels else None

    async def run() -> Any:
        async with EngineSession(settings) as session:
            if kind_name == "router":
                return await evaluate_router_async(session, path, dataset, candidates, split, limit)
            declared = _card_tool_schemas(dataset) if with_tools else None
            return await evaluate_expert_async(session, path, dataset, None, split, limit, declared_tools=declared)

    evaluation = asyncio.run(run())
    tag = name or (path.parent.name if path.name == "final" else path.name)
    out_dir = out or Path.cwd() / "reports" / f"eval_{tag}_{datetime.now():%Y%m%d_%H%M%S}"
    paths = write_report(evaluation.report, out_dir)
    if as_json:
        _echo_json(evaluation.report)
    else:
        typer.echo(report_text(evaluation.report))
        typer.echo("\nreport: " + ", ".join(str(p) for p in paths.values()))


def _card_tool_schemas(dataset: Path) -> list[dict[str, Any]]:
    """The OpenAI tools a task dataset's card records (`loramux dataset experts` writes them)."""
    card = (dataset if dataset.is_dir() else dataset.parent) / "card.json"
    schemas = json.loads(card.read_text()).get("tool_schemas") if card.is_file() else None
    if not schemas:
        raise typer.BadParameter(f"{card} records no tool_schemas", param_hint="--with-tools")
    return list(schemas)


def _eval_stacked(settings: Any, dataset: Path, split: str, limit: int | None, router: str | None,
                  server: str | None, max_tokens: int, out: Path | None, as_json: bool) -> None:
    """`eval --kind stacked`: on an engine here over the registry's router and experts, or through `server`."""
    from training.evaluate.reports import report_text, write_report
    from training.evaluate.stacked import evaluate_stacked, setup_from_registry
    from training.evaluate.stacked_http import evaluate_stacked_server
    from training.evaluate.stacked_report import summary

    if server:
        evaluation = evaluate_stacked_server(server, dataset, split=split, limit=limit, max_tokens=max_tokens,
                                             router=router)
    else:
        evaluation = evaluate_stacked(setup_from_registry(settings, router), dataset, settings, split=split,
                                      limit=limit, max_tokens=max_tokens)
    out_dir = out or Path.cwd() / "reports" / f"stacked_{evaluation.report['router']['name']}_" \
                                              f"{datetime.now():%Y%m%d_%H%M%S}"
    paths = write_report(evaluation.report, out_dir)
    if as_json:
        _echo_json(summary(evaluation.report))
    else:
        typer.echo(report_text(evaluation.report))
        typer.echo("\nreport: " + ", ".join(str(p) for p in paths.values()))


def _adapter_path(settings: Any, adapter: Path | None, name: str | None, kind: str) -> Path:
    if (adapter is None) == (name is None):
        raise CliUsageError("give exactly one of --adapter PATH or --name NAME")
    if adapter is not None:
        return adapter.resolve()
    from service.adapter_validation import resolve_inside_root
    from service.registry import Registry

    entry = Registry(settings.registry).load().entries.get(name or "")
    if entry is None or entry.active is None:
        raise CliError(f"adapter {name!r} is not registered (registry {settings.registry})")
    if entry.kind != kind:
        raise CliError(f"adapter {name!r} is a {entry.kind} adapter, not a {kind}")
    return resolve_inside_root(entry.active.path, settings.adapter_root)


def register_command(
    kind: Annotated[AdapterKind, typer.Option(help="router or task")],
    name: Annotated[str, typer.Option(help="adapter name (letters, digits, - and _)")],
    path: Annotated[Path, typer.Option(help="adapter folder (inside the adapter root)")],
    description: Annotated[str, typer.Option()] = "",
    labels: Annotated[str | None, typer.Option(help="router only: adapters it routes to (default: its labels)")]
    = None,
    activate: Annotated[bool, typer.Option(help="make this version active")] = True,
    tool_call_format: Annotated[str | None, typer.Option(
        help="task only: how it writes a tool call, json, hermes or none (default: its loramux.json)")] = None,
) -> None:
    """Validate and atomically add a new adapter version to the registry."""
    from training.register.commands import RegistryContext, register_adapter

    settings = _settings()
    label_list = [x.strip() for x in labels.split(",") if x.strip()] if labels else None
    version = register_adapter(kind.value, name, path, description, label_list, activate,  # type: ignore[arg-type]
                               RegistryContext(settings), tool_call_format)
    typer.echo(f"registered {version.name} version {version.version} ({version.kind}, {version.status}) "
               f"from {version.path} in {settings.registry}")
    if version.labels:
        typer.echo(f"  routes to: {', '.join(version.labels)}")


@adapters_app.command("list")
@_friendly_errors
def adapters_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every registered adapter with its active version."""
    from training.register.commands import list_adapters

    settings = _settings()
    rows = list_adapters(settings)
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        typer.echo(f"no adapters registered in {settings.registry}")
        return
    for row in rows:
        mark = "*" if row.get("active_router") else " "
        extra = f" -> {', '.join(row['labels'])}" if row["labels"] else ""
        typer.echo(f"{mark} {row['name']:12s} {row['kind']:6s} v{row['version']} of {row['versions']}  "
                   f"r={row['rank']:<3d} {row['path']}{extra}")


@adapters_app.command("show")
@_friendly_errors
def adapters_show(name: str) -> None:
    """All versions of one adapter, with metrics and dataset."""
    from training.register.commands import show_adapter

    _echo_json(show_adapter(name, _settings()))


@adapters_app.command("rollback")
@_friendly_errors
def adapters_rollback(
    name: str, version: Annotated[int | None, typer.Option(help="version to activate (default: previous)")] = None
) -> None:
    """Activate an earlier version (default: the one before the active version)."""
    from training.register.commands import rollback_adapter

    active = rollback_adapter(name, version, _settings())
    typer.echo(f"{name}: version {active.version} is active")


@adapters_app.command("remove")
@_friendly_errors
def adapters_remove(name: str, yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False) -> None:
    """Retire an adapter: it stops serving, its versions stay in the registry (`adapters restore`
    brings it back) and its files stay on disk."""
    from service.registry import Registry

    if not yes:
        typer.confirm(f"retire {name}? it stops serving; `loramux adapters restore {name}` brings it back",
                      abort=True)
    entry = Registry(_settings().registry).remove(name)
    typer.echo(f"removed {name} (was version {entry.removed_version}; {len(entry.versions)} version(s) kept, "
               f"restore with `loramux adapters restore {name}`)")


@adapters_app.command("restore")
@_friendly_errors
def adapters_restore(
    name: str,
    version: Annotated[int | None, typer.Option(help="version to activate (default: the one active at removal)")]
    = None,
) -> None:
    """Bring a removed adapter back."""
    from service.registry import Registry

    active = Registry(_settings().registry).restore(name, version)
    typer.echo(f"{name}: version {active.version} is active")


def demo_command(
    if_missing: Annotated[bool, typer.Option("--if-missing", help="do nothing if the registry has adapters")]
    = False,
    quick: Annotated[bool, typer.Option(help="a few steps each: checks the pipeline, not the quality")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    resume: Annotated[str | None, typer.Option(help="stamp of an interrupted demo (datasets/demo_<stamp>)")]
    = None,
    serve: Annotated[bool, typer.Option("--serve", help="serve at once and register each adapter as it is "
                                        "trained (with --if-missing: just serve when adapters exist)")] = False,
    host: Annotated[str | None, typer.Option(help="with --serve: the server's host (default LORAMUX_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="with --serve: the server's port (default LORAMUX_PORT)")] = None,
) -> None:
    """Demo datasets, router and experts trained on the CPU, registered as each is ready, evaluated."""
    from training.demo import DemoPlan, run_demo

    plan = DemoPlan.quick(seed) if quick else DemoPlan(seed=seed)
    if serve:
        from training.demo_serve import demo_and_serve

        raise typer.Exit(demo_and_serve(_settings(), plan, host, port, typer.echo, if_missing, resume))
    run_demo(_settings(), plan, if_missing=if_missing, echo=typer.echo, resume=resume)


def onboard_command(
    name: Annotated[str, typer.Option(help="the new expert's name")],
    dataset: Annotated[Path, typer.Option(help="the expert's chats (JSONL file or train/val/eval folder)")],
    adapter: Annotated[Path | None, typer.Option(help="an already trained adapter folder")] = None,
    train: Annotated[bool, typer.Option("--train", help="train the expert from --dataset first")] = False,
    router: Annotated[str | None, typer.Option(help="router to retrain (default: the active router)")] = None,
    floor: Annotated[float | None, typer.Option(help="gate: minimum accuracy (default LORAMUX_GATE_MIN_ACCURACY)")]
    = None,
    margin: Annotated[float | None, typer.Option(
        help="gate: most an expert's recall may drop (default LORAMUX_GATE_MAX_RECALL_DROP)")] = None,
    promote: Annotated[bool, typer.Option(help="activate the candidate when it passes the gate")] = True,
    router_steps: Annotated[int, typer.Option(help="router training steps")] = 80,
    expert_steps: Annotated[int, typer.Option(help="expert training steps (with --train)")] = 40,
    eval_limit: Annotated[int | None, typer.Option(help="evaluate on a seeded sample of this many examples")]
    = None,
) -> None:
    """Add an expert to the live service: register it, retrain the router, gate it, promote it."""
    from training.register.onboard import onboard, step_options

    expert_options, router_options = step_options(expert_steps, router_steps)
    result = onboard(name, dataset, adapter, train, _settings(), router_name=router, floor=floor, margin=margin,
                     promote=promote, eval_limit=eval_limit, expert_options=expert_options,
                     router_options=router_options)
    typer.echo(f"expert {result.expert} version {result.expert_version} registered"
               + ("" if result.expert_active else " as a candidate (the active version keeps serving)"))
    verdict = "promoted" if result.promoted else ("passed the gate (candidate)" if result.gate.passed
                                                  else "refused by the gate")
    typer.echo(f"router {result.router} version {result.candidate_version}: {verdict}; "
               f"accuracy {result.gate.accuracy:.4f} (floor {result.gate.floor:.4f})")
    for reason in result.gate.reasons:
        typer.echo(f"  - {reason}")
    typer.echo(f"report: {result.report_path}")
    if not result.gate.passed:
        raise typer.Exit(3)


def register_commands(app: typer.Typer) -> None:
    """Attach the training commands to the `loramux` CLI."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the libraries' own tqdm bars (model loading, dataset maps, GGUF conversion) would bury the one
    # progress line per stage that the commands show (training.progress); set before they are imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    app.add_typer(dataset_app, name="dataset")
    app.command("train")(_friendly_errors(train_command))
    app.command("eval")(_friendly_errors(eval_command))
    app.command("register")(_friendly_errors(register_command))
    app.add_typer(adapters_app, name="adapters")
    app.command("demo")(_friendly_errors(demo_command))
    app.command("onboard")(_friendly_errors(onboard_command))
