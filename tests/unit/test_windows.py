from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.windows import Partial, fold_tumbling, merge_partials, window_start

MINUTE = 60_000


def ev(tenant: str, type_: str, ts: int, value: float = 1) -> dict[str, Any]:
    return {"tenant": tenant, "type": type_, "ts": ts, "value": value}


@pytest.mark.parametrize(
    ("ts", "size", "start"),
    [
        (0, MINUTE, 0),
        (59_999, MINUTE, 0),
        (60_000, MINUTE, 60_000),
        (1_795_931_412_345, MINUTE, 1_795_931_400_000),
        (7_200_001, 3_600_000, 7_200_000),
    ],
)
def test_window_start(ts: int, size: int, start: int) -> None:
    assert window_start(ts, size) == start


def test_fold_counts_and_sums_per_tenant_type_window() -> None:
    partials = fold_tumbling(
        [
            ev("a", "x", 1_000, 2),
            ev("a", "x", 59_000, 3),
            ev("a", "x", 60_000, 4),
            ev("a", "y", 1_000, 5),
            ev("b", "x", 1_000, 6),
        ],
        MINUTE,
    )
    assert partials == {
        ("a", "x", 0): Partial(2, 5),
        ("a", "x", 60_000): Partial(1, 4),
        ("a", "y", 0): Partial(1, 5),
        ("b", "x", 0): Partial(1, 6),
    }


def test_fold_rejects_a_non_positive_window() -> None:
    with pytest.raises(ValueError, match="positive"):
        fold_tumbling([], 0)


events = st.lists(
    st.builds(
        ev,
        st.sampled_from(["a", "b"]),
        st.sampled_from(["x", "y"]),
        st.integers(0, 10 * MINUTE),
        st.integers(-100, 100),
    ),
    max_size=200,
)


@given(events, events)
def test_partials_of_batches_merge_to_the_partials_of_the_whole(
    first: list[dict[str, Any]], second: list[dict[str, Any]]
) -> None:
    merged = merge_partials(fold_tumbling(first, MINUTE), fold_tumbling(second, MINUTE))
    assert merged == fold_tumbling(first + second, MINUTE)


@given(events)
def test_no_event_lost_or_counted_twice(batch: list[dict[str, Any]]) -> None:
    partials = fold_tumbling(batch, MINUTE)
    assert sum(p.count for p in partials.values()) == len(batch)
    assert sum(p.sum for p in partials.values()) == sum(e["value"] for e in batch)
