"""The query API's limits, over a fake Reader: every statement carries the time, memory
and thread limits; a statement past a limit answers 400 naming it; a tenant past its
concurrent statements answers 429 with Retry-After; ClickHouse's limit errors are told
apart from other refusals."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from adapters.clickhouse import _refusal
from adapters.exceptions import QueryLimitExceeded, QueryRejected, StoreUnavailable
from adapters.query_slots import QuerySlots
from serve_apps.http import Answer
from serve_apps.query_service import QueryLimits, QueryService, Rows

NOW_S = 1_795_000_000.0
SPAN = {"from": str(NOW_S - 600), "to": str(NOW_S)}
LIMITS = QueryLimits(
    database="rl",
    dimensions=("region",),
    max_seconds=7.0,
    max_memory_bytes=300_000_000,
    max_threads=1,
    tenant_concurrency=2,
    sql_max_rows=50,
    sql_max_rows_to_read=1_000,
)


class FakeReader:
    """The Reader interface; records what it ran, can fail or wait."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.settings: list[dict[str, Any]] = []
        self.release = asyncio.Event()
        self.hold = False

    async def run_query(
        self, sql: str, parameters: dict[str, Any], settings: dict[str, Any] | None = None
    ) -> Rows:
        self.settings.append(dict(settings or {}))
        if sql.startswith("SELECT explain"):
            return ["explain"], [("SelectWithUnionQuery",), (" TableIdentifier events",)]
        if self.hold:
            await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return [], []

    async def sealed(self) -> dict[str, int]:
        return {}


def service(reader: FakeReader, limit: int = 2) -> QueryService:
    slots = QuerySlots(None, limit=limit, lease_seconds=LIMITS.max_seconds + 5)
    return QueryService(reader, LIMITS, clock=lambda: NOW_S, slots=slots)


ENDPOINTS: list[tuple[str, Callable[[QueryService], Coroutine[Any, Any, Answer]]]] = [
    ("series", lambda s: s.series("acme", {"type": "click", "resolution": "1m", **SPAN})),
    ("summary", lambda s: s.summary("acme", {"type": "click", "group_by": "region", **SPAN})),
    ("events", lambda s: s.events("acme", {"type": "click", **SPAN})),
    ("sql", lambda s: s.sql("acme", "SELECT count() FROM events")),
]


@pytest.mark.parametrize(("name", "call"), ENDPOINTS)
def test_every_statement_runs_with_the_limits(
    name: str, call: Callable[[QueryService], Coroutine[Any, Any, Answer]]
) -> None:
    reader = FakeReader()
    answer = asyncio.run(call(service(reader)))
    assert answer.status == 200, (name, answer.body)
    assert reader.settings, name
    for settings in reader.settings:
        assert settings["max_execution_time"] == 7.0, name
        assert settings["max_memory_usage"] == 300_000_000, name
        assert settings["max_threads"] == 1, name


def test_sql_adds_its_row_limits_and_tenant_filter() -> None:
    reader = FakeReader()
    asyncio.run(service(reader).sql("acme", "SELECT count() FROM events"))
    statement = reader.settings[-1]
    assert statement["max_result_rows"] == 50
    assert statement["max_rows_to_read"] == 1_000
    assert statement["readonly"] == 1
    assert statement["additional_table_filters"]["rl.events"] == "tenant = 'acme'"


