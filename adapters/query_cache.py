"""The query API's result cache in Redis.

Only answers over *sealed* ranges are cached: their buckets are final, so an answer
stays right until a window under it is rewritten. Every key carries a generation
number (``rayline:qc:generation``), which the rollups bump whenever they write or
rewrite an aggregate chunk (``adapters.rollups``), so a rewrite invalidates every
cached answer at once without scanning keys. Answers also expire after a TTL.

A lookup is one round trip: a small Lua script reads the generation and the answer
under it together, and answers are stored as the JSON bytes the API sends, so a hit
is handed back as it is, never decoded and encoded again. Lookups are keyed by the
request's parameters as the caller sent them (a digest), so a hit needs no parsing
either; only answers over sealed ranges are ever put, so a key that is found is one
whose answer was final.

With Redis down the cache is bypassed: lookups miss, puts are dropped, queries go to
ClickHouse (slower, still right), and :attr:`QueryCache.healthy` says so. After a
failure the cache waits a few seconds before it tries Redis again, so a dead Redis
does not add a connect timeout to every request.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import orjson
import redis
import redis.asyncio as aioredis

log = logging.getLogger(__name__)

GENERATION_KEY = "rayline:qc:generation"
KEY_PREFIX = "rayline:qc:"
_RETRY_SECONDS = 5.0
# KEYS[1]: the generation. ARGV: key prefix, digest. Returns {generation, answer or nil}.
# (The answer's key is built here, from the generation just read: one round trip.)
_LOOKUP = """
local g = redis.call('GET', KEYS[1]) or '0'
return {g, redis.call('GET', ARGV[1] .. g .. ':' .. ARGV[2])}
"""


def request_digest(tenant: str, endpoint: str, params: Mapping[str, str], scope: str = "") -> str:
    """Digest of one request as sent: tenant, endpoint, its parameters (in any order) and
    the ``scope`` of the settings that shape answers (database, dimensions, max points)."""
    body = orjson.dumps([scope, tenant, endpoint, sorted(params.items())])
    return hashlib.sha256(body).hexdigest()


def bump_generation(url: str) -> None:
    """Invalidate every cached answer (called after aggregates were written)."""
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.incr(GENERATION_KEY)
    except (redis.RedisError, OSError) as exc:
        log.warning("query cache not invalidated (Redis: %s); entries expire by TTL", exc)
    finally:
        client.close()


@dataclass(frozen=True, slots=True)
class Lookup:
    """What a lookup found: the answer's bytes on a hit, and where to put one on a miss
    (``key`` is None while the cache is off or bypassed)."""

    key: str | None
    answer: bytes | None = None


BYPASSED = Lookup(None)


class QueryCache:
    """Looks up and puts JSON answers (asyncio); never raises for a Redis failure."""

    def __init__(
        self, url: str | None, ttl_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._client = (
            aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
            if url and ttl_seconds > 0
            else None
        )
        self._lookup = self._client.register_script(_LOOKUP) if self._client else None
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

    def _usable(self) -> bool:
        return self._client is not None and self._clock() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        self.last_error = f"Redis unavailable, cache bypassed: {exc}"
        self._down_until = self._clock() + _RETRY_SECONDS
        log.warning("%s", self.last_error)

    async def lookup(self, digest: str) -> Lookup:
        """The answer stored for ``digest`` under the current generation, if any."""
        if self._lookup is None or not self._usable():
            return BYPASSED
        try:
            found = await self._lookup(keys=[GENERATION_KEY], args=[KEY_PREFIX, digest])
            generation, answer = found
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return BYPASSED
        self.last_error = None
        key = f"{KEY_PREFIX}{generation.decode()}:{digest}"
        if answer is None:
            self.misses += 1
            return Lookup(key)
        self.hits += 1
        return Lookup(key, bytes(answer))

    async def put(self, key: str | None, answer: bytes) -> None:
        """Store ``answer`` (JSON bytes) under ``key`` from a lookup, for the TTL."""
        if key is None or self._client is None or not self._usable():
            return
        try:
            await self._client.set(key, answer, ex=max(1, round(self._ttl)))
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
