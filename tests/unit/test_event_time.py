from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.event_time import (
    Agg,
    Hopping,
    Lateness,
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


def marks(**tenants: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """One batch as the watermark sees it: per tenant (newest capped ts, newest arrival)."""
    return dict(tenants)


def test_watermark_follows_each_tenants_events() -> None:
    mark = PartitionWatermark(Lateness(5 * S), idle_timeout_ms=10 * S)
    assert (mark.base("x"), mark.of("a"), mark.low()) == (None, None, None)
    mark.observe(marks(a=(100 * S, 101 * S), b=(60 * S, 101 * S)))
    mark.observe(marks(a=(90 * S, 102 * S)))  # out of order: a's mark stays
    assert (mark.of("a"), mark.of("b")) == (95 * S, 55 * S)
    assert mark.low() == 55 * S
    assert mark.of("never-seen") == mark.base("x") == 97 * S  # progress 102 s - lateness


def test_a_tenant_quiet_for_the_idle_timeout_takes_the_base() -> None:
    mark = PartitionWatermark(Lateness(5 * S), idle_timeout_ms=10 * S)
    mark.observe(marks(a=(50 * S, 100 * S), b=(99 * S, 100 * S)))
    mark.observe(marks(b=(108 * S, 109 * S)))
    assert mark.of("a") == 45 * S  # 9 s of progress without a: not idle yet
    mark.observe(marks(b=(110 * S, 110 * S)))
    assert mark.of("a") == 105 * S  # idle: the base
    mark.forget_idle()
    assert set(mark.tenants) == {"b"}
    assert mark.of("a") == 105 * S


def test_time_without_data_moves_nothing() -> None:
    """A pause of the worker (GC, SIGSTOP, a restart) is not idleness."""
    mark = PartitionWatermark(Lateness(5 * S), idle_timeout_ms=10 * S)
    mark.observe(marks(a=(100 * S, 100 * S)))
    mark.at_end(101 * S)
    mark.not_at_end()  # records arrived while the worker was stopped
    mark.at_end(1000 * S)
    assert mark.of("a") == 95 * S
    mark.at_end(1009 * S)
    assert mark.of("a") == 95 * S  # at the end, but not for 10 s yet
    mark.at_end(1010 * S)
    assert mark.of("a") == mark.base("x") == 1005 * S  # the broker said so for 10 s
    mark.observe(marks(a=(200 * S, 1011 * S)))  # far behind: the mark holds
    assert mark.of("a") == 1005 * S


def test_new_data_ends_an_idle_spell() -> None:
    mark = PartitionWatermark(Lateness(5 * S), idle_timeout_ms=10 * S)
    mark.at_end(0)
    mark.observe(marks(a=(5 * S, 5 * S)))
    mark.at_end(10 * S)
    assert mark.base("x") == 0  # progress is the data's, not the clock's
    mark.at_end(20 * S)
    assert mark.base("x") == 15 * S


def test_a_partition_without_data_gets_a_watermark_once_the_broker_says_it_is_empty() -> None:
    mark = PartitionWatermark(Lateness(5 * S), idle_timeout_ms=10 * S)
    mark.at_end(100 * S)
    assert mark.low() is None
    mark.at_end(110 * S)
    assert mark.low() == 105 * S


def test_tenants_beyond_the_cap_are_let_go_quietest_first() -> None:
    mark = PartitionWatermark(Lateness(5 * S), idle_timeout_ms=10**9, max_tenants=3)
    for i, tenant in enumerate("abcde"):
        mark.observe({tenant: (i * S, 100 * S + i)})
    assert set(mark.tenants) == {"c", "d", "e"}
    assert mark.of("a") == mark.base("x")


@pytest.mark.parametrize(
    "saved",
    [
        [100 * S, 7, 95 * S],  # [max ts, wall clock, floor] before per-tenant marks
        [100 * S, 7],
    ],
)
def test_an_old_snapshot_restores_its_watermark_as_the_base(saved: list[int]) -> None:
    mark = PartitionWatermark(Lateness(5 * S), idle_timeout_ms=10 * S)
    mark.restore(saved)
    assert mark.base("x") == 95 * S


def test_a_snapshot_restores_every_mark_but_not_an_idle_spell() -> None:
    mark = PartitionWatermark(Lateness(5 * S), idle_timeout_ms=10 * S)
    mark.observe(marks(a=(100 * S, 100 * S), b=(80 * S, 100 * S)))
    mark.at_end(101 * S)
    again = PartitionWatermark(Lateness(5 * S), idle_timeout_ms=10 * S)
    again.restore(orjson.loads(orjson.dumps(mark.snapshot())))
    assert (again.of("a"), again.of("b"), again.base("x")) == (95 * S, 75 * S, 95 * S)
    again.at_end(111 * S)  # the broker must say so again after a restart
    assert again.base("x") == 95 * S


steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("batch"),
            st.dictionaries(
                st.sampled_from("abcd"),
                st.tuples(st.integers(0, 600), st.integers(0, 600)),
                min_size=1,
            ),
        ),
        st.tuples(st.just("at_end"), st.integers(0, 900)),
        st.tuples(st.just("not_at_end"), st.none()),
        st.tuples(st.just("forget"), st.none()),
    ),
    max_size=40,
)


