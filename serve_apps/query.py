"""Query Serve app, mounted at ``/v1/query``.

* ``GET /series``: a metric's time series, with filters, group-by and top-N, at an
  automatically chosen resolution (raw, 1m, 1h, 1d);
* ``GET /summary`` and ``GET /top``: every metric (counts, sums, distinct counts,
  quantiles) over a range, per group, the largest groups first;
* ``GET /events``: raw event search, paged with a cursor;
* ``GET /latest/{type}``: the newest windows, open ones live from the workers merged
  with closed ones from ClickHouse, with the pipeline's watermark;
* ``POST /sql``: one guarded read-only SELECT over the caller's rows;
* ``GET /healthz``: ClickHouse and the cache.

Every request needs a tenant API key (``Authorization: Bearer``); a tenant reads only
its own rows, by every endpoint. The platform key (``'*'``) names a tenant with
``?tenant=``. Every parameter is checked and bound, never formatted into SQL. Every
ClickHouse statement runs within the ``query.*`` limits (time, memory, threads) and
one of the tenant's ``query.tenant_concurrency`` slots, counted in Redis across the
replicas (429 with ``Retry-After`` past it).
"""

# No `from __future__ import annotations`: FastAPI resolves handler annotations at
# run time, and inside Serve's ingress wrapper postponed ones are not found.
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
import ray
from fastapi import FastAPI, Path, Query, Request, Response
from ray import serve
from ray.exceptions import RayError

from adapters.exceptions import QueryRejected, StoreUnavailable
from adapters.query_cache import QueryCache
from adapters.query_slots import QuerySlots
from core.envelope import FieldError, name_problem
from core.partition_state import combine_results
from core.query_plan import time_param
from serve_apps.auth import ApiKeys, AuthFailed
from serve_apps.http import Answer, BodyTooLarge, read_body, respond
from serve_apps.query_service import QueryLimits, QueryService, Rows, iso

MAX_SQL_BODY_BYTES = 64 * 1024  # a 16 KiB statement, JSON-escaped, with room to spare
SLOT_LEASE_MARGIN_S = 5.0
"""A slot nobody gave back lapses this long after its statement's time limit."""
log = logging.getLogger(__name__)

app = FastAPI(
    title="Rayline query API",
    description="Time series, summaries, top-N, raw event search and guarded SQL over one "
    "tenant's events; aggregates come from ClickHouse rollups, the newest minutes from raw "
    "events and the workers' open windows.",
    version="1",
)

_COMMON = {
    "type": "Event type (metric) to read.",
    "from": "Start: RFC 3339 or epoch seconds. Default: an hour before `to`.",
    "to": "End, exclusive: RFC 3339 or epoch seconds. Default: now.",
    "tenant": "Only with the platform key: the tenant to read.",
}


@dataclass(frozen=True, slots=True)
class QueryConfig:
    namespace: str
    clickhouse_actor: str
    """Name of the actor that owns the ClickHouse client."""
    coordinator_actor: str
    """Name of the coordinator, which gathers the workers' open windows."""
    windows: tuple[str, ...]
    """Window kinds the pipeline computes; the first is the default of /latest."""
    limits: QueryLimits
    dsn: str = ""
    """PostgreSQL, where the API keys are."""
    redis_url: str | None = None
    cache_seconds: float = 600.0


class _OwnerReader:
    """The Reader over the ClickHouse owner actor.

    The actor's handle is looked up once and kept: ``ray.get_actor`` asks Ray's control
    store (GCS) every time, a round trip on every request otherwise. A handle whose
    actor went away is dropped, and the next call looks it up again (a restarted owner
    has a new handle under the same name).
    """

    def __init__(self, namespace: str, name: str) -> None:
        self._namespace, self._name = namespace, name
        self._handle: Any = None

    def _owner(self) -> Any:
        if self._handle is None:
            try:
                self._handle = ray.get_actor(self._name, namespace=self._namespace)
            except ValueError as exc:
                raise StoreUnavailable(f"the ClickHouse owner actor is not running: {exc}") from exc
        return self._handle

    async def run_query(
        self, sql: str, parameters: dict[str, Any], settings: dict[str, Any] | None = None
    ) -> Rows:
        try:
            rows: Rows = await self._owner().run_query.remote(sql, parameters, settings)
        except (QueryRejected, StoreUnavailable) as exc:
            # The owner's own error, raised by Ray as a subclass of both: its message is
            # the remote traceback, so the cause itself goes on.
            raise getattr(exc, "cause", exc) from None
        except RayError as exc:  # the actor is away
            self._handle = None
            raise StoreUnavailable(str(exc).splitlines()[0]) from exc
        return rows

    async def sealed(self) -> dict[str, int]:
        try:
            status: dict[str, Any] = await self._owner().rollup_status.remote()
        except RayError as exc:
            self._handle = None
            raise StoreUnavailable(str(exc).splitlines()[0]) from exc
        return dict(status["sealed"])


