"""What every `rayline` sub-command takes from its Typer context."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import typer

from cluster.settings import Settings


def settings_of(ctx: typer.Context) -> Settings:
    """The settings the main callback built once for this invocation."""
    settings = ctx.obj
    assert isinstance(settings, Settings)
    return settings


@contextlib.contextmanager
def stdout_on_stderr() -> Iterator[None]:
    """Send what is written to stdout to stderr while a job runs, so that stdout holds
    the command's report alone (``--json`` stays parseable). At the descriptor level:
    Ray's workers and Spark's JVM write to file descriptor 1, not to ``sys.stdout``."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
