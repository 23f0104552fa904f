"""Sessions from the archive: ``rayline sessions --from --to [--engine ray|spark]``.

The job replays ``[from, to)`` of the raw archive through the stream's own pass
(``data_jobs.replay``) and cuts each ``(tenant, entity)``'s events into sessions: runs
in which no two consecutive events are more than ``gap_ms`` apart (the definition is in
``data_jobs.spark_sessions``). Two engines compute the same thing:

- ``ray``: Ray Data, a shuffle by ``(tenant, entity)`` and :func:`sessionise` per group;
- ``spark``: the PySpark job of ``data_jobs.spark_sessions``, unchanged, on Spark
  executors that are Ray actors (``data_jobs.spark_bridge``); the event rows go to
  Spark and the sessions come back through Ray's object store.

The result replaces the range's sessions in ClickHouse's ``sessions`` table (of the one
tenant when ``--tenant`` is given), which the query API serves (``POST /v1/query/sql``,
each tenant seeing its own rows). A session is cut where the range is: one that runs
across ``from`` or ``to`` is stored as its part inside the range, so ranges that follow
one another on whole days, hours or sessions' quiet gaps give whole sessions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from adapters.exceptions import StoreUnavailable
from core.query_plan import utc_datetime
from data_jobs.history import job_concurrency
from data_jobs.replay import EVENT_KEY, ReplayConfig, replay

log = logging.getLogger(__name__)

Engine = Literal["ray", "spark"]
ENGINES: tuple[Engine, ...] = ("ray", "spark")
SESSION_SCHEMA = pa.schema(
    [
        ("tenant", pa.string()),
        ("entity", pa.string()),
        ("session_start", pa.int64()),
        ("session_end", pa.int64()),
        ("events", pa.int64()),
        ("value_sum", pa.float64()),
    ]
)
_STORED_TIME = pa.timestamp("ms", "UTC")


def sessionise(rows: pa.Table, gap_ms: int) -> pa.Table:
    """Sessions (:data:`SESSION_SCHEMA`) of event rows (``data_jobs.replay``'s columns);
    the Ray Data twin of ``data_jobs.spark_sessions.sessions``."""
    rows = rows.filter(pc.not_equal(rows["entity"], ""))
    unique = rows.group_by([*EVENT_KEY, "entity"], use_threads=False).aggregate([("value", "min")])
    if not unique.num_rows:
        return SESSION_SCHEMA.empty_table()
    ordered = unique.sort_by(
        [("tenant", "ascending"), ("entity", "ascending"), ("ts", "ascending")]
    )
    ts = ordered["ts"].to_numpy()
    starts = np.ones(len(ts), dtype=bool)
    same_entity = pc.and_(
        pc.equal(ordered["tenant"][1:], ordered["tenant"][:-1]),
        pc.equal(ordered["entity"][1:], ordered["entity"][:-1]),
    ).to_numpy(zero_copy_only=False)
    starts[1:] = ~same_entity | (np.diff(ts) > gap_ms)
    numbered = ordered.append_column("session", pa.array(np.cumsum(starts)))
    found = numbered.group_by("session", use_threads=False).aggregate(
        [
            ("tenant", "first"),
            ("entity", "first"),
            ("ts", "min"),
            ("ts", "max"),
            ("ts", "count"),
            ("value_min", "sum"),
        ]
    )
    return pa.table(
        [
            found["tenant_first"],
            found["entity_first"],
            found["ts_min"],
            found["ts_max"],
            found["ts_count"],
            found["value_min_sum"],
        ],
        schema=SESSION_SCHEMA,
    )


def in_order(table: pa.Table) -> pa.Table:
    """Sessions in :data:`SESSION_SCHEMA`'s types, ordered by tenant, entity and start
    (whichever engine made them)."""
    table = table.select(SESSION_SCHEMA.names).cast(SESSION_SCHEMA)
    return table.sort_by(
        [("tenant", "ascending"), ("entity", "ascending"), ("session_start", "ascending")]
    )


@dataclass
class SessionsReport:
    """What the job computed and stored."""

    from_ms: int
    to_ms: int
    tenant: str | None
    engine: Engine
    gap_ms: int
    files: int = 0
    dead_lettered: int = 0
    sessions: int = 0
    entities: int = 0
    events: int = 0
    written: bool = False
    seconds: float = 0.0
    table: pa.Table = field(default_factory=SESSION_SCHEMA.empty_table, repr=False)

    def as_dict(self, limit: int) -> dict[str, Any]:
        """The report, with the first ``limit`` sessions."""
        return {
            "from": _iso(self.from_ms),
            "to": _iso(self.to_ms),
            "tenant": self.tenant,
            "engine": self.engine,
            "gap_ms": self.gap_ms,
            "files": self.files,
            "dead_lettered": self.dead_lettered,
            "sessions": self.sessions,
            "entities": self.entities,
            "events": self.events,
            "written": self.written,
            "seconds": round(self.seconds, 3),
            "rows": [
                {
                    **row,
                    "session_start": _iso(row["session_start"]),
                    "session_end": _iso(row["session_end"]),
                }
                for row in self.table.slice(0, limit).to_pylist()
            ],
        }


def _iso(ms: int) -> str:
    return utc_datetime(ms).isoformat().replace("+00:00", "Z")


def run_sessions(
    config: ReplayConfig,
    from_ms: int,
    to_ms: int,
    *,
    tenant: str | None = None,
    gap_ms: int = 1_800_000,
    engine: Engine = "ray",
    write: bool = True,
) -> SessionsReport:
    """Compute the sessions of ``[from_ms, to_ms)`` (see the module) and, with ``write``,
    store them in place of the range's; runs on the connected Ray cluster.

    Raises:
        StoreUnavailable: S3 or ClickHouse failed, or a Ray task of the job did.
        InvalidInputError: a manifest cannot be read, or the Spark engine is not
            installed.
    """
    started = time.monotonic()
    report = SessionsReport(from_ms, to_ms, tenant, engine, gap_ms)
    try:
        found = replay(config, from_ms, to_ms, tenant)
        report.files, report.dead_lettered = found.files, found.dead_lettered
        if found.events is not None:
            compute = _with_spark if engine == "spark" else _with_ray
            report.table = in_order(
                compute(found.events, gap_ms, job_concurrency(config.concurrency))
            )
    except ray.exceptions.RayError as exc:
        raise StoreUnavailable(f"the sessions job failed: {exc}") from exc
    table = report.table
    report.sessions = table.num_rows
    report.entities = len(
        table.select(["tenant", "entity"]).group_by(["tenant", "entity"]).aggregate([])
    )
    report.events = int(pc.sum(table["events"]).as_py() or 0)
    if write:
        _store(config, report)
        report.written = True
    report.seconds = time.monotonic() - started
    log.info("sessions: %s", {k: v for k, v in report.as_dict(0).items() if k != "rows"})
    return report


def _with_ray(events: ray.data.Dataset, gap_ms: int, concurrency: int) -> pa.Table:
    # an entity's rows meet in one group: a shuffle, in as many parts as the pool
    groups = events.groupby(["tenant", "entity"], num_partitions=concurrency)
    found = groups.map_groups(partial(sessionise, gap_ms=gap_ms), batch_format="pyarrow")
    return _collected(found)


def _with_spark(events: ray.data.Dataset, gap_ms: int, concurrency: int) -> pa.Table:
    from data_jobs.spark_bridge import spark_on_ray
    from data_jobs.spark_sessions import sessions

    with spark_on_ray("rayline-sessions", shuffle_partitions=concurrency) as spark:
        frame = events.to_spark(spark)  # through the object store, no file between
        # collected before the session stops: its blocks belong to Spark's actors
        return _collected(ray.data.from_spark(sessions(frame, gap_ms)))


def _collected(dataset: ray.data.Dataset) -> pa.Table:
    batches = list(dataset.iter_batches(batch_format="pyarrow"))
    return pa.concat_tables(batches) if batches else SESSION_SCHEMA.empty_table()


def _store(config: ReplayConfig, report: SessionsReport) -> None:
    table = report.table
    stored = pa.table(
        {
            "tenant": table["tenant"],
            "entity": table["entity"],
            "session_start": pc.cast(table["session_start"], _STORED_TIME),
            "session_end": pc.cast(table["session_end"], _STORED_TIME),
            "events": pc.cast(table["events"], pa.uint64()),
            "value_sum": table["value_sum"],
        }
    )
    history = config.history
    owner = ray.get_actor(history.owner_actor, namespace=history.namespace)
    try:
        ref: Any = owner.replace_sessions.remote(
            report.from_ms, report.to_ms, report.tenant, stored
        )
        ray.get(ref)
    except ray.exceptions.RayError as exc:
        raise StoreUnavailable(f"ClickHouse could not store the sessions: {exc}") from exc
