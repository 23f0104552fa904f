"""The query API's logic on the real ClickHouse engine (chDB in this process): series at
every resolution across sealed and unsealed parts, summaries and top-N, raw paging, the
SQL guard, and a cache that is bypassed while Redis is down."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters.clickhouse import ClickHouseStore
from adapters.query_cache import QueryCache, bump_generation
from cluster.settings import Settings
from core.sql_guard import guarded_settings
from serve_apps.http import Answer
from serve_apps.query_service import QueryLimits, QueryService, Rows
from tests.integration.query_data import MINUTE_MS, Event, events_table, make_events

HOUR_MS = 3_600_000


class StoreReader:
    """The Reader over a store in this process (the owner actor's methods)."""

    def __init__(self, store: ClickHouseStore) -> None:
        self.store = store

    async def run_query(
        self, sql: str, parameters: dict[str, Any], settings: dict[str, Any] | None = None
    ) -> Rows:
        return self.store.run_query(sql, parameters, settings)

    async def sealed(self) -> dict[str, int]:
        return {t: done for t, (done, _p) in self.store.rollups([]).progress().items()}


class Data:
    def __init__(self, store: ClickHouseStore, events: list[Event], start: int, sealed: int):
        self.store, self.events, self.start, self.sealed = store, events, start, sealed


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Data]:
    folder: Path = tmp_path_factory.mktemp("chdb")
    store = ClickHouseStore(f"chdb://{folder}", f"q_{uuid.uuid4().hex[:8]}")
    store.migrate()
    now = int(time.time() * 1000)
    start = (now - 26 * HOUR_MS) // HOUR_MS * HOUR_MS
    events = make_events(["a", "b"], start, minutes=25 * 60, per_minute=3)
    store.insert_events(events_table(events))
    sealed = start + 23 * HOUR_MS + 17 * MINUTE_MS  # the last 1h43m only in raw events
    store.rollups(["region"]).advance(sealed)
    yield Data(store, events, start, sealed)
    store.close()


def service(data: Data, cache: QueryCache | None = None) -> QueryService:
    limits = QueryLimits(database=data.store._database, dimensions=("region",))
    return QueryService(StoreReader(data.store), limits, cache)


def ask(coro: Any) -> Answer:
    answer: Answer = asyncio.run(coro)
    return answer


def span(data: Data, hours: float, offset_hours: float = 0) -> dict[str, str]:
    start = data.start + int(offset_hours * HOUR_MS)
    return {"from": str(start / 1000), "to": str((start + int(hours * HOUR_MS)) / 1000)}


