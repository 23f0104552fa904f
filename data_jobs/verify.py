"""Replay the archive, compare with live: ``rayline verify --from --to``.

This job replays a time range of the raw archive through the stream's own pass
(``data_jobs.replay``: Ray Data over the archive's Parquet files, what the stream
dead-lettered or dropped taken out), collapses duplicates on the raw events table's key
``(tenant, type, ts, source, event_id)``, and sums the rest into 1-minute windows per
``(tenant, type)``: count, sum, min and max of ``value``. It reads the same of what
ClickHouse holds (the raw events table, which every query and rollup is computed from)
and reports every window where the two differ.

The ClickHouse side leaves out the rows written by the history job (partition
:data:`~data_jobs.history.HISTORY_PARTITION`): they never were in Kafka, so the archive
has none of them. Events without a source are left out on both sides (see
``data_jobs.replay``).

Limits, said in the report rather than hidden: the archive is written every
``archive.flush_seconds``, so a range that ends later than that ago misses its newest
records; a record whose dead letter was written more than an hour before its event
time, or after the job started, counts in the replay; an event id sent twice with
different event times beyond the dedup horizon is stored twice by the stream and
replayed twice, so it agrees. Distinct counts and quantiles are not compared (they are
estimates of the same sketches, computed from these same rows).

Windows are compared exactly for count, min and max, and for sum within a relative
1e-9 (the order of additions differs).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from adapters.exceptions import StoreUnavailable
from core.query_plan import utc_datetime
from data_jobs.history import HISTORY_PARTITION, job_concurrency
from data_jobs.replay import EVENT_KEY, ReplayConfig, replay

log = logging.getLogger(__name__)

SUM_TOLERANCE = 1e-9
WINDOW_COLUMNS = ["tenant", "type", "minute", "events", "sum", "min", "max"]


@dataclass(frozen=True, slots=True, order=True)
class Window:
    """One 1-minute window of one tenant's event type."""

    tenant: str
    type: str
    minute_ms: int


@dataclass(frozen=True, slots=True)
class Totals:
    """What one window holds."""

    events: int
    sum: float
    min: float
    max: float

    def agrees(self, other: Totals) -> bool:
        scale = max(1.0, abs(self.sum), abs(other.sum))
        return (
            self.events == other.events
            and self.min == other.min
            and self.max == other.max
            and math.isclose(self.sum, other.sum, rel_tol=0, abs_tol=SUM_TOLERANCE * scale)
        )


@dataclass(frozen=True, slots=True)
class Difference:
    """A window where the replay and ClickHouse differ (None: the side has no events)."""

    window: Window
    replayed: Totals | None
    stored: Totals | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.window.tenant,
            "type": self.window.type,
            "minute": _iso(self.window.minute_ms),
            "replayed": _totals_dict(self.replayed),
            "stored": _totals_dict(self.stored),
        }


def _totals_dict(totals: Totals | None) -> dict[str, Any] | None:
    if totals is None:
        return None
    return {"events": totals.events, "sum": totals.sum, "min": totals.min, "max": totals.max}


def compare(replayed: dict[Window, Totals], stored: dict[Window, Totals]) -> list[Difference]:
    """Every window in either side that the other does not hold the same, in order."""
    differ = []
    for window in sorted(replayed.keys() | stored.keys()):
        mine, theirs = replayed.get(window), stored.get(window)
        if mine is None or theirs is None or not mine.agrees(theirs):
            differ.append(Difference(window, mine, theirs))
    return differ


def windows_of(table: pa.Table) -> dict[Window, Totals]:
    """Rows of :data:`WINDOW_COLUMNS` as a mapping."""
    return {
        Window(str(row["tenant"]), str(row["type"]), int(row["minute"])): Totals(
            int(row["events"]), float(row["sum"]), float(row["min"]), float(row["max"])
        )
        for row in table.select(WINDOW_COLUMNS).to_pylist()
    }


def window_totals(rows: pa.Table) -> pa.Table:
    """Raw-event rows (tenant, type, minute, ts, source, event_id, value) summed per
    window, one row per raw-events key (the later copies of a duplicate dropped)."""
    unique = rows.group_by(["minute", *EVENT_KEY], use_threads=False).aggregate(
        [("value", "first")]
    )
    totals = unique.group_by(["tenant", "type", "minute"], use_threads=False).aggregate(
        [("value_first", "count"), ("value_first", "sum"), ("value_first", "min_max")]
    )
    bounds = totals["value_first_min_max"]
    return pa.table(
        {
            "tenant": totals["tenant"],
            "type": totals["type"],
            "minute": totals["minute"],
            "events": pc.cast(totals["value_first_count"], pa.int64()),
            "sum": totals["value_first_sum"],
            "min": pc.struct_field(bounds, "min"),
            "max": pc.struct_field(bounds, "max"),
        }
    )


