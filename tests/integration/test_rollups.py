"""Rollups on the real ClickHouse engine (chDB in this process): the 1m/1h/1d aggregates
equal an offline recomputation from the raw events, an interrupted chunk counts once,
retention is applied, and every query shape of the API reads by the primary key."""

from __future__ import annotations

import random
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from adapters.clickhouse import ClickHouseStore, Retention
from adapters.exceptions import StoreUnavailable
from adapters.rollups import Rollups
from core.query_plan import parse_series_request, utc_datetime
from core.query_sql import Sealed, events_statement, series_statement, summary_statement
from core.sketch_states import (
    answer_value,
    estimate_sql,
    hll_state,
    quantile_value,
    raw_state_sql,
)
from core.sketches import DDSketch, HyperLogLog, hash64
from tests.integration.query_data import MINUTE_MS, Event, events_table, make_events

HOUR_MS, DAY_MS = 3_600_000, 86_400_000


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chdb")


@pytest.fixture
def store(engine: Path) -> Iterator[ClickHouseStore]:
    store = ClickHouseStore(f"chdb://{engine}", f"r_{uuid.uuid4().hex[:10]}")
    store.migrate()
    yield store
    store.close()


def day_start(days_ago: int) -> int:
    return (int(time.time() * 1000) - days_ago * DAY_MS) // DAY_MS * DAY_MS


