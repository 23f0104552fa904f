"""Per-tenant statement slots: the lease rule, and the per-replica fallback of the
Redis-backed slots when Redis does not answer."""

from __future__ import annotations

import asyncio

import pytest

from adapters.query_slots import QuerySlots
from core.query_slots import SlotTable

LEASE = 15_000


@pytest.mark.parametrize(
    ("steps", "granted"),
    [
        # (action, tenant, token, now_ms) -> whether each `take` was granted
        ([("take", "a", "1", 0), ("take", "a", "2", 1), ("take", "a", "3", 2)], [1, 1, 0]),
        ([("take", "a", "1", 0), ("take", "a", "2", 1), ("take", "b", "3", 2)], [1, 1, 1]),
        (
            [("take", "a", "1", 0), ("take", "a", "2", 1), ("give", "a", "1", 5),
             ("take", "a", "3", 6)],
            [1, 1, 1],
        ),
        # a slot nobody gave back lapses with its lease, and only then
        (
            [("take", "a", "1", 0), ("take", "a", "2", 0), ("take", "a", "3", LEASE - 1),
             ("take", "a", "4", LEASE)],
            [1, 1, 0, 1],
        ),
        # giving back what was never taken, or twice, frees nothing else
        (
            [("take", "a", "1", 0), ("give", "a", "x", 1), ("give", "b", "1", 1),
             ("take", "a", "2", 2), ("give", "a", "2", 3), ("give", "a", "2", 3),
             ("take", "a", "3", 4), ("take", "a", "4", 5)],
            [1, 1, 1, 0],
        ),
    ],
)  # fmt: skip
def test_a_tenant_holds_at_most_its_limit_of_slots(
    steps: list[tuple[str, str, str, int]], granted: list[int]
) -> None:
    table = SlotTable(limit=2, lease_ms=LEASE)
    seen = []
    for action, tenant, token, now in steps:
        if action == "take":
            seen.append(int(table.take(tenant, token, now).granted))
        else:
            table.give_back(tenant, token)
    assert seen == granted


def test_a_refusal_says_how_many_run_and_the_limit() -> None:
    table = SlotTable(limit=3, lease_ms=LEASE)
    verdicts = [table.take("a", str(i), 0) for i in range(4)]
    assert [v.running for v in verdicts] == [0, 1, 2, 3]
    assert not verdicts[-1].granted
    assert verdicts[-1].limit == 3
    assert table.running("a", 0) == 3
    assert table.running("a", LEASE) == 0


@pytest.mark.parametrize(("limit", "lease"), [(0, 1000), (1, 0)])
def test_a_table_without_slots_or_lease_is_refused(limit: int, lease: int) -> None:
    with pytest.raises(ValueError, match="expected limit >= 1"):
        SlotTable(limit, lease)


def test_with_redis_down_the_limit_holds_per_replica() -> None:
    async def run() -> None:
        slots = QuerySlots("redis://127.0.0.1:1/0", limit=2, lease_seconds=15)
        try:
            first, second, third = [await slots.take("acme") for _ in range(3)]
            assert [s.verdict.granted for s in (first, second, third)] == [True, True, False]
            assert not first.shared, "counted in this replica while Redis is down"
            assert slots.last_error is not None
            assert "counted per replica" in slots.last_error
            await slots.give_back(first)
            assert (await slots.take("acme")).verdict.granted
        finally:
            await slots.close()

    asyncio.run(run())


def test_without_redis_slots_are_counted_in_the_replica() -> None:
    async def run() -> None:
        slots = QuerySlots(None, limit=1, lease_seconds=15)
        taken = await slots.take("acme")
        assert taken.verdict.granted
        assert not (await slots.take("acme")).verdict.granted
        assert (await slots.take("other")).verdict.granted
        await slots.give_back(taken)
        assert (await slots.take("acme")).verdict.granted
        assert slots.last_error is None

    asyncio.run(run())
