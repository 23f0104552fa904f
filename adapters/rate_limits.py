"""Token buckets in Redis, shared by every replica of the ingest edge.

A request of ``cost`` events takes ``cost`` tokens from each of its buckets (the
tenant's and the source's) in one atomic Lua script: from all of them or from none.
When a bucket is short, the script says how long until it holds enough, which the API
sends back as ``Retry-After``. Buckets refill continuously at their rate up to their
burst; the clock is Redis's own (``TIME``), so replicas with skewed clocks agree.

A request larger than a bucket's burst could never pass; the answer says so instead of
asking the caller to wait forever.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis

from adapters.exceptions import StoreUnavailable

KEY_PREFIX = "rayline:bucket:"

# KEYS: bucket keys. ARGV: cost, then rate (tokens/s) and burst of each key.
# Returns {0, 0} when taken, {1, wait_ms, index} when a bucket is short, {2, 0, index}
# when the cost is over a bucket's burst.
_TAKE = """
local cost = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local levels = {}
local wait = 0
local short = 0
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  if cost > burst then
    return {2, 0, i}
  end
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(state[1]) or burst
  local ts = tonumber(state[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
  levels[i] = tokens
  if tokens < cost then
    local need = math.ceil((cost - tokens) * 1000 / rate)
    if need > wait then
      wait = need
      short = i
    end
  end
end
if short > 0 then
  return {1, wait, short}
end
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  redis.call('HSET', key, 'tokens', tostring(levels[i] - cost), 'ts', now)
  redis.call('PEXPIRE', key, math.ceil(burst * 1000 / rate) + 60000)
end
return {0, 0, 0}
"""


@dataclass(frozen=True, slots=True)
class Bucket:
    """One limit: ``name`` (``tenant:acme``, ``source:github``), tokens/s and size."""

    name: str
    rate: float
    burst: int


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after_s: float = 0.0
    limited_by: str | None = None
    never: bool = False  # the cost is over the bucket's burst: waiting will not help

    def describe(self, cost: int) -> str:
        if self.allowed:
            return "allowed"
        if self.never:
            return (
                f"{cost} events in one request is more than the burst of the {self.limited_by} "
                "rate limit: split the batch"
            )
        return f"rate limit of {self.limited_by} reached; retry in {self.retry_after_s:.1f} s"


class RateLimiter:
    """Takes tokens from several buckets at once (asyncio)."""

    def __init__(self, redis_url: str) -> None:
        self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._take = self._redis.register_script(_TAKE)

    async def take(self, buckets: Sequence[Bucket], cost: int) -> Decision:
        """Take ``cost`` tokens from every bucket or from none.

        Raises:
            StoreUnavailable: Redis did not answer.
        """
        if not buckets or cost <= 0:
            return Decision(True)
        args: list[float | int] = [cost]
        for b in buckets:
            args += [b.rate, b.burst]
        try:
            verdict, wait_ms, index = await self._take(
                keys=[KEY_PREFIX + b.name for b in buckets], args=args
            )
        except redis.RedisError as exc:
            raise StoreUnavailable(f"Redis (rate limits) did not answer: {exc}") from exc
        if verdict == 0:
            return Decision(True)
        limited = buckets[int(index) - 1].name
        if verdict == 2:
            return Decision(False, limited_by=limited, never=True)
        return Decision(False, retry_after_s=int(wait_ms) / 1000, limited_by=limited)

    async def close(self) -> None:
        await self._redis.aclose()
