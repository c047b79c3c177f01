"""The service's commands of the `loramux` command line (`serve`, `router`, `adapters`...); the
training commands join them in `loramux.cli`, the one entry point that knows both packages (the
service never imports training, so a serving-only install has the whole service).

`serve` has one flag per `Settings` field, generated from the model (its signature is built from
the fields), so a new setting is a new flag without touching this file. A flag overrides the
`LORAMUX_` environment variable.
"""

from __future__ import annotations

import inspect
import logging
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import typer

from service.settings import Settings

app = typer.Typer(help="loramux: many LoRA experts behind one endpoint, routed by a LoRA.", no_args_is_help=True,
                  pretty_exceptions_enable=False)


@app.callback()
def _root() -> None:
    """loramux: many LoRA experts behind one endpoint, routed by a LoRA."""


def _option_type(annotation: Any) -> Any:
    """The CLI type of a Settings field: Literals become choices (as str), lists comma-separated str."""
    origin = get_origin(annotation)
    args = [a for a in get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) or origin is Annotated:
        return _option_type(args[0])
    if origin is Literal or origin is list:
        return str
    if annotation in (bool, int, float, str, Path):
        return annotation
    return str


def _serve(**options: Any) -> None:
    overrides = {k: v for k, v in options.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    from service.server import run_server

    raise typer.Exit(run_server(settings))


def _serve_signature() -> inspect.Signature:
    params = []
    for name, field in Settings.model_fields.items():
        kind = _option_type(field.annotation)
        help_text = field.description or ""
        if get_origin(field.annotation) is Literal:
            help_text = f"{help_text} [{'|'.join(map(str, get_args(field.annotation)))}]".strip()
        option = typer.Option(help=help_text, show_default=False)
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=Annotated[kind | None, option])
        )
    return inspect.Signature(params)


def serve(**options: Any) -> None:
    """Serve the HTTP API (every setting is also a flag; flags override LORAMUX_* variables)."""
    _serve(**options)


serve.__signature__ = _serve_signature()  # type: ignore[attr-defined]
app.command("serve")(serve)


router_app = typer.Typer(help="Router versions: promote a candidate, roll back, show status.", no_args_is_help=True)
app.add_typer(router_app, name="router")


def _registry(path: Path | None) -> Any:
    from service.registry import Registry

    return Registry(path or Settings().registry)


@router_app.command("promote")
def router_promote(
    version: Annotated[int | None, typer.Option(help="version to activate (default: the newest candidate)")] = None,
    name: Annotated[str | None, typer.Option(help="router name (default: the active router)")] = None,
    registry: Annotated[Path | None, typer.Option(help="registry file (default: LORAMUX_REGISTRY)")] = None,
) -> None:
    """Atomically make a router version active; the running service switches between requests."""
    active = _registry_call(lambda: _registry(registry).promote_router(name, version))
    typer.echo(f"router {active.name!r}: version {active.version} is active")


@router_app.command("rollback")
def router_rollback(
    name: Annotated[str | None, typer.Option(help="router name (default: the active router)")] = None,
    registry: Annotated[Path | None, typer.Option(help="registry file (default: LORAMUX_REGISTRY)")] = None,
) -> None:
    """Re-activate the router version before the active one."""
    active = _registry_call(lambda: _registry(registry).rollback_router(name))
    typer.echo(f"router {active.name!r}: rolled back to version {active.version}")


def _registry_call(fn: Any) -> Any:
    """Registry refusals (no router, no candidate, nothing to roll back to) as a usage error, not a traceback."""
    from service.errors import LoramuxError

    try:
        return fn()
    except LoramuxError as exc:
        raise typer.BadParameter(exc.message) from None


@router_app.command("status")
def router_status(
    registry: Annotated[Path | None, typer.Option(help="registry file (default: LORAMUX_REGISTRY)")] = None,
) -> None:
    """Routers, their versions, labels and which one is active."""
    reg = _registry(registry)
    router_name = _registry_call(reg.router_name)
    entry = reg.load().entries[router_name]
    for v in entry.versions:
        mark = "*" if v.version == entry.active_version else " "
        typer.echo(f"{mark} {router_name}@{v.version} {v.status:<9} labels={','.join(v.labels)} path={v.path}")


def run(cli: typer.Typer) -> None:
    """Run `cli` as the `loramux` command: request-id aware logging, and a refusal the user can act
    on printed as one line (exit 2) instead of a traceback."""
    from service.errors import LoramuxError
    from service.request_ids import LOG_FORMAT, install_log_records

    install_log_records()  # every record carries the request id it was logged under ("-" outside requests)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        cli()
    except LoramuxError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise SystemExit(2) from None


def main() -> None:
    """The service's commands alone (`python -m service.cli`); `loramux` adds training's."""
    run(app)


if __name__ == "__main__":
    main()
