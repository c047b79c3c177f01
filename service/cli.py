"""The `loramux` command line: `serve` here, the training commands from `training.cli`.

`serve` has one flag per `Settings` field, generated from the model, so a new setting is a new
flag without touching this file. A flag overrides the `LORAMUX_` environment variable.
"""

from __future__ import annotations

import logging
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import click
import typer

from service.settings import Settings

app = typer.Typer(help="loramux: many LoRA experts behind one endpoint, routed by a LoRA.", no_args_is_help=True)


def _click_type(annotation: Any) -> tuple[Any, bool]:
    """(click type, is_flag) for a Settings field annotation."""
    origin = get_origin(annotation)
    args = [a for a in get_args(annotation) if a is not type(None)]
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        return _click_type(args[0])
    if origin is typing.Annotated:
        return _click_type(args[0])
    if origin is Literal:
        return click.Choice([str(a) for a in args]), False
    if origin is list:
        return str, False
    if annotation is bool:
        return bool, True
    if annotation in (int, float, str):
        return annotation, False
    if annotation is Path:
        return click.Path(path_type=str), False
    return str, False


def _serve_params() -> list[click.Parameter]:
    params: list[click.Parameter] = []
    for name, field in Settings.model_fields.items():
        kind, is_flag = _click_type(field.annotation)
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if is_flag:
            params.append(click.Option([f"{flag}/--no-{flag[2:]}", name], default=None, help=help_text))
        else:
            params.append(click.Option([flag, name], type=kind, default=None, help=help_text))
    return params


def _serve(**options: Any) -> None:
    overrides = {k: v for k, v in options.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    from service.server import run_server

    raise SystemExit(run_server(settings))


serve_command = click.Command(
    "serve",
    callback=_serve,
    params=_serve_params(),
    help="Serve the HTTP API (every setting is also a flag; flags override LORAMUX_* variables).",
)


def build_cli() -> click.Group:
    try:
        from training.cli import register_commands
    except ImportError as exc:  # the training extra is optional for a serving-only install
        missing = str(exc)

        @app.command("demo")
        def demo_unavailable() -> None:
            """(needs the training extra: pip install 'loramux[train]')"""
            raise click.ClickException(f"training is not installed: {missing}")
    else:
        register_commands(app)
    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    group.add_command(serve_command)
    return group


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    build_cli()()


if __name__ == "__main__":
    main()
