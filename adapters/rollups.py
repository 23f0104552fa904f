"""Rollups in ClickHouse: raw events → ``windows_1m`` → ``rollup_1h`` → ``rollup_1d``.

A bucket is rolled up once it is *sealed*: the minute's end is at or below the sealed
watermark (the lowest watermark of all partitions, taken after their events were
written; see ``actors.partition_worker``). No event can still count in a sealed minute
(a later one is dead-lettered as late), so its aggregate is final and written once.

Exactly-once effect, without a transaction: for each table, ``rollup_progress`` holds
``sealed_until`` (done) and ``pending_until`` (the chunk being written). A step
first records the chunk [sealed, pending), then inserts it with the deduplication token
``<table>:<start>:<end>``, then moves ``sealed_until``. A crash anywhere redoes the
recorded chunk with the same bounds and token; ClickHouse drops a block it already has
(``non_replicated_deduplication_window``), so the chunk counts once. Raw reads use
``FINAL``, so an event written twice (a worker replaying its outbox) counts once too.

Chunks end at hour boundaries (day boundaries for the daily table), so a catch-up over
days of backlog proceeds in bounded statements.

Distinct counts and quantiles are the workers' own HyperLogLog and DDSketch, kept as
map states that ClickHouse merges (``core.sketch_states``): ``windows_1m`` folds raw
events into them with core's hash and bucket steps in SQL, the hourly and daily tables
merge them with ``maxMap``/``sumMap``, and :meth:`Rollups.sealed_windows` reads them with
the same estimates as the query API.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from core.query_plan import utc_datetime
from core.sealed import QUANTILE_NAMES, SealedWindow
from core.sketch_states import (
    MERGE_SQL,
    STATE_COLUMNS,
    distinct_value,
    estimate_sql,
    quantile_value,
    raw_state_sql,
)

log = logging.getLogger(__name__)


MINUTE_MS, HOUR_MS, DAY_MS = 60_000, 3_600_000, 86_400_000

Command = Callable[[str, dict[str, Any], dict[str, Any] | None], None]
Query = Callable[[str, dict[str, Any]], list[tuple[Any, ...]]]


def group_key_sql(payload: str = "payload") -> str:
    """Expression of the group key of a raw event (``name=value`` pairs joined by U+001F)."""
    return (
        "arrayStringConcat(arrayMap(k -> concat(k, '=', "
        f"JSONExtractString({payload}, 'attributes', k)), {{dims:Array(String)}}), '\\x1f')"
    )


def dims_sql(payload: str = "payload") -> str:
    """Expression of the dimension map of a raw event, for the configured dimensions."""
    return (
        "mapFromArrays({dims:Array(String)}, "
        f"arrayMap(k -> JSONExtractString({payload}, 'attributes', k), {{dims:Array(String)}}))"
    )


# Per target table: its source, bucket expression, and the state columns it writes. The
# sketch columns hold the workers' own HyperLogLog and DDSketch (core.sketch_states).
_RAW_SKETCHES = ", ".join(f"{sql} AS {column}" for column, sql in raw_state_sql().items())
_MERGED_SKETCHES = ", ".join(MERGE_SQL[column] for column in STATE_COLUMNS)
_FROM_RAW = f"""
    SELECT tenant, type, toStartOfMinute(ts) AS bucket, {group_key_sql()} AS gk,
        any({dims_sql()}) AS dm, count() AS events, sum(value) AS value_sum,
        min(value) AS value_min, max(value) AS value_max, {_RAW_SKETCHES}
    FROM {{db}}.events FINAL
    WHERE ts >= {{start:DateTime64(3)}} AND ts < {{end:DateTime64(3)}}
    GROUP BY tenant, type, bucket, gk
    ORDER BY tenant, type, bucket, gk
