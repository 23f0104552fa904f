"""What every `rayline` sub-command takes from its Typer context."""

from __future__ import annotations

import typer

from cluster.settings import Settings


def settings_of(ctx: typer.Context) -> Settings:
    """The settings the main callback built once for this invocation."""
    settings = ctx.obj
    assert isinstance(settings, Settings)
    return settings
