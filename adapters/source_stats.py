"""What every source did: events accepted and rejected, errors, last success.

Kept in two places. Redis holds one hash per source (``rayline:source:<name>``) that
every replica and actor adds to, so that ``rayline status`` shows the whole of a
source however many processes serve it. Inside Ray, the same numbers also go to Ray's
metrics agent as Prometheus metrics:

* ``rayline_source_events_total{source, outcome}`` (outcome ``accepted`` or ``rejected``)
* ``rayline_source_errors_total{source}``
* ``rayline_source_last_success_timestamp_seconds{source}``

Callers record once per batch (a request, a page, a group of messages), never per
event. A Redis outage never fails the caller: statistics are best effort, counted as
``dropped`` in :attr:`SourceStats.dropped`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis
import redis.asyncio as aioredis

KEY_PREFIX = "rayline:source:"
FLUSH_SECONDS = 1.0
RATE_PREFIX = "rayline:source-minutes:"  # events per minute, the last few minutes
_MAX_ERROR_CHARS = 500


def _fields(
    now_ms: int, accepted: int, rejected: int, errors: int, error: str | None
) -> tuple[dict[str, int], dict[Any, Any]]:
    increments = {
        name: amount
        for name, amount in (("accepted", accepted), ("rejected", rejected), ("errors", errors))
        if amount
    }
    values: dict[Any, Any] = {}
    if error is not None:
        values["last_error"] = error[:_MAX_ERROR_CHARS]
        values["last_error_ms"] = str(now_ms)
    elif accepted or rejected:
        values["last_success_ms"] = str(now_ms)
    return increments, values


class _Metrics:
    """Ray's Prometheus metrics for sources, created only inside a Ray worker."""

    def __init__(self) -> None:
        self.enabled = False
        try:
            import ray
            from ray.util import metrics

            if not ray.is_initialized():
                return
            self.events = metrics.Counter(
                "rayline_source_events_total",
                description="Events a source took in, by outcome.",
                tag_keys=("source", "outcome"),
            )
            self.errors = metrics.Counter(
                "rayline_source_errors_total",
                description="Failures of a source (HTTP errors, disconnects, broker errors).",
                tag_keys=("source",),
            )
            self.last_success = metrics.Gauge(
                "rayline_source_last_success_timestamp_seconds",
                description="When a source last delivered events.",
                tag_keys=("source",),
            )
            self.enabled = True
        except Exception:  # metrics are optional; a source must not fail for them
            self.enabled = False

    def record(
        self, source: str, now_ms: int, accepted: int, rejected: int, errors: int, error: bool
    ) -> None:
        if not self.enabled:
            return
        if accepted:
            self.events.inc(accepted, tags={"source": source, "outcome": "accepted"})
        if rejected:
            self.events.inc(rejected, tags={"source": source, "outcome": "rejected"})
        if errors:
            self.errors.inc(errors, tags={"source": source})
        if (accepted or rejected) and not error:
            self.last_success.set(now_ms / 1000, tags={"source": source})


def _prepare(
    client: Any,
    metrics: _Metrics,
    source: str,
    now_ms: int,
    accepted: int,
    rejected: int,
    errors: int,
    error: str | None,
) -> Any:
    """Record the metrics; the Redis pipeline to run, or None when nothing changed."""
    metrics.record(source, now_ms, accepted, rejected, errors, error is not None)
    increments, values = _fields(now_ms, accepted, rejected, errors, error)
    if not increments and not values:
        return None
    pipe = client.pipeline(transaction=False)
    _queue(pipe, source, now_ms, accepted, rejected, increments, values)
    return pipe


def _queue(
    pipe: Any,
    source: str,
    now_ms: int,
    accepted: int,
    rejected: int,
    increments: dict[str, int],
    values: dict[Any, Any],
) -> None:
    for name, amount in increments.items():
        pipe.hincrby(KEY_PREFIX + source, name, amount)
    if values:
        pipe.hset(KEY_PREFIX + source, mapping=values)
    if accepted or rejected:
        pipe.hincrby(RATE_PREFIX + source, str(now_ms // 60_000), accepted + rejected)
        pipe.expire(RATE_PREFIX + source, 300)


class SourceStats:
    """Per-source statistics from synchronous code (actors, command line)."""

    def __init__(self, redis_url: str) -> None:
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._metrics = _Metrics()
        self.dropped = 0

    def record(
        self,
        source: str,
        *,
        now_ms: int,
        accepted: int = 0,
        rejected: int = 0,
        errors: int = 0,
        error: str | None = None,
    ) -> None:
        pipe = _prepare(
            self._redis, self._metrics, source, now_ms, accepted, rejected, errors, error
        )
        try:
            if pipe is not None:
                pipe.execute()
        except redis.RedisError:
            self.dropped += 1

    def read_all(self, now_ms: int) -> dict[str, dict[str, Any]]:
        """{source: {accepted, rejected, errors, last_success_ms, last_error, ...,
        events_per_second}}; the rate is that of the last whole minute."""
        out: dict[str, dict[str, Any]] = {}
        last_minute = str(now_ms // 60_000 - 1).encode()
        for key in self._redis.scan_iter(match=KEY_PREFIX + "*", count=500):
            raw: Any = self._redis.hgetall(key)
            name = key.decode()[len(KEY_PREFIX) :]
            row = _decode(raw)
            minute: Any = self._redis.hget(RATE_PREFIX + name, last_minute)
            row["events_per_second"] = round(int(minute or 0) / 60, 1)
            out[name] = row
        return out

    def close(self) -> None:
        self._redis.close()


class AsyncSourceStats:
    """Per-source statistics from asyncio code (Serve replicas), written once a second.

    A busy replica handles hundreds of requests a second; ``record`` only adds to
    counters in memory, and a task started by :meth:`start` writes them to Redis every
    :data:`FLUSH_SECONDS` (Prometheus metrics are updated at once).
    """

    def __init__(self, redis_url: str) -> None:
        self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._metrics = _Metrics()
        self._pending: dict[str, list[Any]] = {}  # source -> [accepted, rejected, errors,
        #                                            last error, newest now_ms]
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def start(self) -> None:
        """Start the writer in the running event loop (again after it ended)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._write_every_second())

    def record(
        self,
        source: str,
        *,
        now_ms: int,
        accepted: int = 0,
        rejected: int = 0,
        errors: int = 0,
        error: str | None = None,
    ) -> None:
        self._metrics.record(source, now_ms, accepted, rejected, errors, error is not None)
        row = self._pending.setdefault(source, [0, 0, 0, None, now_ms])
        row[0] += accepted
        row[1] += rejected
        row[2] += errors
        row[3] = error if error is not None else row[3]
        row[4] = max(row[4], now_ms)

    async def flush(self) -> None:
        """Write what was recorded since the last flush."""
        pending, self._pending = self._pending, {}
        for source, (accepted, rejected, errors, error, now_ms) in pending.items():
            increments, values = _fields(now_ms, accepted, rejected, errors, error)
            pipe = self._redis.pipeline(transaction=False)
            _queue(pipe, source, now_ms, accepted, rejected, increments, values)
            try:
                await pipe.execute()
            except redis.RedisError:
                self.dropped += 1

    async def _write_every_second(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()


def _decode(raw: dict[bytes, bytes]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for k, v in raw.items():
        name, text = k.decode(), v.decode()
        row[name] = int(text) if text.lstrip("-").isdigit() else text
    return row
