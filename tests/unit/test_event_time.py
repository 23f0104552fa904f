from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.event_time import (
    Agg,
    Hopping,
    PartitionWatermark,
    Session,
    Tumbling,
    WindowOperator,
    WindowSpec,
)

S = 1000
MIN = 60 * S


def ev(ts: int, value: float = 1, key: str = "k") -> dict[str, Any]:
    return {"ts": ts, "value": value, "key": key}


def by_key(event: Mapping[str, Any]) -> tuple[str]:
    return (event["key"],)


def closed(op: WindowOperator, watermark: int) -> list[tuple[Any, int, int, int, float]]:
    return [(w.group[0], w.start, w.end, w.agg.count, w.agg.sum) for w in op.close_until(watermark)]


@pytest.mark.parametrize(
    ("ts", "starts"),
    [
        (0, [-4 * MIN, -3 * MIN, -2 * MIN, -MIN, 0]),
        (7 * MIN + 5, [3 * MIN, 4 * MIN, 5 * MIN, 6 * MIN, 7 * MIN]),
    ],
)
def test_hopping_assigns_size_over_hop_windows(ts: int, starts: list[int]) -> None:
    assert Hopping(5 * MIN, MIN).starts(ts) == starts


def test_hopping_rejects_a_hop_that_does_not_divide_the_size() -> None:
    with pytest.raises(ValueError, match="divides the size"):
        Hopping(5 * MIN, 2 * MIN)


def test_tumbling_windows_close_at_the_watermark_and_leave_memory() -> None:
    op = WindowOperator(Tumbling(MIN))
    assert op.add([ev(1 * S, 2), ev(59 * S, 3), ev(61 * S, 4)], by_key, None) == []
    assert len(op) == 2
    assert closed(op, 59 * S) == []
    assert closed(op, MIN) == [("k", 0, MIN, 2, 5.0)]
    assert len(op) == 1
    assert [(w.start, w.agg.count) for w in op.open_windows()] == [(MIN, 1)]


def test_an_event_whose_windows_closed_is_returned_as_late() -> None:
    op = WindowOperator(Tumbling(MIN))
    late = op.add([ev(10 * S), ev(70 * S)], by_key, watermark=MIN)
    assert late == [ev(10 * S)]
    assert closed(op, 2 * MIN) == [("k", MIN, 2 * MIN, 1, 1.0)]


def test_hopping_late_event_still_counts_in_its_open_windows() -> None:
    op = WindowOperator(Hopping(2 * MIN, MIN))
    assert op.close_until(2 * MIN) == []  # windows ending by 120 s are closed
    # ts 90 s lies in [0,120) and [60,180); at watermark 120 s only the second is open.
    assert op.add([ev(90 * S)], by_key, watermark=2 * MIN) == []
    assert [(w.start, w.end) for w in op.open_windows()] == [(MIN, 3 * MIN)]
    assert [(w.start, w.agg.count) for w in op.close_until(3 * MIN)] == [(MIN, 1)]