def truth(data: Data, tenant: str, type_: str, lo: int, hi: int, bucket: int) -> Counter[Any]:
    return Counter(
        (e.ts // bucket * bucket, e.region)
        for e in data.events
        if e.tenant == tenant and e.type == type_ and lo <= e.ts < hi
    )


@pytest.mark.parametrize(("resolution", "bucket"), [("1m", MINUTE_MS), ("1h", HOUR_MS)])
def test_a_series_covers_sealed_and_unsealed_parts_exactly(
    data: Data, resolution: str, bucket: int
) -> None:
    hours = 25 if resolution == "1h" else 3
    offset = 0 if resolution == "1h" else 22
    params = {
        "type": "click",
        "resolution": resolution,
        "group_by": "region",
        **span(data, hours, offset),
    }
    answer = ask(service(data).series("a", params))
    assert answer.status == 200, answer.body
    got = Counter(
        {(t, s["group"]["region"]): v for s in answer.body["series"] for t, v in s["points"]}
    )
    lo = data.start + int(offset * HOUR_MS)
    assert got == truth(data, "a", "click", lo, lo + hours * HOUR_MS, bucket)
    assert answer.body["resolution"] == resolution


def test_auto_resolution_picks_the_finest_that_fits(data: Data) -> None:
    answer = ask(service(data).series("a", {"type": "view", **span(data, 25)}))
    assert answer.body["resolution"] == "1m"  # 1,500 minutes fit in max_points
    answer = ask(service(data).series("a", {"type": "view", **span(data, 26)}))
    assert answer.body["resolution"] == "1h"


def test_summary_and_top_n_agree_with_the_events(data: Data) -> None:
    params = {"type": "click", "group_by": "region", **span(data, 25)}
    answer = ask(service(data).summary("a", params))
    assert answer.status == 200, answer.body
    by_region = Counter(e.region for e in data.events if e.tenant == "a" and e.type == "click")
    got = {g["group"]["region"]: g["count"] for g in answer.body["groups"]}
    assert got == dict(by_region)
    entities = {e.entity for e in data.events if e.tenant == "a" and e.type == "click"}
    assert sum(g["distinct"] for g in answer.body["groups"]) >= len(entities)
    top = ask(service(data).summary("a", {**params, "top": "1"}))
    assert [g["group"]["region"] for g in top.body["groups"]] == [by_region.most_common(1)[0][0]]


def test_raw_events_page_through_every_event_once(data: Data) -> None:
    params = {"type": "view", "limit": "7", **span(data, 0.25, 24)}
    seen: list[str] = []
    while True:
        answer = ask(service(data).events("a", params))
        assert answer.status == 200, answer.body
        seen += [e["event_id"] for e in answer.body["events"]]
        if answer.body["next_cursor"] is None:
            break
        params["cursor"] = answer.body["next_cursor"]
    lo = data.start + 24 * HOUR_MS
    wanted = sorted(
        (e.ts, e.event_id)
        for e in data.events
        if e.tenant == "a" and e.type == "view" and lo <= e.ts < lo + HOUR_MS // 4
    )
    assert seen == [event_id for _ts, event_id in wanted]


def test_a_filter_on_a_non_dimension_names_the_fix(data: Data) -> None:
    answer = ask(service(data).series("a", {"type": "click", "group_by": "plan", **span(data, 3)}))
    assert answer.status == 422
    assert "clickhouse.dimensions" in answer.body["errors"][0]["message"]


@pytest.mark.parametrize(
    ("sql", "status", "says"),
    [
        ("SELECT count() FROM system.tables", 400, "system.tables"),
        ("SELECT * FROM url('http://127.0.0.1:1/x', CSV, 'a String')", 400, "url"),
        ("SELECT * FROM numbers(10)", 400, "numbers"),
        ("SELECT dictGet('d', 'a', 1) FROM events", 400, "dictGet"),
        ("INSERT INTO events (tenant) VALUES ('x')", 400, "only a SELECT"),
        ("DROP TABLE events", 400, "only a SELECT"),
        ("SELECT 1; DROP TABLE events", 400, "exactly one statement"),
        ("SELECT count() FROM events SETTINGS readonly = 0", 400, "SETTINGS"),
        ("SELECT * FROM events, events, events", 400, "query.sql_max_rows"),
        ("SELECT 1 INTO OUTFILE '/tmp/x'", 400, "could not be parsed"),
        ("", 400, "empty"),
    ],
)
def test_the_sql_guard_refuses_what_could_leak_or_write(
    data: Data, sql: str, status: int, says: str
) -> None:
    answer = ask(service(data).sql("a", sql))
    assert answer.status == status, answer.body
    assert says in answer.body["error"]


def test_sql_sees_only_the_callers_rows_whatever_it_asks(data: Data) -> None:
    db = data.store._database
    for sql in (
        "SELECT tenant, count() FROM events GROUP BY tenant",
        f"SELECT tenant, count() FROM {db}.events WHERE tenant = 'b' OR 1 = 1 GROUP BY tenant",
        "SELECT tenant, sum(events) FROM (SELECT * FROM rollup_1h) GROUP BY tenant",
        # windows_1m: rollup_1d holds no day when the data's 23 sealed hours straddle
        # midnight (a run between 02:00 and 03:00 UTC), and an empty join proves nothing
        "SELECT e.tenant, count() FROM events AS e JOIN windows_1m AS w "
        "ON e.tenant = w.tenant AND e.type = w.type GROUP BY e.tenant",
    ):
        answer = ask(service(data).sql("a", sql))
        assert answer.status == 200, (sql, answer.body)
        assert {row[0] for row in answer.body["rows"]} == {"a"}, sql


ORDINARY_SQL = [
    "SELECT count(), uniq(entity), quantile(0.99)(value) FROM events WHERE type = 'click' "
    "AND ts >= fromUnixTimestamp64Milli(0) AND ts < now()",
    "SELECT type, count() FROM events GROUP BY type ORDER BY type",
    "SELECT toStartOfHour(ts) AS h, countIf(type = 'click') FROM events GROUP BY h LIMIT 3",
    "SELECT tenant, sum(events), sum(value_dd_zero) FROM rollup_1h GROUP BY tenant",
    "SELECT length(range(toUInt64(10))) FROM events LIMIT 1",
    "SELECT sum(sleepEachRow(0)) FROM events",
    "WITH recent AS (SELECT * FROM events WHERE ts > now() - INTERVAL 30 DAY) "
    "SELECT tenant, count() FROM recent GROUP BY tenant",
    "SELECT tenant, if(count() > 0, 'some', 'none') FROM events "
    "WHERE entity IN (SELECT entity FROM events LIMIT 5) GROUP BY tenant",
    "SELECT tenant FROM rollup_1h UNION ALL SELECT tenant FROM windows_1m",
    "SELECT 'a\\' -- ', tenant /* c */ FROM events # hash comment\n LIMIT 1",
    "SELECT tenant, 'é☃' FROM events LIMIT 1",
    "SELECT tenant, count() FROM events GROUP BY tenant -- trailing",
    "SELECT tenant, count() FROM events GROUP BY tenant # ClickHouse itself refuses '#'",
]


def test_the_engine_filters_tenants_even_without_the_parser(data: Data) -> None:
    db = data.store._database
    settings = dict(guarded_settings("a", db, max_seconds=5, max_rows=100, max_rows_to_read=10**7))
    for sql in (
        "SELECT tenant, count() FROM events GROUP BY tenant",
        f"SELECT tenant, count() FROM {db}.rollup_1h WHERE tenant = 'b' GROUP BY tenant",
        "SELECT tenant FROM (SELECT tenant FROM windows_1m) GROUP BY tenant",
    ):
        _columns, rows = data.store.run_query(sql, {}, settings)
        assert {row[0] for row in rows} <= {"a"}, sql
    _columns, everyone = data.store.run_query(
        "SELECT DISTINCT tenant FROM events ORDER BY tenant", {}, None
    )
    assert everyone == [("a",), ("b",)], "b's rows exist: the filter hid them"


@pytest.mark.parametrize("sql", ORDINARY_SQL)
def test_ordinary_selects_run_and_see_only_the_callers_rows(data: Data, sql: str) -> None:
    answer = ask(service(data).sql("a", sql))
    assert answer.status == 200, (sql, answer.body)
    assert answer.body["rows"], sql
    assert "b" not in [cell for row in answer.body["rows"] for cell in row], sql


def test_sql_over_the_result_bytes_limit_answers_400_naming_it(data: Data) -> None:
    limits = QueryLimits(database=data.store._database, sql_max_result_bytes=1_000)
    sql = "SELECT event_id, source, entity FROM events LIMIT 1000"
    answer = ask(QueryService(StoreReader(data.store), limits).sql("a", sql))
    assert answer.status == 400, answer.body
    assert answer.body["limit"] == "query.sql_max_result_bytes"


def test_with_redis_down_answers_come_from_clickhouse_and_say_so(data: Data) -> None:
    cache = QueryCache("redis://127.0.0.1:9/0", ttl_seconds=60)  # nothing listens on 9
    params = {"type": "click", "resolution": "1h", **span(data, 20)}
    answer = ask(service(data, cache).series("a", params))
    assert answer.status == 200
    assert answer.headers["X-Cache"] == "bypass"
    assert not cache.healthy
    assert "cache bypassed" in (cache.last_error or "")


def test_a_sealed_answer_comes_back_from_redis_as_sent_until_the_rollups_move(
    data: Data, services: Settings
) -> None:
    url = services.redis.url()
    assert url is not None
    cache = QueryCache(url, ttl_seconds=60)
    query = service(data, cache)
    # A filter value of its own, so that no earlier run left this answer in Redis.
    params = {"type": "click", "resolution": "1h", "group_by": "region", **span(data, 20)}
    params["where.region"] = f"nowhere-{uuid.uuid4().hex[:8]}"

    async def run() -> list[Answer]:
        first = await query.series("a", params)
        await asyncio.sleep(0.2)  # the put runs in the background
        second = await query.series("a", dict(reversed(list(params.items()))))
        bump_generation(url)  # what the rollups do after writing a chunk
        third = await query.series("a", params)
        await query.drain()
        await cache.close()
        return [first, second, third]

    first, second, third = asyncio.run(run())
    assert [a.headers["X-Cache"] for a in (first, second, third)] == ["miss", "hit", "miss"]
    assert isinstance(second.body, bytes)
    assert second.body == first.body
    assert orjson.loads(second.body)["tenant"] == "a"
    assert cache.healthy
