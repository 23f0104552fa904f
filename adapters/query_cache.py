"""The query API's result cache in Redis.

Only answers over *sealed* ranges are cached: their buckets are final, so an answer
stays right until a window under it is rewritten. Every key carries a generation
number (``rayline:qc:generation``), which the rollups bump whenever they write or
rewrite an aggregate chunk (``adapters.rollups``), so a rewrite invalidates every
cached answer at once without scanning keys. Answers also expire after a TTL.

With Redis down the cache is bypassed: reads miss, writes are dropped, queries go to
ClickHouse (slower, still right), and :attr:`QueryCache.healthy` says so. After a
failure the cache waits a few seconds before it tries Redis again, so a dead Redis
does not add a connect timeout to every request.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis

log = logging.getLogger(__name__)

GENERATION_KEY = "rayline:qc:generation"
_RETRY_SECONDS = 5.0


def cache_key(generation: int, tenant: str, endpoint: str, params: dict[str, Any]) -> str:
    """Key of one answer; ``params`` are the checked request parameters."""
    body = orjson.dumps([tenant, endpoint, params], option=orjson.OPT_SORT_KEYS)
    return f"rayline:qc:{generation}:{hashlib.sha256(body).hexdigest()}"


def bump_generation(url: str) -> None:
    """Invalidate every cached answer (called after aggregates were written)."""
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.incr(GENERATION_KEY)
    except (redis.RedisError, OSError) as exc:
        log.warning("query cache not invalidated (Redis: %s); entries expire by TTL", exc)
    finally:
        client.close()


class QueryCache:
    """Get and put JSON answers; never raises for a Redis failure."""

    def __init__(
        self, url: str | None, ttl_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._client = (
            redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
            if url and ttl_seconds > 0
            else None
        )
        self._ttl = ttl_seconds
        self._clock = clock
        self._down_until = 0.0
        self.last_error: str | None = None
        self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        return self._client is not None

    @property
    def healthy(self) -> bool:
        return self._client is not None and self.last_error is None

    def _usable(self) -> redis.Redis | None:
        if self._client is None or self._clock() < self._down_until:
            return None
        return self._client

    def _failed(self, exc: Exception) -> None:
        self.last_error = f"Redis unavailable, cache bypassed: {exc}"
        self._down_until = self._clock() + _RETRY_SECONDS
        log.warning("%s", self.last_error)

    def key(self, tenant: str, endpoint: str, params: dict[str, Any]) -> str | None:
        """The key for these parameters under the current generation; None when bypassed."""
        client = self._usable()
        if client is None:
            return None
        try:
            generation = int(client.get(GENERATION_KEY) or 0)
        except (redis.RedisError, OSError, ValueError) as exc:
            self._failed(exc)
            return None
        self.last_error = None
        return cache_key(generation, tenant, endpoint, params)

    def get(self, key: str | None) -> Any | None:
        client = self._usable()
        if key is None or client is None:
            return None
        try:
            raw = client.get(key)
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return None
        if raw is None:
            self.misses += 1
            return None
        self.hits += 1
        return orjson.loads(raw)

    def put(self, key: str | None, answer: Any) -> None:
        client = self._usable()
        if key is None or client is None:
            return
        try:
            client.set(key, orjson.dumps(answer), ex=max(1, round(self._ttl)))
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