def expected(events: list[Event], bucket_ms: int, until: int) -> dict[tuple[Any, ...], int]:
    counts: dict[tuple[Any, ...], int] = defaultdict(int)
    for e in events:
        if e.ts < until:
            counts[(e.tenant, e.type, e.ts // bucket_ms * bucket_ms, e.region)] += 1
    return dict(counts)


def stored(store: ClickHouseStore, table: str) -> dict[tuple[Any, ...], int]:
    _cols, rows = store.run_query(
        "SELECT tenant, type, toUnixTimestamp(window_start) * 1000, dims['region'], "
        f"sum(events) FROM {store._database}.{table} "
        "GROUP BY tenant, type, window_start, group_key, dims['region']",
        {},
    )
    return {(r[0], r[1], int(r[2]), r[3]): int(r[4]) for r in rows}


def test_rollups_equal_an_offline_recomputation(store: ClickHouseStore) -> None:
    start = day_start(3) + 22 * HOUR_MS  # two hours before a day boundary
    events = make_events(["a", "b"], start, minutes=150, per_minute=12)
    table = events_table(events)
    store.insert_events(table)
    store.insert_events(table)  # a worker replaying its outbox: counts once (FINAL)
    sealed_at = start + 140 * MINUTE_MS + 30_000
    sealed = store.rollups(["region"]).advance(sealed_at)

    assert sealed["windows_1m"] == start + 140 * MINUTE_MS
    assert sealed["rollup_1h"] == start + 2 * HOUR_MS
    assert sealed["rollup_1d"] == day_start(2)
    assert stored(store, "windows_1m") == expected(events, MINUTE_MS, sealed["windows_1m"])
    assert stored(store, "rollup_1h") == expected(events, HOUR_MS, sealed["rollup_1h"])
    assert stored(store, "rollup_1d") == expected(events, DAY_MS, sealed["rollup_1d"])


def core_sketches(events: list[Event]) -> dict[str, Any]:
    """Distinct entities and quantiles as the workers' own sketches give them."""
    hll, dd = HyperLogLog(), DDSketch()
    if events:
        hll.add_hashes(hash64(pa.array([e.entity for e in events])))
        dd.add_values(np.array([e.value for e in events]))
    quantiles = {f"p{round(q * 100)}": dd.quantile(q) for q in (0.5, 0.9, 0.99)}
    return {"distinct": round(hll.estimate()), **quantiles}


def stored_sketches(store: ClickHouseStore, table: str, lo: int, hi: int) -> dict[str, Any]:
    estimates = estimate_sql()
    _c, rows = store.run_query(
        f"SELECT {', '.join(estimates.values())} FROM {store._database}.{table} "
        "WHERE tenant = 'a' AND type = 'click' AND window_start >= {lo:DateTime64(3)} "
        "AND window_start < {hi:DateTime64(3)}",
        {"lo": utc_datetime(lo), "hi": utc_datetime(hi)},
    )
    return {name: answer_value(name, v) for name, v in zip(estimates, rows[0], strict=True)}


def test_every_level_holds_the_workers_sketches(store: ClickHouseStore) -> None:
    start = day_start(2)
    events = make_events(["a"], start, minutes=120, per_minute=40)
    store.insert_events(events_table(events))
    store.rollups(["region"]).advance(start + DAY_MS + 3 * HOUR_MS)
    clicks = [e for e in events if e.tenant == "a" and e.type == "click"]
    for table, lo, hi in [
        ("windows_1m", start + 7 * MINUTE_MS, start + 8 * MINUTE_MS),
        ("windows_1m", start, start + 2 * HOUR_MS),
        ("rollup_1h", start + HOUR_MS, start + 2 * HOUR_MS),
        ("rollup_1d", start, start + DAY_MS),
    ]:
        want = core_sketches([e for e in clicks if lo <= e.ts < hi])
        assert stored_sketches(store, table, lo, hi) == want, table


def test_sql_sketches_equal_core_sketches_bit_for_bit(store: ClickHouseStore) -> None:
    """The SQL that folds raw events into states, and the estimates read from them,
    are core.sketches' steps: same registers, buckets and estimates, many sizes."""
    db = store._database
    store.execute(f"CREATE TABLE {db}.probe (g UInt32, e String, v Float64) "
                  "ENGINE = MergeTree ORDER BY g", {})  # fmt: skip
    rng = random.Random(7)
    sizes = [0, 1, 2, 17, 300, 2_000, 9_000, 60_000]
    rows: dict[str, list[Any]] = {"g": [], "e": [], "v": []}
    for g, n in enumerate(sizes):
        for _ in range(n):
            rows["g"].append(g)
            rows["e"].append(f"user-{rng.randrange(10**12)}-é" if rng.random() < 0.9 else "")
            rows["v"].append(rng.choice((0.0, 1e-12, -3.5, float("nan")))
                             if rng.random() < 0.05
                             else rng.lognormvariate(0, 4) * rng.choice((1, -1)))  # fmt: skip
    store._client.insert_arrow(f"{db}.probe", pa.table(rows))
    raw = raw_state_sql("e", "v")
    merged = ", ".join(f"{sql} AS {column}" for column, sql in raw.items())
    estimates = estimate_sql()
    _c, found = store.run_query(
        f"SELECT g, {', '.join(estimates.values())}, entity_hll FROM "
        f"(SELECT g, {merged} FROM {db}.probe GROUP BY g) GROUP BY g, entity_hll ORDER BY g",
        {},
    )
    assert len(found) == len([n for n in sizes if n])
    for row in found:
        g = int(row[0])
        entities = [e for gg, e in zip(rows["g"], rows["e"], strict=True) if gg == g and e]
        values = [v for gg, v in zip(rows["g"], rows["v"], strict=True) if gg == g]
        hll, dd = HyperLogLog(), DDSketch()
        hll.add_hashes(hash64(pa.array(entities, pa.string())))
        dd.add_values(np.array([v for v in values if v == v]))
        assert {int(k): int(v) for k, v in row[-1].items()} == hll_state(hll), g
        got = dict(zip(estimates, row[1:-1], strict=True))
        assert float(got["distinct"]) == hll.estimate(), g
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            assert quantile_value(got[name]) == dd.quantile(q), (g, name)


class CrashAfterInsert:
    """Runs statements, but fails once right after the first chunk insert into ``table``,
    before its progress is recorded: a crash between the two."""

    def __init__(self, store: ClickHouseStore, table: str) -> None:
        self._store, self._table, self.crashed = store, table, False

    def __call__(self, sql: str, params: dict[str, Any], settings: dict[str, Any] | None) -> None:
        self._store._command(sql, params, settings)
        if not self.crashed and sql.startswith(
            f"INSERT INTO {self._store._database}.{self._table}"
        ):
            self.crashed = True
            raise StoreUnavailable("simulated crash after the insert")


@pytest.mark.parametrize("table", ["windows_1m", "rollup_1h", "rollup_1d"])
def test_a_chunk_interrupted_after_its_insert_counts_once(
    store: ClickHouseStore, table: str
) -> None:
    start = day_start(3) + 23 * HOUR_MS
    events = make_events(["a"], start, minutes=120, per_minute=6)
    store.insert_events(events_table(events))
    crash = CrashAfterInsert(store, table)
    crashing = Rollups(store._database, ["region"], crash, store._query)
    with pytest.raises(StoreUnavailable):
        crashing.advance(start + 2 * HOUR_MS)
    assert crash.crashed
    progress = crashing.progress()[table]
    assert progress[1] > progress[0]  # the chunk is recorded as pending

    sealed = store.rollups(["region"]).advance(start + 2 * HOUR_MS)

    bucket = {"windows_1m": MINUTE_MS, "rollup_1h": HOUR_MS, "rollup_1d": DAY_MS}[table]
    assert stored(store, table) == expected(events, bucket, sealed[table])
    assert sealed[table] >= progress[1]


def test_sealed_points_never_go_back_and_late_data_waits(store: ClickHouseStore) -> None:
    rollups = store.rollups([])
    now = int(time.time() * 1000) // MINUTE_MS * MINUTE_MS
    first = rollups.advance(now)  # nothing stored yet: starts at the sealed point
    assert first["windows_1m"] == now
    assert rollups.advance(now - HOUR_MS)["windows_1m"] == now
    store.insert_events(events_table(make_events(["a"], now, minutes=3, per_minute=5)))
    assert stored(store, "windows_1m") == {}
    rollups.advance(now + 2 * MINUTE_MS)
    assert sum(stored(store, "windows_1m").values()) == 10


def test_data_quality_counts_each_sealed_minute(store: ClickHouseStore) -> None:
    start = day_start(1)
    events = make_events(["a"], start, minutes=5, per_minute=8)
    events.append(Event("a", "click", start + 1000, "nan", "", float("nan"), "eu"))
    store.insert_events(events_table(events))
    store.rollups([]).advance(start + 5 * MINUTE_MS)
    _c, rows = store.run_query(
        "SELECT sum(events), sum(empty_entity), sum(non_finite_value), max(max_delay_seconds) "
        f"FROM {store._database}.data_quality_1m WHERE tenant = 'a'",
        {},
    )
    assert rows == [(41, 1, 1, 0.25)]


def test_retention_sets_each_tables_ttl_once(store: ClickHouseStore) -> None:
    retention = Retention(raw_days=7, minute_days=30, hour_days=365, day_days=0)
    changed = store.apply_retention(retention)
    assert set(changed) == {"events", "windows_1m", "data_quality_1m", "rollup_1h"}
    assert store.apply_retention(retention) == []
    _c, rows = store.run_query(
        "SELECT engine_full FROM system.tables WHERE database = {db:String} AND name = 'events'",
        {"db": store._database},
    )
    assert "toIntervalDay(7)" in rows[0][0]
    assert store.apply_retention(Retention(0, 30, 365, 0)) == ["events"]


def _explain(store: ClickHouseStore, sql: str, params: dict[str, Any]) -> str:
    _c, rows = store.run_query(f"EXPLAIN indexes = 1 {sql}", params)
    return "\n".join(str(r[0]) for r in rows)


@pytest.mark.parametrize(
    ("shape", "params"),
    [
        ("series 1m", {"resolution": "1m", "group_by": "region", "where.region": "eu"}),
        ("series 1h", {"resolution": "1h", "metric": "p99"}),
        ("series 1d top", {"resolution": "1d", "group_by": "region", "top": "2"}),
        ("summary", {"resolution": "1h", "group_by": "region"}),
        ("events", {"resolution": "raw", "limit": "10"}),
    ],
)
def test_every_api_query_reads_by_the_primary_key(
    store: ClickHouseStore, shape: str, params: dict[str, str]
) -> None:
    start = day_start(3)
    store.insert_events(events_table(make_events(["a", "b"], start, minutes=90, per_minute=4)))
    sealed_points = store.rollups(["region"]).advance(start + HOUR_MS)
    sealed = Sealed(*(sealed_points[t] for t in ("windows_1m", "rollup_1h", "rollup_1d")))
    span = {"tenant": "a", "type": "click", "from": str(start / 1000)}
    length = {"events": 10 * MINUTE_MS, "series 1m": 20 * HOUR_MS}.get(shape, 2 * DAY_MS)
    span["to"] = str((start + length) / 1000)
    request = parse_series_request({**span, **params}, now_ms=start + 3 * DAY_MS)
    assert not isinstance(request, list), request
    if shape == "events":
        statement = events_statement(request, store._database)
    elif shape == "summary":
        statement = summary_statement(request, sealed, store._database)
    else:
        statement = series_statement(request, sealed, store._database)
    plan = _explain(store, statement.sql, statement.parameters)
    reads = plan.count("ReadFromMergeTree (")  # lazily read columns come after, by key
    assert reads >= 1
    assert plan.count("PrimaryKey") == reads, plan
    for section in plan.split("PrimaryKey")[1:]:
        condition = section.split("Condition:")[1].splitlines()[0]
        assert "tenant in ['a', 'a']" in condition, plan
        assert "type in ['click', 'click']" in condition, plan


def test_a_rebuild_takes_in_events_stored_after_their_minutes_were_sealed(
    store: ClickHouseStore,
) -> None:
    start = day_start(3)
    first = make_events(["a"], start, minutes=60, per_minute=5, seed=1)
    store.insert_events(events_table(first))
    rollups = store.rollups(["region"])
    sealed = rollups.advance(start + 2 * DAY_MS)
    late = [
        Event(e.tenant, e.type, e.ts, "late-" + e.event_id, e.entity, e.value, e.region)
        for e in make_events(["a"], start + 10 * MINUTE_MS, minutes=5, per_minute=7, seed=2)
    ]
    store.insert_events(events_table(late))  # a backfill: its minutes are sealed already
    assert stored(store, "windows_1m") == expected(first, MINUTE_MS, sealed["windows_1m"])

    written = rollups.rebuild(start, start + DAY_MS)
    rollups.rebuild(start, start + DAY_MS)  # a second rebuild changes nothing

    assert written == {"windows_1m": 24, "rollup_1h": 1, "rollup_1d": 1}
    everything = first + late
    for table, bucket in (("windows_1m", MINUTE_MS), ("rollup_1h", HOUR_MS), ("rollup_1d", DAY_MS)):
        assert stored(store, table) == expected(everything, bucket, sealed[table]), table