def test_hopping_windows_merge_their_panes_and_panes_leave_when_unused() -> None:
    op = WindowOperator(Hopping(3 * MIN, MIN))
    op.add([ev(10 * S, value=1), ev(70 * S, value=2), ev(130 * S, value=4)], by_key, None)
    assert len(op) == 3  # one pane per minute, not one entry per window
    spans = {(w.start // MIN, w.agg.count, w.agg.sum) for w in op.open_windows()}
    assert spans == {(-2, 1, 1.0), (-1, 2, 3.0), (0, 3, 7.0), (1, 2, 6.0), (2, 1, 4.0)}
    got = [(w.start // MIN, w.agg.sum) for w in op.close_until(3 * MIN)]
    assert got == [(-2, 1.0), (-1, 3.0), (0, 7.0)]
    assert len(op) == 2  # the first pane is in no open window any more
    assert [(w.start // MIN, w.agg.sum) for w in op.close_until(10 * MIN)] == [(1, 6.0), (2, 4.0)]
    assert len(op) == 0


def test_sessions_merge_within_the_gap_and_close_after_it() -> None:
    op = WindowOperator(Session(30 * S))
    op.add([ev(0), ev(20 * S), ev(100 * S), ev(45 * S, key="j")], by_key, None)
    # [0, 20 s] is one session; 100 s starts another; key j has its own.
    assert closed(op, 50 * S) == [("k", 0, 50 * S, 2, 2.0)]
    op.add([ev(110 * S)], by_key, watermark=50 * S)
    assert closed(op, 200 * S) == [("j", 45 * S, 75 * S, 1, 1.0), ("k", 100 * S, 140 * S, 2, 2.0)]
    assert len(op) == 0


def test_an_event_can_bridge_two_sessions() -> None:
    op = WindowOperator(Session(30 * S))
    op.add([ev(0), ev(50 * S), ev(25 * S)], by_key, None)
    assert closed(op, 10**9) == [("k", 0, 80 * S, 3, 3.0)]


def test_session_late_event() -> None:
    op = WindowOperator(Session(30 * S))
    assert op.add([ev(0)], by_key, watermark=30 * S) == [ev(0)]


def test_agg_keeps_min_max_avg() -> None:
    agg = Agg()
    for value in (3, -1, 7):
        agg.add(value)
    assert (agg.count, agg.sum, agg.min, agg.max, agg.avg) == (3, 9, -1, 7, 3.0)
    assert Agg().avg is None


@pytest.mark.parametrize("spec", [Tumbling(MIN), Hopping(2 * MIN, MIN), Session(20 * S)])
def test_snapshot_restores_the_same_windows(spec: WindowSpec) -> None:
    op = WindowOperator(spec)
    op.add([ev(1 * S, 5), ev(70 * S, 6, key="j"), ev(75 * S, -2)], by_key, None)
    data = orjson.loads(orjson.dumps(op.snapshot()))
    again = WindowOperator.restore(spec, data)
    assert closed(again, 10**9) == closed(op, 10**9)


def test_watermark_follows_events_then_the_clock_when_idle() -> None:
    mark = PartitionWatermark(allowed_lateness_ms=5 * S, idle_timeout_ms=10 * S)
    assert mark.current(wall_ms=0) is None
    mark.observe(max_ts=100 * S, wall_ms=1000 * S)
    mark.observe(max_ts=90 * S, wall_ms=1001 * S)  # out of order: the max stays
    assert mark.current(wall_ms=1005 * S) == 95 * S
    assert mark.current(wall_ms=1011 * S) == 1006 * S  # idle: wall clock - lateness


events = st.lists(
    st.builds(ev, st.integers(0, 20 * MIN), st.integers(-50, 50), st.sampled_from("abc")),
    max_size=150,
)


@given(events)
def test_tumbling_and_sessions_count_each_event_once(batch: list[dict[str, Any]]) -> None:
    for spec in (Tumbling(MIN), Session(45 * S)):
        op = WindowOperator(spec)
        assert op.add(batch, by_key, None) == []
        windows = op.close_until(10**12)
        assert sum(w.agg.count for w in windows) == len(batch)
        assert sum(w.agg.sum for w in windows) == sum(e["value"] for e in batch)


@given(events)
def test_hopping_counts_each_event_size_over_hop_times(batch: list[dict[str, Any]]) -> None:
    op = WindowOperator(Hopping(3 * MIN, MIN))
    op.add(batch, by_key, None)
    assert sum(w.agg.count for w in op.close_until(10**12)) == 3 * len(batch)


@given(events, st.integers(0, 20 * MIN))
def test_with_a_watermark_nothing_is_lost(batch: list[dict[str, Any]], watermark: int) -> None:
    op = WindowOperator(Tumbling(MIN))
    late = op.add(batch, by_key, watermark)
    counted = sum(w.agg.count for w in op.close_until(10**12))
    assert counted + len(late) == len(batch)
    assert all(e["ts"] - e["ts"] % MIN + MIN <= watermark for e in late)


def test_the_watermark_never_goes_back_after_an_idle_spell() -> None:
    mark = PartitionWatermark(allowed_lateness_ms=5 * S, idle_timeout_ms=10 * S)
    mark.observe(100 * S, wall_ms=0)
    assert mark.current(wall_ms=1 * S) == 95 * S
    assert mark.current(wall_ms=1000 * S) == 995 * S  # idle: follows the wall clock
    mark.observe(200 * S, wall_ms=1001 * S)  # an event far behind the wall clock
    assert mark.current(wall_ms=1002 * S) == 995 * S  # held, not back to 195 s