@dataclass
class VerifyReport:
    """What the job found, and what it read to find it."""

    from_ms: int
    to_ms: int
    tenant: str | None
    files: int = 0
    dead_letter_files: int = 0
    dead_lettered: int = 0
    windows: int = 0
    replayed_events: int = 0
    stored_events: int = 0
    differences: list[Difference] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "from": _iso(self.from_ms),
            "to": _iso(self.to_ms),
            "tenant": self.tenant,
            "files": self.files,
            "dead_letter_files": self.dead_letter_files,
            "dead_lettered": self.dead_lettered,
            "windows": self.windows,
            "replayed_events": self.replayed_events,
            "stored_events": self.stored_events,
            "differences": [d.as_dict() for d in self.differences],
            "seconds": round(self.seconds, 3),
        }


def _iso(ms: int) -> str:
    return utc_datetime(ms).isoformat().replace("+00:00", "Z")


def run_verify(
    config: ReplayConfig, from_ms: int, to_ms: int, tenant: str | None = None
) -> VerifyReport:
    """Replay ``[from_ms, to_ms)`` of the archive and compare (see the module); runs on
    the Ray cluster this process is connected to.

    Raises:
        StoreUnavailable: S3 or ClickHouse failed, or a Ray task of the job did.
        InvalidInputError: a manifest cannot be read.
    """
    started = time.monotonic()
    report = VerifyReport(from_ms, to_ms, tenant)
    replayed = _replayed_windows(config, report)
    stored = _stored(config, from_ms, to_ms, tenant)
    report.replayed_events = sum(t.events for t in replayed.values())
    report.stored_events = sum(t.events for t in stored.values())
    report.windows = len(replayed.keys() | stored.keys())
    report.differences = compare(replayed, stored)
    report.seconds = time.monotonic() - started
    log.info("verify: %s", {k: v for k, v in report.as_dict().items() if k != "differences"})
    return report


def _replayed_windows(config: ReplayConfig, report: VerifyReport) -> dict[Window, Totals]:
    try:
        found = replay(config, report.from_ms, report.to_ms, report.tenant)
        report.files, report.dead_letter_files = found.files, found.dead_letter_files
        report.dead_lettered = found.dead_lettered
        if found.events is None:
            return {}
        # a window's rows meet in one group: a shuffle, in as many parts as the pool
        keys = ["tenant", "type", "minute"]
        windows = found.events.groupby(keys, num_partitions=job_concurrency(config.concurrency))
        totals: dict[Window, Totals] = {}
        for batch in windows.map_groups(window_totals, batch_format="pyarrow").iter_batches(
            batch_format="pyarrow"
        ):
            totals.update(windows_of(batch))
        return totals
    except ray.exceptions.RayError as exc:
        raise StoreUnavailable(f"the verify job failed: {exc}") from exc


def _stored(
    config: ReplayConfig, from_ms: int, to_ms: int, tenant: str | None
) -> dict[Window, Totals]:
    """The same windows of what ClickHouse holds (the history job's rows left out)."""
    history = config.history
    sql = (
        "SELECT tenant, type, toUnixTimestamp(toStartOfMinute(ts)) * 1000 AS minute, "
        "count() AS events, sum(value) AS sum, min(value) AS min, max(value) AS max "
        f"FROM {history.database}.events FINAL "
        "WHERE ts >= {start:DateTime64(3)} AND ts < {end:DateTime64(3)} "
        "AND partition != {history:UInt16} AND source != '' "
        + ("AND tenant = {tenant:String} " if tenant is not None else "")
        + "GROUP BY tenant, type, minute"
    )
    params: dict[str, Any] = {
        "start": utc_datetime(from_ms),
        "end": utc_datetime(to_ms),
        "history": HISTORY_PARTITION,
    }
    if tenant is not None:
        params["tenant"] = tenant
    owner = ray.get_actor(history.owner_actor, namespace=history.namespace)
    try:
        ref: Any = owner.run_query.remote(sql, params)
        columns, found = ray.get(ref)
    except ray.exceptions.RayError as exc:
        raise StoreUnavailable(f"ClickHouse could not be read: {exc}") from exc
    table = pa.Table.from_pylist([dict(zip(columns, row, strict=True)) for row in found])
    return windows_of(table) if table.num_rows else {}
