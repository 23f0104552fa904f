"""Redis through redis-py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import redis

from adapters.exceptions import StoreUnavailable
from core.partition_state import WindowResult


def answers(host: str, port: int, password: str | None = None) -> bool:
    """True when Redis answers PING."""
    client = redis.Redis(host=host, port=port, password=password, socket_timeout=1)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


class LiveTiles:
    """The open windows of each partition in Redis: the live tiles of dashboards.

    One hash per partition (``rayline:tiles:<topic>:<partition>``), field
    ``<window>|<tenant>|<type>|<start>|<group key>``, value a JSON object with the
    window's end and its partial count, sum, min, max, avg (and distinct count and
    quantiles when kept). A write replaces a partition's hash in one transaction, so
    a reader sees either the tiles before a batch or after it, never a mix.
    """

    def __init__(self, url: str, topic: str, ttl_seconds: int = 3600) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._topic = topic
        self._ttl = ttl_seconds

    def key(self, partition: int) -> str:
        return f"rayline:tiles:{self._topic}:{partition}"

    def write(self, windows: Mapping[int, Sequence[WindowResult]]) -> None:
        pipe = self._client.pipeline(transaction=True)
        for partition, results in windows.items():
            key = self.key(partition)
            pipe.delete(key)
            if results:
                pipe.hset(key, mapping={_field(r): orjson.dumps(_tile(r)) for r in results})
                pipe.expire(key, self._ttl)
        try:
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis did not take the live tiles: {exc}") from exc

    def read(self, partition: int) -> dict[str, dict[str, Any]]:
        try:
            raw = self._client.hgetall(self.key(partition))
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis did not answer: {exc}") from exc
        return {k.decode(): orjson.loads(v) for k, v in raw.items()}  # type: ignore[union-attr]

    def close(self) -> None:
        self._client.close()


def _field(r: WindowResult) -> str:
    return f"{r.window}|{r.tenant}|{r.type}|{r.start}|{r.group_key}"


def _tile(r: WindowResult) -> dict[str, Any]:
    tile: dict[str, Any] = {
        "end": r.end,
        "count": r.count,
        "sum": r.sum,
        "min": r.min,
        "max": r.max,
        "avg": r.sum / r.count if r.count else None,
    }
    if r.distinct is not None:
        tile["distinct"] = round(r.distinct_estimate() or 0)
    if r.quantiles is not None:
        tile["p50"], tile["p99"] = r.quantile(0.5), r.quantile(0.99)
    return tile


class DeliveryLog:
    """Webhook delivery ids seen lately, so that a replayed delivery is not applied twice.

    ``claim`` sets ``rayline:delivery:<source>:<id>`` only if it is absent (one atomic
    ``SET NX EX``), so of two concurrent copies of a delivery exactly one wins, on any
    replica. A claim whose events Kafka then refused is given back with ``release``, so
    that the sender's retry is applied.
    """

    def __init__(self, url: str, ttl_seconds: int) -> None:
        import redis.asyncio as aioredis

        self._client = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._ttl = ttl_seconds

    @staticmethod
    def _key(source: str, delivery_id: str) -> str:
        return f"rayline:delivery:{source}:{delivery_id[:200]}"

    async def claim(self, source: str, delivery_id: str) -> bool:
        """True when this delivery is new (and now claimed); False for a replay."""
        try:
            return bool(
                await self._client.set(self._key(source, delivery_id), b"1", nx=True, ex=self._ttl)
            )
        except redis.RedisError as exc:
            raise StoreUnavailable(f"Redis (webhook deliveries) did not answer: {exc}") from exc

    async def release(self, source: str, delivery_id: str) -> None:
        try:
            await self._client.delete(self._key(source, delivery_id))
        except redis.RedisError as exc:
            raise StoreUnavailable(f"Redis (webhook deliveries) did not answer: {exc}") from exc


CDC_LSN_PREFIX = "rayline:cdc:lsn:"


class CdcPositions:
    """The last applied LSN of each captured table (``rayline:cdc:lsn:<schema>.<table>``).

    The CDC applier publishes them after each batch; workers read them to reload a
    dimension table as soon as its changes are in.
    """

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    def publish(self, positions: Mapping[str, int]) -> None:
        if not positions:
            return
        try:
            self._client.mset({CDC_LSN_PREFIX + t: str(lsn) for t, lsn in positions.items()})
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis did not take the CDC positions: {exc}") from exc

    def read(self, tables: Sequence[str]) -> list[str | None]:
        """The position of each of ``tables`` (``schema.table``), None where none is known."""
        if not tables:
            return []
        try:
            values = self._client.mget([CDC_LSN_PREFIX + t for t in tables])
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis did not answer for the CDC positions: {exc}") from exc
        return [None if v is None else v.decode() if isinstance(v, bytes) else v for v in values]

    def close(self) -> None:
        self._client.close()