"""


def _from_aggregate(source: str, bucket: str) -> str:
    return f"""
    SELECT tenant, type, {bucket}(window_start) AS bucket, group_key AS gk, any(dims) AS dm,
        sum(events), sum(value_sum), min(value_min), max(value_max), {_MERGED_SKETCHES}
    FROM {{db}}.{source}
    WHERE window_start >= {{start:DateTime64(3)}} AND window_start < {{end:DateTime64(3)}}
    GROUP BY tenant, type, bucket, gk
    ORDER BY tenant, type, bucket, gk
    """


_QUALITY = """
    INSERT INTO {db}.data_quality_1m
    SELECT tenant, source, type, toStartOfMinute(ts) AS bucket, count(),
        countIf(entity = ''), countIf(NOT isFinite(value)), countIf(NOT isValidJSON(payload)),
        max(greatest(0, (JSONExtractInt(payload, 'received_at') - toUnixTimestamp64Milli(ts))
            / 1000))
    FROM {db}.events FINAL
    WHERE ts >= {start:DateTime64(3)} AND ts < {end:DateTime64(3)}
    GROUP BY tenant, source, type, bucket
    ORDER BY tenant, source, type, bucket
"""

_COLUMNS = (
    "tenant, type, window_start, group_key, dims, events, value_sum, value_min, value_max, "
    + ", ".join(STATE_COLUMNS)
)
_ESTIMATES = estimate_sql()


@dataclass(frozen=True, slots=True)
class Level:
    table: str
    unit_ms: int
    chunk_ms: int
    select: str
    upstream: str | None  # the level whose sealed point bounds this one; None: raw events


LEVELS = (
    Level("windows_1m", MINUTE_MS, HOUR_MS, _FROM_RAW, None),
    Level(
        "rollup_1h", HOUR_MS, DAY_MS, _from_aggregate("windows_1m", "toStartOfHour"), "windows_1m"
    ),
    Level(
        "rollup_1d", DAY_MS, 7 * DAY_MS, _from_aggregate("rollup_1h", "toStartOfDay"), "rollup_1h"
    ),
)


class Rollups:
    """Advances every aggregate table up to a sealed watermark."""

    def __init__(
        self, database: str, dimensions: Sequence[str], command: Command, query: Query
    ) -> None:
        self._db = database
        self._dims = list(dimensions)
        self._command = command
        self._query = query
        self.rewrites = 0
        """Chunks written again after an interruption (cached answers may be stale)."""

    def progress(self) -> dict[str, tuple[int, int]]:
        """Per table: (sealed_until, pending_until), epoch ms."""
        rows = self._query(
            "SELECT name, toUnixTimestamp64Milli(sealed_until), "
            f"toUnixTimestamp64Milli(pending_until) FROM {self._db}.rollup_progress FINAL",
            {},
        )
        return {str(r[0]): (int(r[1]), int(r[2])) for r in rows}

    def advance(self, sealed_ms: int, max_chunks: int = 48) -> dict[str, int]:
        """Roll every level up to ``sealed_ms``; return each table's sealed point now.

        At most ``max_chunks`` statements run per level, so one call stays short; the
        next call goes on from there.
        """
        progress = self.progress()
        sealed: dict[str, int] = {}
        for level in LEVELS:
            limit = sealed_ms if level.upstream is None else sealed[level.upstream]
            sealed[level.table] = self._advance_level(level, progress, limit, max_chunks)
        return sealed

    def _advance_level(
        self, level: Level, progress: dict[str, tuple[int, int]], limit_ms: int, max_chunks: int
    ) -> int:
        limit = limit_ms // level.unit_ms * level.unit_ms
        if level.table not in progress:
            start = self._first_bucket(level, limit)
            self._record(level.table, start, start)
            progress[level.table] = (start, start)
        done, pending = progress[level.table]
        if pending > done:  # a chunk interrupted earlier: redo exactly it
            self._write_chunk(level, done, pending)
            self._record(level.table, pending, pending)
            self.rewrites += 1
            done = pending
        for _ in range(max_chunks):
            end = min(done // level.chunk_ms * level.chunk_ms + level.chunk_ms, limit)
            if end <= done:
                break
            self._record(level.table, done, end)
            self._write_chunk(level, done, end)
            self._record(level.table, end, end)
            done = end
        return done

    def _first_bucket(self, level: Level, limit: int) -> int:
        """Where a table with no progress starts: its source's oldest data, else ``limit``."""
        source, column = (
            ("events", "ts") if level.upstream is None else (level.upstream, "window_start")
        )
        rows = self._query(
            f"SELECT toUnixTimestamp64Milli(toDateTime64(min({column}), 3)), count() "
            f"FROM {self._db}.{source}",
            {},
        )
        if not rows or not int(rows[0][1]):
            return limit
        return min(int(rows[0][0]) // level.unit_ms * level.unit_ms, limit)

    def rebuild(self, from_ms: int, to_ms: int) -> dict[str, int]:
        """Compute the sealed aggregates of whole days again from the raw events.

        For events stored after their minutes were sealed (a backfill, an import, a
        replay from the archive). Each level's rows of the days are deleted, then
        written again in chunks; a rebuild stopped half-way is simply run again (it
        deletes first). Ranges past a table's sealed point are left to the rollups.

        Returns:
            Per table, the chunks written.
        """
        progress = self.progress()
        run = uuid.uuid4().hex[:12]
        start = from_ms // DAY_MS * DAY_MS
        written: dict[str, int] = {}
        for level in LEVELS:
            sealed = progress.get(level.table, (0, 0))[0]
            end = min(-(-to_ms // DAY_MS) * DAY_MS, sealed // level.unit_ms * level.unit_ms)
            if end <= start:
                continue
            params = {"start": utc_datetime(start), "end": utc_datetime(end)}
            tables = [level.table] + (["data_quality_1m"] if level.upstream is None else [])
            for table in tables:
                self._command(
                    f"ALTER TABLE {self._db}.{table} DELETE WHERE window_start >= "
                    "{start:DateTime64(3)} AND window_start < {end:DateTime64(3)}",
                    params,
                    {"mutations_sync": 1},
                )
            chunks = 0
            for chunk_start in range(start, end, level.chunk_ms):
                chunk_end = min(chunk_start + level.chunk_ms, end)
                self._write_chunk(level, chunk_start, chunk_end, f":rebuild:{run}")
                chunks += 1
            written[level.table] = chunks
        self.rewrites += 1
        return written

    def _write_chunk(self, level: Level, start: int, end: int, suffix: str = "") -> None:
        params = {"start": utc_datetime(start), "end": utc_datetime(end), "dims": self._dims}
        token = f"{level.table}:{start}:{end}{suffix}"
        sql = f"INSERT INTO {self._db}.{level.table} ({_COLUMNS}) " + level.select.replace(
            "{db}", self._db
        )
        self._command(sql, params, {"insert_deduplication_token": token})
        if level.upstream is None:
            self._command(
                _QUALITY.replace("{db}", self._db),
                params,
                {"insert_deduplication_token": "dq:" + token},
            )
        log.info("rolled %s up over [%s, %s)", level.table, utc_datetime(start), utc_datetime(end))

    def _record(self, table: str, sealed: int, pending: int) -> None:
        self._command(
            f"INSERT INTO {self._db}.rollup_progress (name, sealed_until, pending_until) "
            "VALUES ({name:String}, {sealed:DateTime64(3)}, {pending:DateTime64(3)})",
            {"name": table, "sealed": utc_datetime(sealed), "pending": utc_datetime(pending)},
            None,
        )

    def sealed_windows(self, after_ms: int, limit: int) -> list[SealedWindow]:
        """Sealed minutes starting after ``after_ms``, oldest first, final numbers."""
        rows = self._query(
            "SELECT tenant, type, toUnixTimestamp(window_start) * 1000 AS start, group_key, "
            "any(dims), sum(events), sum(value_sum), min(value_min), max(value_max), "
            f"{_ESTIMATES['distinct']}, "
            f"[{', '.join(_ESTIMATES[name] for name in QUANTILE_NAMES)}] "
            f"FROM {self._db}.windows_1m "
            "WHERE window_start > {after:DateTime64(3)} "
            "GROUP BY tenant, type, window_start, group_key "
            "ORDER BY window_start, tenant, type, group_key LIMIT {limit:UInt32}",
            {"after": utc_datetime(after_ms), "limit": limit},
        )
        return [_sealed(r) for r in rows]


def _sealed(row: Sequence[Any]) -> SealedWindow:
    tenant, type_, start, group_key, dims, count, total, low, high, distinct, levels = row
    values = [quantile_value(level) for level in levels]
    return SealedWindow(
        tenant=str(tenant),
        type=str(type_),
        start=int(start),
        group_key=str(group_key),
        count=int(count),
        sum=float(total),
        min=float(low),
        max=float(high),
        distinct=distinct_value(float(distinct)),
        quantiles=(
            None
            if None in values
            else dict(zip(QUANTILE_NAMES, (float(v) for v in values if v is not None), strict=True))
        ),
        dims=tuple((str(k), str(v)) for k, v in dict(dims).items()),
    )
