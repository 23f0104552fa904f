from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.assignment import Assignment, assign_partitions


def test_round_robin_with_epoch() -> None:
    assert assign_partitions([3, 0, 2, 1], 2, epoch=7) == [
        Assignment(0, 7, (0, 2)),
        Assignment(1, 7, (1, 3)),
    ]


def test_more_workers_than_partitions_leaves_some_idle() -> None:
    owned = [a.partitions for a in assign_partitions([0, 1], 3, epoch=1)]
    assert owned == [(0,), (1,), ()]


@given(st.sets(st.integers(0, 500), max_size=64), st.integers(1, 20))
def test_each_partition_has_exactly_one_owner(partitions: set[int], workers: int) -> None:
    assignments = assign_partitions(sorted(partitions), workers, epoch=1)
    owned = [p for a in assignments for p in a.partitions]
    assert sorted(owned) == sorted(partitions)
    sizes = [len(a.partitions) for a in assignments]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("partitions", "workers", "message"),
    [([0, 1], 0, "at least one worker"), ([0, 0], 1, "distinct")],
)
def test_bad_requests(partitions: list[int], workers: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        assign_partitions(partitions, workers, epoch=1)
