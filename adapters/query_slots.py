"""Per-tenant statement slots in Redis, shared by every replica of the query API.

The rule is ``core.query_slots``: a tenant holds at most ``limit`` slots at once, and
each slot is a lease that lapses by itself. In Redis a tenant's slots are one sorted
set (token -> lease end, on Redis's clock), taken and counted by one Lua script, so
two replicas never both grant the last slot. With Redis down the limit is kept per
replica (a :class:`~core.query_slots.SlotTable` in memory) until Redis answers again:
looser by the number of replicas, never off.

Why Redis and not a semaphore per replica: Serve spreads one tenant's requests over
every replica, so a local semaphore would let a tenant run ``limit`` statements on
each of them, and the number would change whenever the deployment scales.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis

from core.query_slots import SlotTable, SlotVerdict

KEY_PREFIX = "rayline:qslots:"
_RETRY_SECONDS = 5.0
log = logging.getLogger(__name__)

# KEYS[1]: the tenant's slots. ARGV: limit, lease (ms), token.
# Returns {1, running} when the slot was taken, {0, running} when the tenant holds
# `limit` already; `running` counts the unexpired slots before this one.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local running = redis.call('ZCARD', KEYS[1])
if running >= tonumber(ARGV[1]) then
  return {0, running}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return {1, running}
"""


@dataclass(frozen=True, slots=True)
class Slot:
    """A slot asked for: the verdict, and where it is counted."""

    tenant: str
    token: str
    verdict: SlotVerdict
    shared: bool
    """Counted in Redis (for every replica), or in this replica only (Redis was down)."""


class QuerySlots:
    """Takes and gives back statement slots (asyncio); never raises for Redis.

    Args:
        redis_url: Redis, or None to count in this replica only.
        limit: slots one tenant may hold at once (``query.tenant_concurrency``).
        lease_seconds: how long a slot nobody gave back stays taken: the statement
            time limit plus a margin.
    """

    def __init__(
        self,
        redis_url: str | None,
        limit: int,
        lease_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = limit
        self._lease_ms = max(1, int(lease_seconds * 1000))
        self._local = SlotTable(limit, self._lease_ms)
        self._clock = clock
        self._redis = (
            aioredis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
            if redis_url
            else None
        )
        self._take = self._redis.register_script(_TAKE) if self._redis is not None else None
        self._down_until = 0.0
        self.last_error: str | None = None

    async def take(self, tenant: str) -> Slot:
        """Ask for a slot; the verdict says whether it was granted."""
        token = uuid.uuid4().hex
        if self._take is not None and self._clock() >= self._down_until:
            try:
                granted, running = await self._take(
                    keys=[KEY_PREFIX + tenant], args=[self._limit, self._lease_ms, token]
                )
                self.last_error = None
                verdict = SlotVerdict(bool(granted), int(running), self._limit)
                return Slot(tenant, token, verdict, True)
            except (redis.RedisError, OSError) as exc:
                self._failed(exc)
        verdict = self._local.take(tenant, token, self._now_ms())
        return Slot(tenant, token, verdict, False)

    async def give_back(self, slot: Slot) -> None:
        """Free a granted slot (one Redis lost meanwhile lapses with its lease)."""
        if not slot.verdict.granted:
            return
        if not slot.shared:
            self._local.give_back(slot.tenant, slot.token)
            return
        if self._redis is None:
            return
        try:
            await self._redis.zrem(KEY_PREFIX + slot.tenant, slot.token)
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        self.last_error = f"Redis unavailable, tenant query slots counted per replica: {exc}"
        self._down_until = self._clock() + _RETRY_SECONDS
        log.warning("%s", self.last_error)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