def _params(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.query_params.items() if k != "tenant"}


@serve.deployment
@serve.ingress(app)
class QueryAPI:
    def __init__(self, config: QueryConfig) -> None:
        self._config = config
        self._keys = ApiKeys(config.dsn)
        cache = QueryCache(config.redis_url, config.cache_seconds)
        reader = _OwnerReader(config.namespace, config.clickhouse_actor)
        limits = config.limits
        slots = QuerySlots(
            config.redis_url, limits.tenant_concurrency, limits.max_seconds + SLOT_LEASE_MARGIN_S
        )
        self._service = QueryService(reader, limits, cache, slots=slots)

    async def _tenant(self, request: Request) -> str | Answer:
        try:
            tenant = await self._keys.acting_tenant(request, request.query_params.get("tenant"))
        except AuthFailed as exc:
            return Answer.error(exc.status, str(exc))
        except StoreUnavailable as exc:
            return Answer.error(503, str(exc), retry_after=5)
        if tenant is None:
            return Answer.error(
                422, "the platform key reads one tenant at a time: add ?tenant=<name>"
            )
        problem = name_problem("tenant", tenant)
        if problem is not None:
            return Answer.error(
                422, "invalid query parameters", [FieldError(None, "tenant", problem)]
            )
        return tenant

    @app.get("/series", summary="A metric's time series")
    async def series(
        self,
        request: Request,
        type: str = Query(..., description=_COMMON["type"]),
        from_: str | None = Query(None, alias="from", description=_COMMON["from"]),
        to: str | None = Query(None, description=_COMMON["to"]),
        resolution: str = Query("auto", description="auto, raw, 1m, 1h or 1d."),
        metric: str = Query(
            "count", description="count, sum, min, max, avg, distinct, p50, p90 or p99."
        ),
        group_by: str | None = Query(None, description="Up to 3 dimensions, comma-separated."),
        top: str | None = Query(None, description="Keep the N largest groups (needs group_by)."),
        tenant: str | None = Query(None, description=_COMMON["tenant"]),
    ) -> Response:
        """Buckets of the range; filter with `where.<dimension>=<value>`."""
        who = await self._tenant(request)
        if isinstance(who, Answer):
            return respond(who)
        return respond(await self._service.series(who, _params(request)))

    @app.get("/summary", summary="Every metric over a range, per group")
    async def summary(
        self,
        request: Request,
        type: str = Query(..., description=_COMMON["type"]),
        from_: str | None = Query(None, alias="from", description=_COMMON["from"]),
        to: str | None = Query(None, description=_COMMON["to"]),
        group_by: str | None = Query(None, description="Up to 3 dimensions, comma-separated."),
        metric: str = Query("count", description="The metric groups are ranked by."),
        top: str | None = Query(None, description="Keep the N largest groups."),
        tenant: str | None = Query(None, description=_COMMON["tenant"]),
    ) -> Response:
        """Count, sum, min, max, avg, distinct count and p50/p90/p99 of the range."""
        who = await self._tenant(request)
        if isinstance(who, Answer):
            return respond(who)
        return respond(await self._service.summary(who, _params(request)))

    @app.get("/top", summary="Top-N groups of a range")
    async def top_groups(
        self,
        request: Request,
        type: str = Query(..., description=_COMMON["type"]),
        by: str = Query(..., description="The dimension(s) to rank, comma-separated."),
        n: str = Query("10", description="How many groups (1 to 100)."),
        metric: str = Query("count", description="The metric groups are ranked by."),
        from_: str | None = Query(None, alias="from", description=_COMMON["from"]),
        to: str | None = Query(None, description=_COMMON["to"]),
        tenant: str | None = Query(None, description=_COMMON["tenant"]),
    ) -> Response:
        """The same as `/summary?group_by=<by>&top=<n>`."""
        who = await self._tenant(request)
        if isinstance(who, Answer):
            return respond(who)
        params = _params(request)
        params["group_by"], params["top"] = params.pop("by"), params.pop("n", "10")
        return respond(await self._service.summary(who, params))

    @app.get("/events", summary="Raw event search, paged")
    async def events(
        self,
        request: Request,
        type: str = Query(..., description=_COMMON["type"]),
        from_: str | None = Query(None, alias="from", description=_COMMON["from"]),
        to: str | None = Query(None, description=_COMMON["to"]),
        limit: str = Query("100", description="Events per page (1 to 1000)."),
        cursor: str | None = Query(None, description="`next_cursor` of the previous page."),
        tenant: str | None = Query(None, description=_COMMON["tenant"]),
    ) -> Response:
        """Events oldest first; filter with `where.<attribute>=<value>`."""
        who = await self._tenant(request)
        if isinstance(who, Answer):
            return respond(who)
        return respond(await self._service.events(who, _params(request)))

    @app.post("/sql", summary="One read-only SELECT over your rows")
    async def sql(self, request: Request) -> Response:
        """Body `{"sql": "SELECT ..."}`: one SELECT (UNION, CTEs and subqueries allowed)
        over events, windows_1m, rollup_1h, rollup_1d, data_quality_1m, window_results,
        calling allowlisted functions; no SETTINGS, FORMAT or INTO. Read-only, time-,
        memory-, row- and byte-limited; anything else is a 400 that says why."""
        who = await self._tenant(request)
        if isinstance(who, Answer):
            return respond(who)
        try:
            body = orjson.loads(await read_body(request, MAX_SQL_BODY_BYTES))
        except BodyTooLarge as exc:
            return respond(Answer.error(413, f"{exc}: send one statement of at most 16 KiB"))
        except orjson.JSONDecodeError as exc:
            return respond(Answer.error(400, f"the body is not JSON: {exc}"))
        statement = body.get("sql") if isinstance(body, dict) else None
        return respond(await self._service.sql(who, statement))

    @app.get("/latest/{metric_type}", summary="Newest windows, live")
    async def latest(
        self,
        request: Request,
        metric_type: str = Path(..., description=_COMMON["type"]),
        from_: str | None = Query(None, alias="from", description=_COMMON["from"]),
        to: str | None = Query(None, description=_COMMON["to"]),
        window: str | None = Query(None, description="Window kind, e.g. 1m or 5m/1m."),
        tenant: str | None = Query(None, description=_COMMON["tenant"]),
    ) -> Response:
        """Open windows from the workers merged with closed ones, and the watermark."""
        who = await self._tenant(request)
        if isinstance(who, Answer):
            return respond(who)
        return respond(await self._latest(who, metric_type, from_, to, window))

    async def _latest(
        self, tenant: str, metric_type: str, from_: str | None, to: str | None, window: str | None
    ) -> Answer:
        cfg = self._config
        problems: list[FieldError] = []
        problem = name_problem("type", metric_type)
        if problem is not None:
            problems.append(FieldError(None, "type", problem))
        kind = window or cfg.windows[0]
        if kind not in cfg.windows:
            problems.append(
                FieldError(None, "window", f"expected one of {list(cfg.windows)}, got {kind!r}")
            )
        now_ms = int(time.time() * 1000)
        given = {k: v for k, v in (("from", from_), ("to", to)) if v is not None}
        to_ms = time_param(given, "to", now_ms + 60_000, problems)
        from_ms = time_param(given, "from", to_ms - 3_600_000, problems)
        if not problems and not 0 < to_ms - from_ms <= 366 * 86_400_000:
            problems.append(
                FieldError(None, "from", "expected 'from' before 'to' and at most 366 days apart")
            )
        if problems:
            return Answer.error(422, "invalid query parameters", problems)
        args = (tenant, metric_type, kind, from_ms, to_ms)
        live: list[Any] = []
        watermark = None
        try:
            coordinator = ray.get_actor(cfg.coordinator_actor, namespace=cfg.namespace)
            live = await coordinator.open_windows.remote(*args)
            watermark = await coordinator.sealed_watermark.remote()
        except (RayError, ValueError) as exc:
            log.warning("open windows unavailable, answering with closed ones: %s", exc)

        async def closed_windows() -> list[Any]:
            try:
                owner = ray.get_actor(cfg.clickhouse_actor, namespace=cfg.namespace)
                return list(await owner.window_results.remote(*args))
            except (RayError, ValueError) as exc:
                raise StoreUnavailable(str(exc).splitlines()[0]) from exc

        closed = await self._service.guarded(tenant, closed_windows)
        if isinstance(closed, Answer):
            return closed
        rows = combine_results(closed, live)
        return Answer(
            200,
            {
                "tenant": tenant,
                "type": metric_type,
                "window": kind,
                "from": iso(from_ms),
                "to": iso(to_ms),
                "watermark": None if watermark is None else iso(int(watermark)),
                "windows": [dict(r, start=iso(r["start"]), end=iso(r["end"])) for r in rows],
                "total": {
                    "count": sum(r["count"] for r in rows),
                    "sum": sum(r["sum"] for r in rows),
                },
            },
        )

    @app.get("/healthz", summary="ClickHouse and the query cache")
    async def healthz(self) -> Response:
        """200 while ClickHouse answers; the cache may be bypassed (Redis down)."""
        try:
            sealed = await self._service.sealed(fresh=True)
            clickhouse = "ok"
        except StoreUnavailable as exc:
            sealed, clickhouse = None, f"unavailable: {exc}"
        cache = self._service.cache
        cache_state = "off" if cache is None or not cache.enabled else (cache.last_error or "ok")
        body = {
            "clickhouse": clickhouse,
            "cache": cache_state,
            "sealed_until": None if sealed is None else iso(sealed.minute),
        }
        return respond(Answer(200 if clickhouse == "ok" else 503, body))