@pytest.mark.parametrize(
    ("limit", "setting", "says"),
    [
        ("time", "query.max_seconds", "time limit of 7 s"),
        ("memory", "query.max_memory_bytes", "memory limit of 300 MB"),
        ("rows_to_read", "query.sql_max_rows_to_read", "read more than 1,000 rows"),
        ("result_rows", "query.sql_max_rows", "add a LIMIT"),
    ],
)
@pytest.mark.parametrize(("name", "call"), ENDPOINTS)
def test_a_statement_past_a_limit_answers_400_naming_it_and_the_fix(
    name: str,
    call: Callable[[QueryService], Coroutine[Any, Any, Answer]],
    limit: str,
    setting: str,
    says: str,
) -> None:
    error = QueryLimitExceeded("Code: 159. DB::Exception: Timeout exceeded", limit)
    answer = asyncio.run(call(service(FakeReader(fail=error))))
    assert answer.status == 400, (name, answer.body)
    assert answer.body["limit"] == setting
    assert setting in answer.body["error"]
    assert says in answer.body["error"]
    if limit != "result_rows":
        assert "narrow it" in answer.body["error"]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (QueryRejected("Code: 62. Syntax error"), 400),
        (QueryLimitExceeded("Code: 1. something new", "another"), 400),
        (StoreUnavailable("gone"), 503),
    ],
)
def test_other_refusals_keep_their_status(error: Exception, status: int) -> None:
    answer = asyncio.run(service(FakeReader(fail=error)).events("acme", {"type": "x", **SPAN}))
    assert answer.status == status
    assert "limit" not in answer.body


def test_a_tenant_past_its_concurrent_statements_gets_429_and_others_do_not() -> None:
    async def run() -> None:
        reader = FakeReader()
        reader.hold = True
        svc = service(reader, limit=2)
        ask = lambda t: svc.events(t, {"type": "click", **SPAN})  # noqa: E731
        running = [asyncio.create_task(ask("acme")) for _ in range(2)]
        await asyncio.sleep(0.01)
        refused = await ask("acme")
        assert refused.status == 429
        assert refused.headers["Retry-After"] == "1"
        assert refused.body["limit"] == "query.tenant_concurrency"
        assert "has 2 queries running" in refused.body["error"]
        other = asyncio.create_task(ask("globex"))  # another tenant has slots of its own
        await asyncio.sleep(0.01)
        assert not other.done()
        reader.release.set()
        assert [a.status for a in await asyncio.gather(*running, other)] == [200, 200, 200]
        assert (await ask("acme")).status == 200, "finished statements give their slots back"

    asyncio.run(run())


def test_a_caller_gone_mid_statement_leaves_its_slot_to_the_lease() -> None:
    async def run() -> None:
        reader = FakeReader()
        reader.hold = True
        svc = service(reader, limit=1)
        waiting = asyncio.create_task(svc.events("acme", {"type": "click", **SPAN}))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        reader.hold = False
        again = await svc.events("acme", {"type": "click", **SPAN})
        assert again.status == 429, "ClickHouse may still run it: the slot stays taken"

    asyncio.run(run())


@pytest.mark.parametrize(
    ("code", "message", "kind", "limit"),
    [
        (159, "Code: 159. DB::Exception: Timeout exceeded: elapsed 10000 ms", "limit", "time"),
        (241, "Code: 241. DB::Exception: Query memory limit exceeded", "limit", "memory"),
        (241, "Code: 241. DB::Exception: Memory limit (total) exceeded: would use", "down", ""),
        (158, "Code: 158. DB::Exception: Limit for rows (controlled by 'max_rows_to_read'", "limit",
         "rows_to_read"),
        (396, "Code: 396. DB::Exception: Limit for result exceeded, max rows: 10", "limit",
         "result_rows"),
        (62, "Code: 62. DB::Exception: Syntax error: failed at position 8", "rejected", ""),
        (None, "something without a code", "rejected", ""),
    ],
)  # fmt: skip
def test_clickhouse_limit_errors_are_told_apart(
    code: int | None, message: str, kind: str, limit: str
) -> None:
    error = _refusal(DatabaseError(message, code=code))
    if kind == "down":
        assert isinstance(error, StoreUnavailable)
        assert "short of memory" in str(error)
    elif kind == "limit":
        assert isinstance(error, QueryLimitExceeded)
        assert error.limit == limit
    else:
        assert type(error) is QueryRejected
    assert message[:24] in str(error), "ClickHouse's reason is kept"
