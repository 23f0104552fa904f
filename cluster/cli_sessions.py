"""``rayline sessions --from --to``: sessions of each entity, from the archive.

The job (``data_jobs.sessions``) replays the range with the stream's own code and cuts
each ``(tenant, entity)``'s events into sessions, on Ray Data (``--engine ray``) or with
the example PySpark job on Spark executors that run as Ray actors (``--engine spark``,
RayDP). The sessions replace the range's in ClickHouse's ``sessions`` table, which the
query API serves; ``--dry-run`` only shows them.

Exit codes: 0 done, 2 the job could not run (a store, the cluster or Spark failed; the
message says which).
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from cluster.cli_context import settings_of, stdout_on_stderr
from cluster.cli_rollups import RangeEnd, RangeStart, time_range
from core.cep import parse_duration
from core.exceptions import InvalidInputError

console = Console()


def sessions(
    ctx: typer.Context,
    from_: RangeStart,
    to: RangeEnd,
    tenant: Annotated[
        str | None, typer.Option(help="Only this tenant's sessions (default: every tenant).")
    ] = None,
    gap: Annotated[
        str,
        typer.Option(help="Quiet time that ends a session: 90s, 30m, 2h."),
    ] = "30m",
    engine: Annotated[
        str,
        typer.Option(help="ray: Ray Data; spark: the PySpark job on Ray (RayDP, needs Java 17)."),
    ] = "ray",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Compute and show; store nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    limit: Annotated[int, typer.Option(min=0, help="Sessions to print at most.")] = 20,
) -> None:
    """Cut each entity's events of [--from, --to) into sessions (no gap longer than
    --gap) and store them in ClickHouse's `sessions` table, served by the query API:
    POST /v1/query/sql {"sql": "SELECT * FROM sessions"}.
    """
    from cluster.deploy import connected, replay_config
    from data_jobs.sessions import ENGINES, run_sessions

    settings = settings_of(ctx)
    start, end = time_range(from_, to)
    try:
        gap_ms = parse_duration(gap)
    except ValueError as exc:
        raise InvalidInputError(f"--gap {gap!r}: expected {exc}") from None
    if gap_ms <= 0:
        raise InvalidInputError(f"--gap {gap!r}: a session needs a gap above zero, e.g. 30m")
    if engine not in ENGINES:
        raise InvalidInputError(f"--engine {engine!r}: one of {', '.join(ENGINES)}")
    # Ray and Spark print to stdout: that goes to stderr, so stdout holds the report.
    with stdout_on_stderr(), connected(settings):
        report = run_sessions(
            replay_config(settings),
            start,
            end,
            tenant=tenant,
            gap_ms=gap_ms,
            engine=engine,  # checked against ENGINES above
            write=not dry_run,
        )
    body = report.as_dict(limit)
    if as_json:
        print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
    else:
        _render(body)


def _render(body: dict[str, Any]) -> None:
    scope = f"tenant {body['tenant']}" if body["tenant"] else "every tenant"
    console.print(
        f"{body['from']} .. {body['to']}, {scope}, engine {body['engine']}: "
        f"{body['sessions']} session(s) of {body['entities']} entit(ies), "
        f"{body['events']} event(s), from {body['files']} archive file(s) "
        f"in {body['seconds']:.1f} s",
        soft_wrap=True,
    )
    rows = body["rows"]
    if rows:
        table = Table("tenant", "entity", "start", "end", "events", "value sum")
        for row in rows:
            table.add_row(
                row["tenant"],
                row["entity"],
                row["session_start"],
                row["session_end"],
                str(row["events"]),
                f"{row['value_sum']:g}",
            )
        console.print(table)
    if body["sessions"] > len(rows):
        console.print(f"({body['sessions'] - len(rows)} more not shown; --limit or --json)")
    if body["written"]:
        console.print(
            "stored in ClickHouse table sessions (the range's earlier sessions replaced); "
            "query it: POST /v1/query/sql"
        )
    else:
        console.print("--dry-run: nothing stored")