@given(steps, st.integers(1, 4))
def test_no_watermark_ever_goes_back(script: list[tuple[str, Any]], cap: int) -> None:
    mark = PartitionWatermark(Lateness(5 * S), idle_timeout_ms=30 * S, max_tenants=cap)
    before: dict[str, int | None] = dict.fromkeys("abcd")
    low = None
    for step, arg in script:
        if step == "batch":
            mark.observe({t: (min(ts, arr) * S, arr * S) for t, (ts, arr) in arg.items()})
        elif step == "at_end":
            mark.at_end(arg * S)
        elif step == "not_at_end":
            mark.not_at_end()
        else:
            mark.forget_idle()
        for tenant, was in before.items():
            now = mark.of(tenant)
            assert was is None or (now is not None and now >= was)
            before[tenant] = now
        assert low is None or (mark.low() or low) >= low
        low = mark.low()
        assert len(mark.tenants) <= cap


def test_windows_close_per_tenant() -> None:
    op = WindowOperator(Tumbling(MIN))
    op.add([ev(10 * S, key="a"), ev(20 * S, key="b")], by_key, None)
    wm = {"a": 2 * MIN, "b": 30 * S}
    assert [w.group for w in op.close_until(wm.__getitem__, active=wm)] == [("a",)]
    assert [w.group for w in op.open_windows()] == [("b",)]
    wm["b"] = 2 * MIN
    assert [w.group for w in op.close_until(wm.__getitem__, active=wm)] == [("b",)]


def test_a_tenant_behind_the_base_keeps_its_own_closing_point() -> None:
    """A tenant still active but behind the partition's base, with no open pane left,
    must not be taken for one that is up to the base: its next windows still count."""
    op = WindowOperator(Hopping(5 * MIN, MIN))
    op.add([ev(10 * S, key="a")], by_key, None)
    assert len(op.close_until({"a": 5 * MIN}.__getitem__, lambda _t: None, ["a"])) == 5
    others = {"a": 10 * MIN}.get  # what the base said of a tenant not active then
    assert len(op) == 0
    op.add([ev(5 * MIN + 10 * S, key="a")], by_key, None)
    windows = op.close_until({"a": 11 * MIN}.__getitem__, others, ["a"])
    assert [(w.start, w.agg.count) for w in windows] == [
        (start * MIN, 1) for start in (1, 2, 3, 4, 5)
    ]


@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(0, 12 * MIN), st.integers(0, 3 * MIN)),
        max_size=60,
    ),
    st.integers(1, 8),
    st.integers(1, 3),
)
@settings(max_examples=300)
def test_per_tenant_closing_hands_out_each_window_once_and_whole(
    stream: list[tuple[str, int, int]], batch: int, cap: int
) -> None:
    """Tenants advance at their own pace (a hopping window of five hops): every window is
    handed out once, and the hopping counts add up to what a per-tenant oracle gives."""
    lateness = 5 * S
    mark = PartitionWatermark(Lateness(lateness), idle_timeout_ms=90 * S, max_tenants=cap)
    op = WindowOperator(Hopping(5 * MIN, MIN))
    seen: set[tuple[Any, int]] = set()
    counted: dict[tuple[Any, int], int] = {}
    oracle: dict[tuple[Any, int], int] = {}
    arrival = 0
    for i in range(0, len(stream), batch):
        chunk = stream[i : i + batch]
        tenants = {t for t, _ts, _delay in chunk}
        before = {t: mark.of(t) for t in tenants}
        fresh = []
        for tenant, ts, delay in chunk:
            arrival = max(arrival, ts + delay)
            if not op.is_late(ts, before[tenant]):
                fresh.append(ev(ts, key=tenant))
                closed_at = before[tenant]
                for start in Hopping(5 * MIN, MIN).starts(ts):
                    if closed_at is None or start + 5 * MIN > closed_at:
                        oracle[(tenant, start)] = oracle.get((tenant, start), 0) + 1
        op.add(fresh, by_key, None)
        mark.observe({t: (max(ts for tt, ts, _ in chunk if tt == t), arrival) for t in tenants})
        for w in op.close_until(mark.of, mark.since, mark.tenants):
            key = (w.group[0], w.start)
            assert key not in seen
            seen.add(key)
            counted[key] = w.agg.count
        mark.closed()
        mark.forget_idle()
    for w in op.close_until(lambda _tenant: 10**12, mark.since, mark.tenants):
        key = (w.group[0], w.start)
        assert key not in seen
        counted[key] = w.agg.count
    assert counted == oracle


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
