"""`loramux`: the service's commands (`service.cli`) and, when the training extra is installed, the
training commands (`training.cli`), on one Typer app."""

from __future__ import annotations

import typer

from service.cli import app, run


def build_cli() -> typer.Typer:
    try:
        from training.cli import register_commands
    except ImportError as exc:  # the training extra is optional for a serving-only install
        missing = str(exc)

        @app.command("demo")
        def demo_unavailable() -> None:
            """(needs the training extra: pip install 'loramux[train]')"""
            raise typer.BadParameter(f"training is not installed: {missing}")
    else:
        register_commands(app)
    return app


def main() -> None:
    run(build_cli())
