"""SQL of the query API's reads, built from checked requests; values are only ever bound.

An aggregated read (1m, 1h, 1d) is the union of up to three parts, split at the points
where each table is sealed (see ``adapters.rollups``):

* the table of the resolution, for buckets it already holds;
* ``windows_1m`` for sealed minutes not yet rolled up into that table;
* raw ``events`` for the tail that is not sealed yet (folded into the same states).

Every part yields the same mergeable columns, so the outer query merges them like one
table: counts and sums add up, distinct counts and quantiles merge their sketches (the
workers' HyperLogLog registers and DDSketch buckets as maps; the raw part computes them
in SQL by the same steps, see ``core.sketch_states``). The
answer thus covers the whole range, up to the newest event stored, at any resolution.

The SQL text depends only on the shape of a request (resolution, metric, how many
groups and filters); tenant, type, times, attribute names and values are placeholders.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.query_plan import DAY, HOUR, MINUTE, RAW, SeriesRequest, utc_datetime
from core.sealed import QUANTILE_NAMES
from core.sketch_states import DISTINCT_COLUMNS, QUANTILE_COLUMNS, estimate_sql, raw_state_sql

_BUCKET_FN = {MINUTE: "toStartOfMinute", HOUR: "toStartOfHour", DAY: "toStartOfDay"}
_TABLE = {MINUTE: "windows_1m", HOUR: "rollup_1h", DAY: "rollup_1d"}
# Each state column, and how the raw part folds events into it.
_RAW_STATE = {
    "events": "count()",
    "value_sum": "sum(value)",
    "value_min": "min(value)",
    "value_max": "max(value)",
    **raw_state_sql(),
}
# The columns each metric merges: a part reads (or, from raw events, computes) only these,
# so a count never touches the distinct and quantile states.
_NEEDS = {
    "count": ("events",),
    "sum": ("value_sum",),
    "min": ("value_min",),
    "max": ("value_max",),
    "avg": ("value_sum", "events"),
    "distinct": DISTINCT_COLUMNS,
    **dict.fromkeys(QUANTILE_NAMES, QUANTILE_COLUMNS),
}
METRIC_SQL: Mapping[str, str] = {
    "count": "sum(events)",
    "sum": "sum(value_sum)",
    "min": "min(value_min)",
    "max": "max(value_max)",
    "avg": "sum(value_sum) / nullIf(sum(events), 0)",
    **estimate_sql(),
}
"""Each metric over merged rows. ``distinct`` and the quantiles are the workers' own
sketches' estimates (``core.sketch_states``): a quantile comes back as its bucket, which
orders as the values do; ``core.sketch_states.answer_value`` makes the number."""


@dataclass(frozen=True, slots=True)
class Sealed:
    """Where each aggregate table is final (epoch ms); see ``adapters.rollups``."""

    minute: int
    hour: int
    day: int

    def of(self, resolution: str) -> int:
        return {MINUTE: self.minute, HOUR: self.hour, DAY: self.day}[resolution]


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    parameters: dict[str, Any]


class _Builder:
    """Shared placeholders of one statement: tenant, type, groups and filters."""

    def __init__(self, request: SeriesRequest, database: str) -> None:
        self.request = request
        self.db = database
        self.params: dict[str, Any] = {"tenant": request.tenant, "type": request.type}
        for i, name in enumerate(request.group_by):
            self.params[f"g{i}"] = name
        for i, (name, value) in enumerate(request.filters):
            self.params[f"f{i}_key"], self.params[f"f{i}_value"] = name, value

    def groups(self) -> list[str]:
        return [f"g{i}" for i in range(len(self.request.group_by))]

    def _attribute(self, raw: bool, key: str) -> str:
        if raw:
            return f"JSONExtractString(payload, 'attributes', {{{key}:String}})"
        return f"dims[{{{key}:String}}]"

    def _where(self, raw: bool, part: str, start: int, end: int) -> str:
        column = "ts" if raw else "window_start"
        self.params[f"{part}_from"], self.params[f"{part}_to"] = (
            utc_datetime(start),
            utc_datetime(end),
        )
        clauses = [
            "tenant = {tenant:String}",
            "type = {type:String}",
            f"{column} >= {{{part}_from:DateTime64(3)}}",
            f"{column} < {{{part}_to:DateTime64(3)}}",
        ]
        clauses += [
            f"{self._attribute(raw, f'f{i}_key')} = {{f{i}_value:String}}"
            for i in range(len(self.request.filters))
        ]
        return " AND ".join(clauses)

    def part(
        self,
        source: str,
        bucket: str | None,
        part: str,
        span: tuple[int, int],
        columns: tuple[str, ...],
    ) -> str:
        """One part of the union: bucket, groups, and the mergeable state columns."""
        raw = source == "events"
        column = "toDateTime(ts, 'UTC')" if raw else "window_start"
        keys = [f"{self._attribute(raw, g)} AS {g}" for g in self.groups()]
        if bucket is not None:
            keys.insert(0, f"{bucket}({column}) AS bucket")
        where = self._where(raw, part, *span)
        states = [f"{_RAW_STATE[c]} AS {c}" if raw else c for c in columns]
        select = ", ".join([*keys, *states])
        if not raw:
            return f"SELECT {select} FROM {self.db}.{source} WHERE {where}"
        group = ", ".join(["bucket"] * (bucket is not None) + self.groups()) or "tuple()"
        return f"SELECT {select} FROM {self.db}.events FINAL WHERE {where} GROUP BY {group}"


def _parts(builder: _Builder, sealed: Sealed, bucketed: bool, columns: tuple[str, ...]) -> str:
    request = builder.request
    start, end = request.bucket_bounds()
    resolution = request.resolution
    bucket = _BUCKET_FN[resolution] if bucketed else None
    own = min(max(sealed.of(resolution), start), end)
    minute = min(max(sealed.minute, own), end)
    parts = []
    if own > start:
        parts.append(builder.part(_TABLE[resolution], bucket, "a", (start, own), columns))
    if resolution != MINUTE and minute > own:
        parts.append(builder.part(_TABLE[MINUTE], bucket, "b", (own, minute), columns))
    if end > minute:
        parts.append(builder.part("events", bucket, "c", (minute, end), columns))
    return " UNION ALL ".join(parts)


def series_statement(request: SeriesRequest, sealed: Sealed, database: str) -> Statement:
    """One row per bucket (and group): ``t`` (epoch ms), the group values, ``value``."""
    if request.resolution == RAW:
        raise ValueError("raw requests are events, see events_statement")
    builder = _Builder(request, database)
    parts = _parts(builder, sealed, bucketed=True, columns=_NEEDS[request.metric])
    groups = builder.groups()
    metric = METRIC_SQL[request.metric]
    keys = ", ".join(["bucket", *groups])
    top = ""
    if request.top is not None and groups:
        # The same parts ranked by the metric over the whole range, same placeholders.
        names = ", ".join(groups)
        top = (
            f" WHERE ({names}) IN (SELECT {names} FROM ({parts}) GROUP BY {names} "
            f"ORDER BY {metric} DESC, {names} LIMIT {{top:UInt32}})"
        )
        builder.params["top"] = request.top
    sql = (
        f"SELECT toUnixTimestamp(bucket) * 1000 AS t, {', '.join([*groups, ''])}"
        f"{metric} AS value FROM ({parts}){top} GROUP BY {keys} ORDER BY {keys}"
    )
    return Statement(sql, builder.params)


def summary_statement(request: SeriesRequest, sealed: Sealed, database: str) -> Statement:
    """Every metric over the whole range, per group; ``top`` keeps the largest groups."""
    builder = _Builder(request, database)
    parts = _parts(builder, sealed, bucketed=False, columns=tuple(_RAW_STATE))
    groups = builder.groups()
    metrics = ", ".join(f"{sql} AS {name}" for name, sql in METRIC_SQL.items())
    select = ", ".join([*groups, metrics])
    sql = f"SELECT {select} FROM ({parts})"
    if groups:
        names = ", ".join(groups)
        sql += f" GROUP BY {names} ORDER BY {request.metric} DESC, {names}"
        if request.top is not None:
            sql += " LIMIT {top:UInt32}"
            builder.params["top"] = request.top
    return Statement(sql, builder.params)


def events_statement(request: SeriesRequest, database: str) -> Statement:
    """Raw events of the exact range, oldest first, one more than a page (to page on)."""
    builder = _Builder(request, database)
    where = builder._where(True, "r", request.from_ms, request.to_ms)
    if request.cursor is not None:
        where += " AND (ts, event_id) > ({cursor_ts:DateTime64(3)}, {cursor_id:String})"
        builder.params["cursor_ts"] = utc_datetime(request.cursor.ts_ms)
        builder.params["cursor_id"] = request.cursor.event_id
    builder.params["limit"] = request.limit + 1
    sql = (
        "SELECT toUnixTimestamp64Milli(ts) AS ts_ms, event_id, source, entity, value, "
        "JSONExtractRaw(payload, 'attributes') AS attributes "
        f"FROM {database}.events FINAL WHERE {where} "
        "ORDER BY ts, event_id LIMIT {limit:UInt32}"
    )
    return Statement(sql, builder.params)
