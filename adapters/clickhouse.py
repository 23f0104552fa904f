"""ClickHouse through clickhouse-connect: the in-process engine (``chdb://``) or a server.

The same client API serves both DSNs, so the code above this module does not know
which one it talks to. chDB allows one process per data folder; Rayline keeps that
process in one actor (``actors.clickhouse_owner``) that writers and queries go through.

Reads and writes never share a connection. Writes (inserts, DDL, rollup statements)
go through the store's one write client; reads (:meth:`ClickHouseStore.run_query` and
every internal SELECT) borrow a client of their own from a pool, so a long read holds
back neither a write nor another read. chDB runs statements of separate connections
of one process at the same time and releases the GIL meanwhile (measured, see
``docs/storage.md``); a ClickHouse server does so anyway.

Sink contract of :meth:`ClickHouseStore.insert_window_results`: the call returns
after ClickHouse has stored the rows. Each row is keyed by (tenant, type, window kind,
window start, partition) in a ``ReplacingMergeTree``, and reads use ``FINAL``, so
writing the same closed window again (a retry, or a replay after a crash) replaces
the row instead of adding to it. A caller may retry a failed write at will.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import clickhouse_connect
import pyarrow as pa
from clickhouse_connect.driver.exceptions import ClickHouseError

from adapters.exceptions import QueryLimitExceeded, QueryRejected, StoreUnavailable
from adapters.rollups import Rollups
from core.partition_state import WindowResult
from core.sketch_states import STATE_COLUMNS


def _aggregate_table(name: str, partition: str) -> str:
    """DDL of a window aggregate table as first created (migrations 7 to 9).

    ``events``, sums and extremes are simple aggregates; the sketch columns were
    ClickHouse's own ``uniqCombined``/t-digest states until migration 12 replaced them
    with :func:`_sketch_columns`. ``dims`` follows from ``group_key`` (it is the same
    pairs as a map), hence allowed outside the sorting key. The deduplication window
    lets a chunk inserted again with the same token be dropped (see ``adapters.rollups``).
    """
    return f"""
        CREATE TABLE IF NOT EXISTS {{db}}.{name}
        (
            tenant LowCardinality(String),
            type LowCardinality(String),
            window_start DateTime('UTC'),
            group_key String,
            dims Map(LowCardinality(String), String),
            events SimpleAggregateFunction(sum, UInt64),
            value_sum SimpleAggregateFunction(sum, Float64),
            value_min SimpleAggregateFunction(min, Float64),
            value_max SimpleAggregateFunction(max, Float64),
            distinct_state AggregateFunction(uniqCombined(14), String),
            quantiles_state AggregateFunction(quantilesTDigest(0.5, 0.9, 0.99), Float64)
        )
        ENGINE = AggregatingMergeTree
        PARTITION BY {partition}
        ORDER BY (tenant, type, window_start, group_key)
        SETTINGS non_replicated_deduplication_window = 10000,
            allow_dimensions_outside_sorting_key = 1
        """


def _sketch_columns(name: str) -> str:
    """Migration to Rayline's own sketches as map states (``core.sketch_states``).

    The old states cannot be converted (they hold no registers or buckets of our
    sketches), so existing rows keep their counts, sums and extremes and get empty
    sketches; ``rayline rollups rebuild`` computes them again from the raw events that
    are still kept (see docs/storage.md).
    """
    adds = ", ".join(
        f"ADD COLUMN IF NOT EXISTS {column} {kind}" for column, kind in STATE_COLUMNS.items()
    )
    return (
        f"ALTER TABLE {{db}}.{name} DROP COLUMN IF EXISTS distinct_state, "
        f"DROP COLUMN IF EXISTS quantiles_state, {adds}"
    )


_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE IF NOT EXISTS {db}.window_aggregates
        (
            tenant LowCardinality(String),
            type LowCardinality(String),
            window_seconds UInt32,
            window_start DateTime64(3, 'UTC'),
            count UInt64,
            sum Float64
        )
        ENGINE = SummingMergeTree((count, sum))
        PARTITION BY toYYYYMM(window_start)
        ORDER BY (tenant, type, window_seconds, window_start)
        SETTINGS non_replicated_deduplication_window = 100000
        """,
    ),
    (
        2,
        # One row per closed window, group and Kafka partition. A replayed window has
        # the same sort key and replaces the earlier row, so writes are idempotent.
        """
        CREATE TABLE IF NOT EXISTS {db}.window_results
        (
            window LowCardinality(String),
            tenant LowCardinality(String),
            type LowCardinality(String),
            window_start DateTime64(3, 'UTC'),
            window_end DateTime64(3, 'UTC'),
            partition UInt16,
            count UInt64,
            sum Float64,
            min Float64,
            max Float64,
            written_at DateTime64(3, 'UTC') DEFAULT now64(3)
        )
        ENGINE = ReplacingMergeTree(written_at)
        PARTITION BY toYYYYMM(window_start)
        ORDER BY (tenant, type, window, window_start, partition)
        """,
    ),
    (3, "DROP TABLE IF EXISTS {db}.window_aggregates"),
    (
        4,
        # Group-by dimensions become part of the row key; distinct counts and quantiles
        # are stored as their sketches (base64), which merge across partitions on read.
        """
        ALTER TABLE {db}.window_results
            ADD COLUMN group_key String AFTER partition,
            ADD COLUMN dims Map(LowCardinality(String), String) AFTER group_key,
            ADD COLUMN distinct_sketch String DEFAULT '' AFTER max,
            ADD COLUMN quantile_sketch String DEFAULT '' AFTER distinct_sketch,
            MODIFY ORDER BY (tenant, type, window, window_start, partition, group_key)
        """,
    ),
    (
        5,
        # Raw events as they counted. Keyed by the event's identity and time, so a batch
        # written again after a crash replaces its rows instead of adding to them.
        """
        CREATE TABLE IF NOT EXISTS {db}.events
        (
            tenant LowCardinality(String),
            type LowCardinality(String),
            ts DateTime64(3, 'UTC'),
            source LowCardinality(String),
            event_id String,
            entity String,
            value Float64,
            partition UInt16,
            offset UInt64,
            payload String CODEC(ZSTD(3)),
            written_at DateTime64(3, 'UTC') DEFAULT now64(3)
        )
        ENGINE = ReplacingMergeTree(written_at)
        PARTITION BY toDate(ts)
        ORDER BY (tenant, type, ts, source, event_id)
        """,
    ),
    (
        6,
        # Entity lookups in raw search skip granules by a bloom filter instead of reading
        # the whole day.
        "ALTER TABLE {db}.events ADD INDEX IF NOT EXISTS entity_bloom entity "
        "TYPE bloom_filter(0.01) GRANULARITY 4",
    ),
    (7, _aggregate_table("windows_1m", "toYYYYMM(window_start)")),
    (8, _aggregate_table("rollup_1h", "toYYYYMM(window_start)")),
    (9, _aggregate_table("rollup_1d", "toYear(window_start)")),
    (
        10,
        # How far each aggregate table is final. `pending_until` is written before a
        # chunk is inserted, so a chunk interrupted by a crash is redone with the same
        # bounds and deduplication token (and dropped by ClickHouse if it had landed).
        """
        CREATE TABLE IF NOT EXISTS {db}.rollup_progress
        (
            name LowCardinality(String),
            sealed_until DateTime64(3, 'UTC'),
            pending_until DateTime64(3, 'UTC'),
            updated_at DateTime64(6, 'UTC') DEFAULT now64(6)
        )
        ENGINE = ReplacingMergeTree(updated_at)
        ORDER BY name
        """,
    ),
    (
        11,
        # Data quality of the stored events, per sealed minute and source.
        """
        CREATE TABLE IF NOT EXISTS {db}.data_quality_1m
        (
            tenant LowCardinality(String),
            source LowCardinality(String),
            type LowCardinality(String),
            window_start DateTime('UTC'),
            events SimpleAggregateFunction(sum, UInt64),
            empty_entity SimpleAggregateFunction(sum, UInt64),
            non_finite_value SimpleAggregateFunction(sum, UInt64),
            undecodable_payload SimpleAggregateFunction(sum, UInt64),
            max_delay_seconds SimpleAggregateFunction(max, Float64)
        )
        ENGINE = AggregatingMergeTree
        PARTITION BY toYYYYMM(window_start)
        ORDER BY (tenant, source, type, window_start)
        SETTINGS non_replicated_deduplication_window = 10000
        """,
    ),
    # One sketch family everywhere: the workers' HyperLogLog and DDSketch as map states.
    (12, _sketch_columns("windows_1m")),
    (13, _sketch_columns("rollup_1h")),
    (14, _sketch_columns("rollup_1d")),
    (
        15,
        # Sessions of an entity, as the sessions batch job computed them from the
        # archive (data_jobs/sessions.py). A run replaces the sessions of its range.
        """
        CREATE TABLE IF NOT EXISTS {db}.sessions
        (
            tenant LowCardinality(String),
            entity String,
            session_start DateTime64(3, 'UTC'),
            session_end DateTime64(3, 'UTC'),
            events UInt64,
            value_sum Float64,
            written_at DateTime64(3, 'UTC') DEFAULT now64(3)
        )
        ENGINE = ReplacingMergeTree(written_at)
        PARTITION BY toYYYYMM(session_start)
        ORDER BY (tenant, entity, session_start)
        """,
    ),
)


