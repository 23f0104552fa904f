"""The serve apps' TTL cache: hits, misses, expiry and its bound."""

from __future__ import annotations

import asyncio

import pytest

from serve_apps import cache
from serve_apps.cache import TtlCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(cache.time, "monotonic", fake)
    return fake


def _counting(values: dict[str, str | None]) -> tuple[TtlCache[str, str | None], list[str]]:
    asked: list[str] = []

    async def load(key: str) -> str | None:
        asked.append(key)
        return values.get(key)

    return TtlCache(load, ttl=5.0), asked


def test_values_and_misses_are_kept_until_the_ttl_ends(clock: Clock) -> None:
    values: dict[str, str | None] = {"a": "1"}
    ttl_cache, asked = _counting(values)

    async def run() -> list[str | None]:
        got = [await ttl_cache.get("a"), await ttl_cache.get("nope")]
        values["a"], values["nope"] = "2", "now here"
        clock.now += 4.9
        got += [await ttl_cache.get("a"), await ttl_cache.get("nope")]
        clock.now += 0.2
        got += [await ttl_cache.get("a"), await ttl_cache.get("nope")]
        return got

    assert asyncio.run(run()) == ["1", None, "1", None, "2", "now here"]
    assert asked == ["a", "nope", "a", "nope"]


def test_hostile_keys_cannot_grow_it_past_its_bound(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache, "MAX_ENTRIES", 10)
    ttl_cache, asked = _counting({})

    async def run() -> None:
        for n in range(35):
            await ttl_cache.get(f"made-up-{n}")

    asyncio.run(run())
    assert len(asked) == 35
    assert len(ttl_cache._entries) <= 10
