"""What the query API does with a checked tenant and its parameters, without Ray Serve.

The Serve app (``serve_apps.query``) resolves the caller's tenant from its API key
and hands the parameters here; ClickHouse is reached through an injected ``Reader``
(the owner actor in production, an in-process store in tests). Every answer is an
:class:`Answer`: a status, a JSON body, and headers.

Every statement runs with the limits of :class:`QueryLimits` (time, memory, threads;
rows too for ``/sql``) and inside one of its tenant's slots (``tenant_concurrency``
at once, shared by the replicas through Redis): a tenant over its slots gets 429 with
``Retry-After``, a statement over a limit 400 naming the limit and how to narrow it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import orjson

from adapters.exceptions import QueryLimitExceeded, QueryRejected, StoreUnavailable
from adapters.query_cache import BYPASSED, Lookup, request_digest
from adapters.query_slots import Slot
from core.envelope import FieldError
from core.query_plan import MINUTE, RAW, SeriesRequest, encode_cursor, parse_series_request
from core.query_slots import SlotVerdict
from core.query_sql import (
    METRIC_SQL,
    Sealed,
    events_statement,
    series_statement,
    summary_statement,
)
from core.sketch_states import answer_value
from core.sql_guard import SqlRefused, check, guarded_settings
from serve_apps.http import Answer

Rows = tuple[list[str], list[tuple[Any, ...]]]
log = logging.getLogger(__name__)
_spent: contextvars.ContextVar[dict[str, float]] = contextvars.ContextVar("query_spent")
"""Per request (each runs in a task of its own): seconds spent per hop, for Server-Timing."""
T = TypeVar("T")
NARROW = (
    "narrow it: a shorter time range (from/to), a coarser resolution (1h or 1d), fewer "
    "group_by dimensions, or a filter on a dimension; in SQL, read the aggregate tables "
    "(windows_1m, rollup_1h, rollup_1d) rather than raw events, and join less"
)


class Reader(Protocol):
    """Reads of ClickHouse the query API needs (the owner actor's methods)."""

    def run_query(
        self, sql: str, parameters: dict[str, Any], settings: dict[str, Any] | None = None
    ) -> Awaitable[Rows]: ...

    def sealed(self) -> Awaitable[dict[str, int]]: ...


class AnswerCache(Protocol):
    """Cached answers (``adapters.query_cache.QueryCache``)."""

    last_error: str | None

    @property
    def enabled(self) -> bool: ...

    async def lookup(self, digest: str) -> Lookup: ...

    async def put(self, key: str | None, answer: bytes) -> None: ...


class Slots(Protocol):
    """Per-tenant statement slots (``adapters.query_slots.QuerySlots``)."""

    async def take(self, tenant: str) -> Slot: ...

    async def give_back(self, slot: Slot) -> None: ...


@dataclass(frozen=True, slots=True)
class QueryLimits:
    """What one statement of the query API may take (the ``query.*`` settings)."""

    database: str
    dimensions: tuple[str, ...] = ()
    max_points: int = 1500
    max_seconds: float = 10.0
    max_memory_bytes: int = 2_000_000_000
    max_threads: int = 1
    """0: ClickHouse's default (one per core)."""
    tenant_concurrency: int = 4
    sql_max_rows: int = 10_000
    sql_max_rows_to_read: int = 500_000_000
    sql_max_result_bytes: int = 64_000_000

    def statement_settings(self) -> dict[str, Any]:
        """The ClickHouse settings every statement of the query API runs with."""
        settings: dict[str, Any] = {
            "max_execution_time": self.max_seconds,
            "max_memory_usage": self.max_memory_bytes,
        }
        if self.max_threads:
            settings["max_threads"] = self.max_threads
        return settings

    def refusal(self, exc: QueryLimitExceeded) -> Answer:
        """400 naming the limit a statement ran into, and how to stay under it."""
        limits = {
            "time": (f"ran longer than its time limit of {self.max_seconds:g} s", "max_seconds"),
            "memory": (
                f"needed more than its memory limit of {self.max_memory_bytes / 1e6:,.0f} MB",
                "max_memory_bytes",
            ),
            "rows_to_read": (
                f"would read more than {self.sql_max_rows_to_read:,} rows",
                "sql_max_rows_to_read",
            ),
            "result_rows": (
                f"would answer more than {self.sql_max_rows:,} rows",
                "sql_max_rows",
            ),
            "result_bytes": (
                f"would answer more than {self.sql_max_result_bytes:,} bytes",
                "sql_max_result_bytes",
            ),
        }
        if exc.limit not in limits:
            return Answer.error(400, f"ClickHouse refused the query: {exc}")
        what, name = limits[exc.limit]
        advice = (
            "add a LIMIT, or aggregate (GROUP BY) so that fewer rows come back"
            if exc.limit in ("result_rows", "result_bytes")
            else NARROW
        )
        return Answer.error(
            400, f"the query {what} (query.{name}): {advice}", limit=f"query.{name}"
        )


def too_many_running(tenant: str, verdict: SlotVerdict) -> Answer:
    """429: the tenant has as many statements running as it may."""
    return Answer.error(
        429,
        f"tenant {tenant!r} has {verdict.running} queries running, the most it may at once "
        f"(query.tenant_concurrency = {verdict.limit}): retry when one has answered, or "
        "narrow the queries so that they finish sooner",
        retry_after=1,
        limit="query.tenant_concurrency",
    )


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and value != value:  # NaN: JSON has none
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class QueryService:
    """The endpoints' logic over a Reader, a cache and the limits."""

    def __init__(
        self,
        reader: Reader,
        limits: QueryLimits,
        cache: AnswerCache | None = None,
        clock: Callable[[], float] = time.time,
        slots: Slots | None = None,
    ) -> None:
        self._reader = reader
        self._limits = limits
        self._cache = cache
        self._clock = clock
        self._slots = slots
        self._sealed: tuple[float, Sealed] | None = None
        self._sealed_refresh: asyncio.Task[None] | None = None
        self._puts: set[asyncio.Task[None]] = set()
        # What shapes an answer besides the request: part of every cache key.
        self._scope = f"{limits.database}|{','.join(limits.dimensions)}|{limits.max_points}"

    @property
    def cache(self) -> AnswerCache | None:
        return self._cache

    async def drain(self) -> None:
        """Wait for the cache puts running in the background (before the cache is
        closed: a put that meets a closed connection is lost and marks Redis down)."""
        if self._puts:
            await asyncio.wait(set(self._puts), timeout=5)

    async def sealed(self, fresh: bool = False) -> Sealed:
        """Where the aggregate tables are final.

        Read once (or whenever ``fresh``), then refreshed in the background at most
        once a second while requests come: a request does not wait for the owner
        actor's answer after the first. An older value only moves more of the range to
        the raw part and caches less, which is as right, just slower.

        Raises:
            StoreUnavailable: the owner did not answer a read this call waited for.
        """
        now = time.monotonic()
        if self._sealed is None or fresh:
            return await self._read_sealed(now)
        if now - self._sealed[0] >= 1.0 and self._sealed_refresh is None:
            self._sealed_refresh = asyncio.create_task(self._refresh_sealed(now))
        return self._sealed[1]

    async def _read_sealed(self, now: float) -> Sealed:
        points = await self._reader.sealed()
        value = Sealed(
            points.get("windows_1m", 0), points.get("rollup_1h", 0), points.get("rollup_1d", 0)
        )
        self._sealed = (now, value)
        return value

    async def _refresh_sealed(self, now: float) -> None:
        try:
            await self._read_sealed(now)
        except StoreUnavailable as exc:  # the last value stays; the next request retries
            log.warning("sealed points not refreshed: %s", exc)
        finally:
            self._sealed_refresh = None

    def _request(self, tenant: str, params: Mapping[str, str]) -> SeriesRequest | Answer:
        given = dict(params)
        given["tenant"] = tenant
        parsed = parse_series_request(
            given, now_ms=int(self._clock() * 1000), max_points=self._limits.max_points
        )
        if isinstance(parsed, list):
            return Answer.error(422, "invalid query parameters", parsed)
        if parsed.resolution == RAW:
            return parsed
        return self._dimension_problem(parsed) or parsed

    def _dimension_problem(self, request: SeriesRequest) -> Answer | None:
        """Aggregates are grouped by the configured dimensions only."""
        dims = self._limits.dimensions
        named = (*request.group_by, *(name for name, _ in request.filters))
        unknown = [name for name in named if name not in dims]
        if not unknown:
            return None
        shown = ", ".join(repr(n) for n in unknown)
        message = (
            f"{shown} not among the aggregate dimensions {list(dims)}: group or filter "
            "by those, use resolution=raw over at most 15 minutes, or add the attribute "
            "to clickhouse.dimensions"
        )
        return Answer.error(
            422, "invalid query parameters", [FieldError(None, "group_by", message)]
        )

    async def guarded(self, tenant: str, read: Callable[[], Awaitable[T]]) -> T | Answer:
        """Run one ClickHouse read of ``tenant`` in one of its slots; errors as answers.

        A caller that goes away mid-read leaves its slot taken: the statement runs on in
        ClickHouse until it ends or its time limit stops it, and the slot's lease (the
        time limit and a margin) frees it then.
        """
        with _timed("slots"):
            slot = await self._slots.take(tenant) if self._slots is not None else None
        if slot is not None and not slot.verdict.granted:
            return too_many_running(tenant, slot.verdict)
        try:
            with _timed("engine"):
                return await read()
        except asyncio.CancelledError:
            slot = None
            raise
        except QueryLimitExceeded as exc:
            return self._limits.refusal(exc)
        except QueryRejected as exc:
            return Answer.error(400, f"ClickHouse refused the query: {exc}")
        except StoreUnavailable as exc:
            return Answer.error(503, f"ClickHouse is unavailable: {exc}", retry_after=5)
        finally:
            if slot is not None and self._slots is not None:
                await self._slots.give_back(slot)

    async def _read(
        self,
        tenant: str,
        sql: str,
        params: dict[str, Any],
        settings: Mapping[str, Any] | None = None,
    ) -> Rows | Answer:
        limited = {**self._limits.statement_settings(), **(settings or {})}
        return await self.guarded(tenant, lambda: self._reader.run_query(sql, params, limited))

    async def cached(self, tenant: str, endpoint: str, params: Mapping[str, str]) -> Lookup:
        """Look ``endpoint``'s answer to these parameters up in the cache, before any
        parsing: a hit is the whole answer (one Redis round trip, bytes as sent)."""
        if self._cache is None or "to" not in params:  # no end: reaches now, never sealed
            return BYPASSED
        return await self._cache.lookup(request_digest(tenant, endpoint, params, self._scope))

    async def _answer(
        self,
        lookup: Lookup,
        request: SeriesRequest,
        sealed: Sealed,
        compute: Callable[[], Awaitable[Answer]],
    ) -> Answer:
        """The computed answer; put in the cache (in the background) when final."""
        answer = await compute()
        cacheable = request.bucket_bounds()[1] <= sealed.minute
        stored = cacheable and lookup.key is not None and self._cache is not None
        if answer.status == 200 and stored and self._cache is not None:
            answer.body = orjson.dumps(answer.body, option=orjson.OPT_SERIALIZE_NUMPY)
            put = asyncio.create_task(self._cache.put(lookup.key, answer.body))
            self._puts.add(put)  # held until done: the loop keeps only weak references
            put.add_done_callback(self._puts.discard)
        answer.headers["X-Cache"] = "miss" if stored else "bypass"
        return answer

    async def _through_cache(
        self,
        tenant: str,
        endpoint: str,
        params: Mapping[str, str],
        uncached: Callable[[str, Mapping[str, str], Lookup], Awaitable[Answer]],
    ) -> Answer:
        """The cached answer when there is one, else ``uncached``'s; timed either way."""
        started = time.perf_counter()
        _spent.set({})
        with _timed("cache"):
            lookup = await self.cached(tenant, endpoint, params)
        if lookup.answer is not None:
            return Answer(200, lookup.answer, {"X-Cache": "hit", **_took(started)})
        answer = await uncached(tenant, params, lookup)
        answer.headers.update(_took(started))
        return answer

    async def series(self, tenant: str, params: Mapping[str, str]) -> Answer:
        """A metric's time series (``GET /series``)."""
        return await self._through_cache(tenant, "series", params, self._series)

    async def _series(self, tenant: str, params: Mapping[str, str], lookup: Lookup) -> Answer:
        request = self._request(tenant, params)
        if isinstance(request, Answer):
            return request
        if request.resolution == RAW:
            return await self.events(tenant, params, request)
        sealed = await self.sealed()

        async def compute() -> Answer:
            statement = series_statement(request, sealed, self._limits.database)
            rows = await self._read(request.tenant, statement.sql, statement.parameters)
            if isinstance(rows, Answer):
                return rows
            return Answer(200, _series_body(request, sealed, rows))

        return await self._answer(lookup, request, sealed, compute)

    async def summary(self, tenant: str, params: Mapping[str, str]) -> Answer:
        """Every metric over a range, per group (``GET /summary`` and ``/top``)."""
        return await self._through_cache(tenant, "summary", params, self._summary)

    async def _summary(self, tenant: str, params: Mapping[str, str], lookup: Lookup) -> Answer:
        if params.get("resolution") == RAW:
            wrong = FieldError(None, "resolution", "a summary reads aggregates: 1m, 1h or 1d")
            return Answer.error(422, "invalid query parameters", [wrong])
        request = self._request(tenant, params)
        if isinstance(request, Answer):
            return request
        if request.resolution == RAW:  # auto over a short range: minutes are as exact
            request = replace(request, resolution=MINUTE)
            problem = self._dimension_problem(request)
            if problem is not None:
                return problem
        sealed = await self.sealed()

        async def compute() -> Answer:
            statement = summary_statement(request, sealed, self._limits.database)
            rows = await self._read(request.tenant, statement.sql, statement.parameters)
            if isinstance(rows, Answer):
                return rows
            return Answer(200, _summary_body(request, rows))

        return await self._answer(lookup, request, sealed, compute)

    async def events(
        self, tenant: str, params: Mapping[str, str], request: SeriesRequest | None = None
    ) -> Answer:
        if request is None:
            if params.get("resolution", RAW) != RAW:
                wrong = FieldError(None, "resolution", "events are raw: leave resolution out")
                return Answer.error(422, "invalid query parameters", [wrong])
            parsed = self._request(tenant, {**params, "resolution": RAW})
            if isinstance(parsed, Answer):
                return parsed
            request = parsed
        statement = events_statement(request, self._limits.database)
        rows = await self._read(request.tenant, statement.sql, statement.parameters)
        if isinstance(rows, Answer):
            return rows
        _columns, found = rows
        page = found[: request.limit]
        cursor = None
        if len(found) > request.limit:
            last = page[-1]
            cursor = encode_cursor(int(last[0]), str(last[1]))
        events = [
            {
                "ts": iso(int(r[0])),
                "event_id": r[1],
                "source": r[2],
                "entity": r[3],
                "value": _json_value(r[4]),
                "attributes": _json_value(r[5]),
            }
            for r in page
        ]
        return Answer(
            200,
            {
                "tenant": request.tenant,
                "type": request.type,
                "from": iso(request.from_ms),
                "to": iso(request.to_ms),
                "events": events,
                "next_cursor": cursor,
            },
        )

    async def sql(self, tenant: str, statement: Any) -> Answer:
        if not isinstance(statement, str):
            return Answer.error(422, 'expected a JSON body {"sql": "SELECT ..."}')
        limits = self._limits
        try:
            checked = check(statement, limits.database)
        except SqlRefused as exc:
            return Answer.error(400, str(exc))
        settings = guarded_settings(
            tenant,
            limits.database,
            max_seconds=limits.max_seconds,
            max_rows=limits.sql_max_rows,
            max_rows_to_read=limits.sql_max_rows_to_read,
            max_memory_bytes=limits.max_memory_bytes,
            max_result_bytes=limits.sql_max_result_bytes,
        )
        rows = await self._read(tenant, checked.sql, {}, settings)
        if isinstance(rows, Answer):
            return rows
        columns, found = rows
        return Answer(200, {"columns": columns, "rows": [_json_value(list(r)) for r in found]})


@contextmanager
def _timed(hop: str) -> Iterator[None]:
    """Add the time the block takes to this request's ``hop`` (see ``_took``)."""
    began = time.perf_counter()
    try:
        yield
    finally:
        spent = _spent.get(None)
        if spent is not None:
            spent[hop] = spent.get(hop, 0.0) + time.perf_counter() - began


def _took(started: float) -> dict[str, str]:
    """``Server-Timing``: the request's time in the replica (``query``), then per hop
    (cache lookup, slot, the engine through the owner actor) where it took any."""
    hops = [("query", time.perf_counter() - started), *(_spent.get(None) or {}).items()]
    return {"Server-Timing": ", ".join(f"{name};dur={sec * 1000:.1f}" for name, sec in hops)}


def _series_body(request: SeriesRequest, sealed: Sealed, rows: Rows) -> dict[str, Any]:
    names = request.group_by
    series: dict[tuple[str, ...], list[list[Any]]] = {}
    for row in rows[1]:
        group = tuple(str(v) for v in row[1 : 1 + len(names)])
        value = answer_value(request.metric, row[-1])
        series.setdefault(group, []).append([int(row[0]), _json_value(value)])
    return {
        "tenant": request.tenant,
        "type": request.type,
        "metric": request.metric,
        "resolution": request.resolution,
        "from": iso(request.from_ms),
        "to": iso(request.to_ms),
        "sealed_until": iso(min(sealed.minute, request.to_ms)),
        "group_by": list(names),
        "series": [
            {"group": dict(zip(names, group, strict=True)), "points": points}
            for group, points in series.items()
        ],
    }


def _summary_body(request: SeriesRequest, rows: Rows) -> dict[str, Any]:
    names = request.group_by
    columns, found = rows
    groups = []
    for row in found:
        values = dict(zip(columns, row, strict=True))
        groups.append(
            {
                "group": {n: str(values[f"g{i}"]) for i, n in enumerate(names)},
                **{m: _json_value(answer_value(m, values[m])) for m in METRIC_SQL},
            }
        )
    return {
        "tenant": request.tenant,
        "type": request.type,
        "from": iso(request.from_ms),
        "to": iso(request.to_ms),
        "resolution": request.resolution,
        "group_by": list(names),
        "groups": groups,
    }
