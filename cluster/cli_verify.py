"""``rayline verify --from --to``: replay the archive and compare it with ClickHouse.

The job (``data_jobs.verify``, Ray Data) reads the archived records of the range, runs
them through the stream's own pass, and reports every 1-minute window whose count, sum,
min or max differs from what ClickHouse holds. See docs/batch.md for what it compares
and what it leaves out.

Exit codes, as ``diff``: 0 every window agrees, 1 some differ, 2 the check could not be
made (a store or the cluster failed; the message says which).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from cluster.cli_context import settings_of, stdout_on_stderr
from cluster.cli_rollups import RangeEnd, RangeStart, time_range

console = Console()
err = Console(stderr=True)


def verify(
    ctx: typer.Context,
    from_: RangeStart,
    to: RangeEnd,
    tenant: Annotated[
        str | None, typer.Option(help="Only this tenant's events (default: every tenant).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    limit: Annotated[int, typer.Option(min=1, help="Differences to print at most.")] = 50,
) -> None:
    """Replay the archive of [--from, --to) with the stream's own code and report every
    1-minute window where the result differs from what ClickHouse holds.

    Exit code 0: every window agrees; 1: some differ; 2: the check could not be made.
    """
    from cluster.deploy import connected, replay_config
    from data_jobs.verify import run_verify

    settings = settings_of(ctx)
    start, end = time_range(from_, to)
    fresh_ms = int((time.time() - 2 * settings.archive.flush_seconds) * 1000)
    if end > fresh_ms:
        err.print(
            "[yellow]note:[/yellow] the archive is written every "
            f"{settings.archive.flush_seconds:g} s (archive.flush_seconds): records of the "
            "last minutes may not be in it yet, and would show as differences"
        )
    # Ray prints the cluster's warnings to stdout: they go to stderr, with the job's
    # progress, so that stdout holds the report alone (--json stays parseable).
    with stdout_on_stderr(), connected(settings):
        report = run_verify(replay_config(settings), start, end, tenant)
    body = report.as_dict()
    if as_json:
        print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
    else:
        _render(body, limit)
    if report.differences:
        raise typer.Exit(1)


def _render(body: dict[str, Any], limit: int) -> None:
    scope = f"tenant {body['tenant']}" if body["tenant"] else "every tenant"
    console.print(
        f"{body['from']} .. {body['to']}, {scope}: replayed {body['files']} archive file(s) "
        f"({body['dead_lettered']} record(s) the stream dead-lettered left out, from "
        f"{body['dead_letter_files']} file(s)) in {body['seconds']:.1f} s",
        soft_wrap=True,
    )
    console.print(
        f"{body['windows']} window(s): {body['replayed_events']} event(s) replayed, "
        f"{body['stored_events']} stored"
    )
    differences = body["differences"]
    if not differences:
        console.print("[green]every window agrees[/green]")
        return
    console.print("differences (tenant, type, minute: replayed | stored):")
    for found in differences[:limit]:
        console.print(
            f"  {found['tenant']} {found['type']} {found['minute']}: "
            f"{_cell(found['replayed'])} | {_cell(found['stored'])}",
            soft_wrap=True,
            highlight=False,
        )
    more = len(differences) - limit
    console.print(
        f"[red]{len(differences)} window(s) differ[/red]"
        + (f" ({more} not shown; --limit or --json)" if more > 0 else "")
    )


def _cell(totals: dict[str, Any] | None) -> str:
    if totals is None:
        return "-"
    return (
        f"{totals['events']} events, sum {totals['sum']:g}, "
        f"min {totals['min']:g}, max {totals['max']:g}"
    )
