"""A small per-replica cache of async lookups (keys, sources, schemas)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

MAX_ENTRIES = 10_000


class TtlCache(Generic[K, V]):
    """Values loaded on a miss and kept ``ttl`` seconds (misses too).

    Bounded: past :data:`MAX_ENTRIES` it starts over, so hostile keys (random API keys,
    made-up source names) cannot grow it without end.
    """

    def __init__(self, loader: Callable[[K], Awaitable[V]], ttl: float) -> None:
        self._loader = loader
        self._ttl = ttl
        self._entries: dict[K, tuple[V, float]] = {}

    async def get(self, key: K) -> V:
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and now - hit[1] < self._ttl:
            return hit[0]
        value = await self._loader(key)
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[key] = (value, now)
        return value