@dataclass(frozen=True, slots=True)
class Retention:
    """Days each table keeps its rows (0: forever)."""

    raw_days: int = 30
    minute_days: int = 90
    hour_days: int = 730
    day_days: int = 0

    def tables(self) -> list[tuple[str, str, int]]:
        return [
            ("events", "ts", self.raw_days),
            ("windows_1m", "window_start", self.minute_days),
            ("data_quality_1m", "window_start", self.minute_days),
            ("rollup_1h", "window_start", self.hour_days),
            ("rollup_1d", "window_start", self.day_days),
        ]


def _first_line(text: str) -> str:
    """ClickHouse's reason, without the statement and settings it echoes."""
    line = text.strip().splitlines()[0] if text.strip() else text
    line = line.split(". (", 1)[0] if "DB::Exception:" in line else line
    return line[:300]


# ClickHouse error codes of the limits a query runs with, by the limit's name.
_LIMIT_CODES = {159: "time", 241: "memory", 158: "rows_to_read", 396: "result_rows"}


def _refusal(exc: ClickHouseError) -> QueryRejected | StoreUnavailable:
    """The project's error for a refused read: a limit it hit, or another refusal.

    The server running out of memory as a whole (not this query's own limit) is an
    outage of the moment, not the query's fault.
    """
    reason = _first_line(str(exc))
    code = getattr(exc, "code", None)
    if code == 241 and "(total)" in reason:
        return StoreUnavailable(f"ClickHouse is short of memory: {reason}")
    limit = _LIMIT_CODES.get(code) if isinstance(code, int) else None
    if limit == "result_rows" and "max bytes" in reason:
        limit = "result_bytes"
    if limit is not None:
        return QueryLimitExceeded(reason, limit)
    return QueryRejected(reason)


