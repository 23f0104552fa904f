"""The query API's cache path, over a fake Reader and an in-memory cache with the real
interface: a final answer is computed once and then answered from the cache as the
same bytes, before any parsing and without a statement; the key is the request as
sent (any parameter order) and its tenant; answers reaching past the sealed point, or
without an end, are never cached; the sealed point is refreshed off the request path."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from adapters.query_cache import KEY_PREFIX, Lookup, request_digest
from core.query_sql import METRIC_SQL
from core.sketch_states import QUANTILE_NAMES
from serve_apps import query_service
from serve_apps.http import Answer
from serve_apps.query_service import QueryLimits, QueryService, Rows

NOW_S = 1_795_000_020.0  # on a minute
SEALED_MS = int(NOW_S - 3600) * 1000  # the aggregates are final up to an hour ago
LIMITS = QueryLimits(database="rl", dimensions=("region",))
# One group's metrics in their stored forms: numbers, and a quantile as (sign, bucket).
SUMMARY_ROW = tuple((1, 3) if m in QUANTILE_NAMES else i for i, m in enumerate(METRIC_SQL))
BEFORE = {"type": "click", "resolution": "1m", "from": str(NOW_S - 7200), "to": str(NOW_S - 3600)}


class CountingReader:
    """The Reader interface: one bucket per statement; counts statements and sealed reads."""

    def __init__(self) -> None:
        self.statements = 0
        self.sealed_reads = 0
        self.sealed_ms = SEALED_MS

    async def run_query(
        self, sql: str, parameters: dict[str, Any], settings: dict[str, Any] | None = None
    ) -> Rows:
        self.statements += 1
        if " AS t," in sql:  # a series: one bucket
            return ["t", "value"], [(SEALED_MS - 60_000, 7)]
        return list(METRIC_SQL), [SUMMARY_ROW]  # a summary: one group

    async def sealed(self) -> dict[str, int]:
        self.sealed_reads += 1
        return dict.fromkeys(("windows_1m", "rollup_1h", "rollup_1d"), self.sealed_ms)


class MemoryCache:
    """The AnswerCache interface in a dict (the generation stays 0)."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}
        self.lookups = 0
        self.last_error: str | None = None

    @property
    def enabled(self) -> bool:
        return True

    async def lookup(self, digest: str) -> Lookup:
        self.lookups += 1
        key = f"{KEY_PREFIX}0:{digest}"
        return Lookup(key, self.entries.get(key))

    async def put(self, key: str | None, answer: bytes) -> None:
        assert key is not None
        self.entries[key] = answer


def ask(service: QueryService, *calls: tuple[str, str, dict[str, str]]) -> list[Answer]:
    """Run the calls one after the other in one event loop (as a replica does)."""

    async def run() -> list[Answer]:
        answers = []
        for endpoint, tenant, params in calls:
            answers.append(await getattr(service, endpoint)(tenant, params))
            await asyncio.sleep(0)  # let the background put land
        return answers

    return asyncio.run(run())


def make() -> tuple[QueryService, CountingReader, MemoryCache]:
    reader, cache = CountingReader(), MemoryCache()
    return QueryService(reader, LIMITS, cache, clock=lambda: NOW_S), reader, cache


@pytest.mark.parametrize("endpoint", ["series", "summary"])
def test_a_final_answer_is_computed_once_then_sent_from_the_cache_as_is(endpoint: str) -> None:
    service, reader, _cache = make()
    reordered = dict(reversed(list(BEFORE.items())))
    first, second = ask(service, (endpoint, "acme", BEFORE), (endpoint, "acme", reordered))
    assert (first.status, second.status) == (200, 200)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("miss", "hit")
    assert reader.statements == 1
    assert isinstance(second.body, bytes)
    assert second.body == first.body
    assert orjson.loads(second.body)["tenant"] == "acme"
    # The replica's time, per hop: a miss went to the engine, a hit did not.
    assert "engine;dur=" in first.headers["Server-Timing"]
    assert second.headers["Server-Timing"].startswith("query;dur=")
    assert "engine" not in second.headers["Server-Timing"]


def test_another_tenant_never_gets_a_cached_answer_of_the_first() -> None:
    service, reader, _cache = make()
    _first, other = ask(service, ("series", "acme", BEFORE), ("series", "globex", BEFORE))
    assert other.headers["X-Cache"] == "miss"
    assert reader.statements == 2
    assert orjson.loads(other.body)["tenant"] == "globex"
    assert request_digest("acme", "series", BEFORE) != request_digest("globex", "series", BEFORE)


def test_an_answer_reaching_past_the_sealed_point_is_not_cached() -> None:
    service, reader, cache = make()
    live = {**BEFORE, "to": str(NOW_S)}
    first, second = ask(service, ("series", "acme", live), ("series", "acme", live))
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("bypass", "bypass")
    assert reader.statements == 2
    assert not cache.entries
    assert isinstance(first.body, dict)  # encoded once, by the response


def test_a_request_without_an_end_does_not_ask_the_cache() -> None:
    service, _reader, cache = make()
    open_ended = {k: v for k, v in BEFORE.items() if k != "to"}
    (answer,) = ask(service, ("series", "acme", open_ended))
    assert answer.status == 200
    assert answer.headers["X-Cache"] == "bypass"
    assert cache.lookups == 0


def test_errors_are_not_cached() -> None:
    service, _reader, cache = make()
    wrong = {**BEFORE, "metric": "p42"}
    first, second = ask(service, ("series", "acme", wrong), ("series", "acme", wrong))
    assert (first.status, second.status) == (422, 422)
    assert not cache.entries


def test_the_sealed_point_is_refreshed_in_the_background(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(query_service.time, "monotonic", lambda: now[0])
    service, reader, _cache = make()

    async def run() -> list[int]:
        first = await service.sealed()
        reader.sealed_ms += 60_000
        now[0] += 0.5
        within = await service.sealed()  # reused: no read
        now[0] += 1.0
        stale = await service.sealed()  # the old value at once, a refresh started
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        refreshed = await service.sealed()
        fresh = await service.sealed(fresh=True)
        return [first.minute, within.minute, stale.minute, refreshed.minute, fresh.minute]

    minutes = asyncio.run(run())
    assert minutes == [SEALED_MS, SEALED_MS, SEALED_MS, SEALED_MS + 60_000, SEALED_MS + 60_000]
    assert reader.sealed_reads == 3
