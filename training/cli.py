"""Training subcommands of `loramux` (placeholder until the training package lands)."""

from __future__ import annotations

import typer


def register_commands(app: typer.Typer) -> None:
    """Attach the training commands to the `loramux` CLI."""