class _ReadClients:
    """Clients for reads, one per statement in flight, reused once it has answered.

    A clickhouse-connect client runs one statement at a time (its chDB handle is locked
    for the call), so reads that share one wait for each other; here each concurrent
    read gets its own. The pool grows to the most reads in flight at once, which the
    caller bounds (the owner actor's read threads). A client whose statement failed is
    closed, not reused: a stream broken mid-answer must not reach a later query.
    """

    def __init__(self, dsn: str, database: str) -> None:
        self._dsn, self._database = dsn, database
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    @contextmanager
    def borrow(self) -> Iterator[Any]:
        with self._lock:
            client = self._idle.pop() if self._idle else None
            if client is None:  # opened under the lock: chDB handles open one at a time
                client = self._open()
        try:
            yield client
        except BaseException:
            client.close()
            raise
        with self._lock:
            self._idle.append(client)

    def _open(self) -> Any:
        try:  # bound to the database: tables may be named bare
            return clickhouse_connect.get_client(dsn=self._dsn, database=self._database)
        except (ClickHouseError, OSError) as exc:
            where = self._dsn.split("@")[-1]  # never echo credentials
            raise StoreUnavailable(f"ClickHouse at {where} did not answer: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _quoted(identifier: str) -> str:
    return "`" + identifier.replace("\\", "\\\\").replace("`", "\\`") + "`"


def _dims(group_key: str) -> tuple[tuple[str, str], ...]:
    """The group-by (name, value) pairs, in their order, back from a row's group key."""
    if not group_key:
        return ()
    pairs = (part.split("=", 1) for part in group_key.split("\x1f"))
    return tuple((name, value) for name, value in pairs)


class ClickHouseStore:
    """Rayline's tables in one ClickHouse database."""

    def __init__(self, dsn: str, database: str) -> None:
        self._database = database
        self._dsn = dsn
        self._reads = _ReadClients(dsn, database)
        try:
            self._client = clickhouse_connect.get_client(dsn=dsn)
        except (ClickHouseError, OSError) as exc:
            where = dsn.split("@")[-1]  # never echo credentials
            raise StoreUnavailable(f"ClickHouse at {where} did not answer: {exc}") from exc

    def migrate(self) -> list[int]:
        """Bring the schema up to date; return the migration versions applied now."""
        db = self._database
        self._command(f"CREATE DATABASE IF NOT EXISTS {db}")
        self._command(
            f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations "
            "(version UInt32, applied_at DateTime DEFAULT now()) "
            "ENGINE = MergeTree ORDER BY version"
        )
        done = {row[0] for row in self._query(f"SELECT version FROM {db}.schema_migrations")}
        applied = []
        for version, sql in _MIGRATIONS:
            if version in done:
                continue
            self._command(sql.format(db=db))
            self._client.insert(f"{db}.schema_migrations", [[version]], column_names=["version"])
            applied.append(version)
        return applied

    def insert_window_results(self, results: Sequence[WindowResult]) -> int:
        """Store closed windows; a window stored again replaces its earlier row."""
        if not results:
            return 0
        ms = pa.timestamp("ms", "UTC")
        table = pa.table(
            {
                "window": pa.array([r.window for r in results], pa.string()),
                "tenant": pa.array([r.tenant for r in results], pa.string()),
                "type": pa.array([r.type for r in results], pa.string()),
                "window_start": pa.array([r.start for r in results], pa.int64()).cast(ms),
                "window_end": pa.array([r.end for r in results], pa.int64()).cast(ms),
                "partition": pa.array([r.partition for r in results], pa.uint16()),
                "group_key": pa.array([r.group_key for r in results], pa.string()),
                "dims": pa.array(
                    [list(r.dims) for r in results], pa.map_(pa.string(), pa.string())
                ),
                "count": pa.array([r.count for r in results], pa.uint64()),
                "sum": pa.array([r.sum for r in results], pa.float64()),
                "min": pa.array([r.min for r in results], pa.float64()),
                "max": pa.array([r.max for r in results], pa.float64()),
                "distinct_sketch": pa.array([r.distinct or "" for r in results], pa.string()),
                "quantile_sketch": pa.array([r.quantiles or "" for r in results], pa.string()),
            }
        )
        try:
            self._client.insert_arrow(f"{self._database}.window_results", table)
        except ClickHouseError as exc:
            raise StoreUnavailable(
                f"ClickHouse rejected {len(results)} window rows: {exc}"
            ) from exc
        return len(results)

    def insert_events(self, table: pa.Table) -> int:
        """Store raw events (columns as in the ``events`` table); a replay replaces rows."""
        if not table.num_rows:
            return 0
        try:
            self._client.insert_arrow(f"{self._database}.events", table)
        except ClickHouseError as exc:
            raise StoreUnavailable(
                f"ClickHouse rejected {table.num_rows} raw events: {exc}"
            ) from exc
        return int(table.num_rows)

    def replace_sessions(
        self, from_ms: int, to_ms: int, tenant: str | None, table: pa.Table
    ) -> int:
        """Store the sessions a job computed for ``[from_ms, to_ms)`` (of ``tenant``, or of
        every tenant) in place of those stored for it before."""
        where = (
            "session_start >= fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC') "
            "AND session_start < fromUnixTimestamp64Milli({to_ms:Int64}, 'UTC')"
        )
        params: dict[str, Any] = {"from_ms": from_ms, "to_ms": to_ms}
        if tenant is not None:
            where += " AND tenant = {tenant:String}"
            params["tenant"] = tenant
        self._command(f"DELETE FROM {self._database}.sessions WHERE {where}", params)
        if not table.num_rows:
            return 0
        try:
            self._client.insert_arrow(f"{self._database}.sessions", table)
        except ClickHouseError as exc:
            raise StoreUnavailable(f"ClickHouse rejected {table.num_rows} sessions: {exc}") from exc
        return int(table.num_rows)

    def window_results(
        self, tenant: str, type_: str, window: str, from_ms: int, to_ms: int
    ) -> list[WindowResult]:
        """Closed windows of one metric starting in [from, to), one row per partition."""
        rows = self._query(
            "SELECT toUnixTimestamp64Milli(window_start), toUnixTimestamp64Milli(window_end), "
            "partition, count, sum, min, max, group_key, distinct_sketch, quantile_sketch "
            f"FROM {self._database}.window_results FINAL "
            "WHERE tenant = {tenant:String} AND type = {type:String} "
            "AND window = {window:String} "
            "AND window_start >= fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC') "
            "AND window_start < fromUnixTimestamp64Milli({to_ms:Int64}, 'UTC') "
            "ORDER BY window_start, partition, group_key",
            {"tenant": tenant, "type": type_, "window": window, "from_ms": from_ms, "to_ms": to_ms},
        )
        return [
            WindowResult(
                window,
                int(r[2]),
                tenant,
                type_,
                int(r[0]),
                int(r[1]),
                int(r[3]),
                float(r[4]),
                float(r[5]),
                float(r[6]),
                _dims(r[7]),
                r[8] or None,
                r[9] or None,
            )
            for r in rows
        ]

    def raw_event_stats(self, tenant: str) -> dict[str, int]:
        """Raw events stored for a tenant: rows, and distinct (source, event_id) among them."""
        rows = self._query(
            "SELECT count(), uniqExact(source, event_id) "
            f"FROM {self._database}.events FINAL WHERE tenant = {{tenant:String}}",
            {"tenant": tenant},
        )
        return {"rows": int(rows[0][0]), "distinct_ids": int(rows[0][1])}

    def ensure_cdc_table(
        self, table: str, columns: Sequence[tuple[str, str]], key: Sequence[str]
    ) -> None:
        """Create the table of a captured PostgreSQL table, or add the columns it lacks.

        ``columns`` are (name, ClickHouse type) pairs. The table keeps per primary key
        the row with the highest ``_version`` (the change's LSN); ``FINAL`` drops rows
        whose newest version has ``_deleted = 1``.
        """
        db, name = self._database, _quoted(table)
        body = ", ".join(f"{_quoted(c)} {t}" for c, t in columns)
        self._command(
            f"CREATE TABLE IF NOT EXISTS {db}.{name} "
            f"({body}, _version UInt64, _deleted UInt8) "
            "ENGINE = ReplacingMergeTree(_version, _deleted) "
            f"ORDER BY ({', '.join(_quoted(k) for k in key)})"
        )
        adds = ", ".join(f"ADD COLUMN IF NOT EXISTS {_quoted(c)} {t}" for c, t in columns)
        self._command(f"ALTER TABLE {db}.{name} {adds}")

    def insert_cdc_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> int:
        """Store versioned rows of a captured table; storing one again changes nothing."""
        if not rows:
            return 0
        try:
            self._client.insert(
                f"{self._database}.{_quoted(table)}", list(rows), column_names=list(columns)
            )
        except ClickHouseError as exc:
            raise StoreUnavailable(
                f"ClickHouse rejected {len(rows)} rows of {table}: {exc}"
            ) from exc
        return len(rows)

    def cdc_rows(self, table: str) -> list[dict[str, Any]]:
        """The current rows of a captured table (deleted ones left out)."""
        name = f"{self._database}.{_quoted(table)}"
        try:
            result = self._client.query(
                f"SELECT * EXCEPT (_version, _deleted) FROM {name} FINAL WHERE _deleted = 0"
            )
        except ClickHouseError as exc:
            raise StoreUnavailable(f"ClickHouse could not read {table}: {exc}") from exc
        return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]

    def ping(self) -> bool:
        try:
            return self._query("SELECT 1") == [(1,)]
        except StoreUnavailable:
            return False

    def rollups(self, dimensions: Sequence[str]) -> Rollups:
        """The rollup steps over this database (see ``adapters.rollups``)."""
        return Rollups(self._database, dimensions, self._command, self._query)

    def apply_retention(self, retention: Retention) -> list[str]:
        """Set each table's TTL to the configured days (0: keep); return the tables changed."""
        changed = []
        for table, column, days in retention.tables():
            engine = self._query(
                "SELECT engine_full FROM system.tables "
                "WHERE database = {db:String} AND name = {table:String}",
                {"db": self._database, "table": table},
            )
            current = engine[0][0] if engine else ""
            wanted = f"toIntervalDay({days})" if days else None
            has_ttl = " TTL " in current
            if (wanted is None and not has_ttl) or (wanted is not None and wanted in current):
                continue
            ttl = (
                "REMOVE TTL"
                if wanted is None
                else f"MODIFY TTL toDateTime({column}) + INTERVAL {int(days)} DAY"
            )
            self._command(f"ALTER TABLE {self._database}.{table} {ttl}")
            changed.append(table)
        return changed

    def execute(self, sql: str, parameters: dict[str, Any]) -> None:
        """Run one statement (DDL, INSERT ... SELECT) with bound parameters."""
        self._command(sql, parameters)

    def run_query(
        self, sql: str, parameters: dict[str, Any], settings: dict[str, Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run a read on a client of its own; return (column names, rows).

        Safe to call from several threads at once: concurrent reads run side by side.

        Raises:
            QueryLimitExceeded: the statement ran into one of its ``settings`` limits.
            QueryRejected: ClickHouse refused it otherwise, or its answer was unreadable.
            StoreUnavailable: ClickHouse is down or short of memory as a whole.
        """
        try:
            with self._reads.borrow() as client:
                result = client.query(sql, parameters=parameters, settings=settings)
                return list(result.column_names), [tuple(r) for r in result.result_rows]
        except ClickHouseError as exc:
            raise _refusal(exc) from exc
        except MemoryError as exc:
            raise QueryLimitExceeded(
                "the answer needs more memory than it may use", "memory"
            ) from exc
        except (IndexError, ValueError, TypeError) as exc:  # a misread answer
            raise QueryRejected(f"the answer could not be read: {exc}") from exc

    def _command(
        self,
        sql: str,
        parameters: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        try:
            self._client.command(sql, parameters=parameters, settings=settings)
        except ClickHouseError as exc:
            raise StoreUnavailable(f"ClickHouse failed: {exc}") from exc

    def _query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """An internal read, on a read client: it never waits for a write in progress."""
        try:
            with self._reads.borrow() as client:
                return [tuple(r) for r in client.query(sql, parameters=parameters).result_rows]
        except ClickHouseError as exc:
            raise StoreUnavailable(f"ClickHouse query failed: {exc}") from exc

    def close(self) -> None:
        self._reads.close()
        self._client.close()
