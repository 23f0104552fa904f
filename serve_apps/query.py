"""Query Serve app: ``GET /v1/metrics/{type}`` returns the windows of one metric.

Closed windows come from ClickHouse; windows still open come live from the partition
workers, so a window is visible from its first event on. Every parameter is checked
before it reaches ClickHouse and bound there, never formatted into SQL. Bad
parameters answer 422 naming the parameter.
"""

# No `from __future__ import annotations`: FastAPI resolves handler annotations at
# run time, and inside Serve's ingress wrapper postponed ones are not found.
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import ray
from fastapi import FastAPI, Query
from fastapi.responses import ORJSONResponse
from ray import serve
from ray.exceptions import RayError

from core.envelope import name_problem, parse_event_time
from core.partition_state import combine_results
from serve_apps.http import error_response

app = FastAPI(
    title="Rayline query API",
    description="Reads window aggregates: closed ones from ClickHouse, open ones live.",
    default_response_class=ORJSONResponse,
)
log = logging.getLogger(__name__)

_MAX_RANGE_MS = 366 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class QueryConfig:
    namespace: str
    clickhouse_actor: str
    """Name of the actor that owns the ClickHouse client."""
    coordinator_actor: str
    """Name of the coordinator, which gathers the workers' open windows."""
    windows: tuple[str, ...]
    """Window kinds the pipeline computes; the first is the default."""


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def _time_param(name: str, raw: str | None, default_ms: int, problems: list[dict[str, str]]) -> int:
    if raw is None:
        return default_ms
    value: Any = raw
    with contextlib.suppress(ValueError):
        value = float(raw)
    try:
        return parse_event_time(value)
    except ValueError as exc:
        problems.append({"field": name, "message": str(exc)})
        return default_ms


@serve.deployment
@serve.ingress(app)
class QueryAPI:
    def __init__(self, config: QueryConfig) -> None:
        self._config = config

    def _actor(self, name: str) -> Any:
        return ray.get_actor(name, namespace=self._config.namespace)

    @app.get("/{metric_type}")
    async def metric_windows(
        self,
        metric_type: str,
        tenant: str = Query(..., description="Tenant whose events are counted."),
        from_: str | None = Query(None, alias="from", description="Start (RFC 3339 or epoch s)."),
        to: str | None = Query(None, description="End, exclusive (RFC 3339 or epoch s)."),
        window: str | None = Query(None, description="Window kind, e.g. 1m or 5m/1m."),
    ) -> Any:
        cfg = self._config
        problems: list[dict[str, str]] = []
        for field, value in (("tenant", tenant), ("type", metric_type)):
            problem = name_problem(field, value)
            if problem is not None:
                problems.append({"field": field, "message": problem})
        kind = window or cfg.windows[0]
        if kind not in cfg.windows:
            problems.append(
                {"field": "window", "message": f"expected one of {list(cfg.windows)}, got {kind!r}"}
            )
        now_ms = int(time.time() * 1000)
        to_ms = _time_param("to", to, now_ms + 60_000, problems)
        from_ms = _time_param("from", from_, to_ms - 3_600_000, problems)
        if not problems and not 0 < to_ms - from_ms <= _MAX_RANGE_MS:
            problems.append(
                {
                    "field": "from",
                    "message": "expected 'from' before 'to' and at most 366 days apart",
                }
            )
        if problems:
            return error_response(422, "invalid query parameters", errors=problems)
        args = (tenant, metric_type, kind, from_ms, to_ms)
        live: list[Any] = []
        try:
            live = await self._actor(cfg.coordinator_actor).open_windows.remote(*args)
        except (RayError, ValueError) as exc:
            log.warning("open windows unavailable, answering with closed ones: %s", exc)
        try:
            closed = await self._actor(cfg.clickhouse_actor).window_results.remote(*args)
        except (RayError, ValueError) as exc:
            return error_response(503, f"ClickHouse is unavailable: {exc}", retry_after=5)
        rows = combine_results(closed, live)
        return {
            "tenant": tenant,
            "type": metric_type,
            "window": kind,
            "from": _iso(from_ms),
            "to": _iso(to_ms),
            "windows": [dict(r, start=_iso(r["start"]), end=_iso(r["end"])) for r in rows],
            "total": {
                "count": sum(r["count"] for r in rows),
                "sum": sum(r["sum"] for r in rows),
            },
        }
