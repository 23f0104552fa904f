"""``rayline rollups``: where the aggregate tables are sealed, and rebuilding days of them.

Rollups follow the pipeline by themselves (``adapters.rollups``); ``rebuild`` is for
events stored after their minutes were sealed: a backfill, an import, a replay.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cluster.cli_context import settings_of as _settings
from core.envelope import parse_event_time
from core.exceptions import InvalidInputError

console = Console()

rollups_app = typer.Typer(
    help="ClickHouse rollups (1m → 1h → 1d): sealed points, and rebuilding whole days."
)


def _owner_call(ctx: typer.Context, method: str, *args: Any) -> Any:
    import ray

    from actors.clickhouse_owner import OWNER_NAME
    from cluster.deploy import connected

    settings = _settings(ctx)
    with connected(settings):
        owner = ray.get_actor(OWNER_NAME, namespace=settings.ray.namespace)
        return ray.get(getattr(owner, method).remote(*args))


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


RangeStart = Annotated[
    str, typer.Option("--from", help="Start of the range, inclusive (RFC 3339 or epoch seconds).")
]
RangeEnd = Annotated[
    str, typer.Option("--to", help="End of the range, exclusive (RFC 3339 or epoch seconds).")
]


def time_range(from_: str, to: str) -> tuple[int, int]:
    """Epoch ms of ``--from`` and ``--to``, the end after the start."""
    start, end = parse_time("--from", from_), parse_time("--to", to)
    if end <= start:
        raise InvalidInputError(f"--to {to!r} must come after --from {from_!r}")
    return start, end


def parse_time(option: str, text: str) -> int:
    """Epoch ms of an option's RFC 3339 time or epoch seconds."""
    try:
        return parse_event_time(float(text) if text.replace(".", "", 1).isdigit() else text)
    except ValueError as exc:
        raise InvalidInputError(f"{option} {text!r}: {exc}") from None


@rollups_app.command("status")
def rollups_status(ctx: typer.Context) -> None:
    """Where each aggregate table is final (sealed), and the rollup loop's last error."""
    status = _owner_call(ctx, "rollup_status")
    table = Table("table", "sealed until")
    for name, sealed in sorted(status["sealed"].items()):
        table.add_row(name, _iso(int(sealed)))
    console.print(table)
    if status.get("error"):
        console.print(f"[red]last error:[/red] {status['error']}")


@rollups_app.command("rebuild")
def rollups_rebuild(
    ctx: typer.Context,
    from_: Annotated[
        str, typer.Option("--from", help="First day (RFC 3339 or epoch seconds; floored).")
    ],
    to: Annotated[str, typer.Option(help="End (RFC 3339 or epoch seconds; ceiled to a day).")],
) -> None:
    """Compute the sealed 1m/1h/1d aggregates of whole days again from the raw events."""
    start, end = parse_time("--from", from_), parse_time("--to", to)
    if end <= start:
        raise InvalidInputError(f"--to {to!r} must come after --from {from_!r}")
    with console.status("rebuilding (deleting the days' aggregates, then rolling up) ..."):
        written = _owner_call(ctx, "rebuild_rollups", start, end)
    if not written:
        console.print(
            "nothing to rebuild: the range is not sealed yet (see `rayline rollups status`)"
        )
        return
    for name, chunks in written.items():
        console.print(f"{name}: {chunks} chunks written")
