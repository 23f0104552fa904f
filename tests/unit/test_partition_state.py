from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.event_time import Hopping, Session, Tumbling
from core.partition_state import (
    PartitionState,
    ProcessingConfig,
    RecordRef,
    WindowDef,
    WindowResult,
    parse_window,
)

S = 1000
MIN = 60 * S
T0 = 1_795_931_400_000  # a minute boundary

CONFIG = ProcessingConfig(
    windows=(parse_window("1m"), parse_window("5m/1m")),
    allowed_lateness_ms=5 * S,
    idle_timeout_ms=30 * S,
    dedup_horizon_ms=10 * MIN,
)
DISTINCT = replace(CONFIG, distinct="event_id", quantiles=True)


def rec(
    offset: int,
    ts: int,
    event_id: str | None = None,
    value: float = 1,
    type_: str = "click",
    tenant: str = "acme",
    arrival: int | None = None,
) -> RecordRef:
    event = {
        "event_id": event_id or f"e{offset}",
        "source": "api",
        "tenant": tenant,
        "type": type_,
        "ts": ts,
        "value": value,
    }
    return RecordRef(offset, f"{tenant}:x".encode(), orjson.dumps(event), arrival)


def one_minute(results: list[WindowResult]) -> list[tuple[int, int, float]]:
    return [(r.start - T0, r.count, r.sum) for r in results if r.window == "1m"]


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("1m", Tumbling(MIN)),
        ("5m/1m", Hopping(5 * MIN, MIN)),
        ("session:30s", Session(30 * S)),
        ("250ms", Tumbling(250)),
        ("2h", Tumbling(7_200_000)),
    ],
)
def test_parse_window(text: str, spec: Any) -> None:
    assert parse_window(text) == WindowDef(text, spec)


@pytest.mark.parametrize("text", ["", "1x", "0m", "m", "5m/", "session:", "-1m"])
def test_parse_window_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_window(text)


def test_a_batch_closes_windows_dedups_and_dead_letters() -> None:
    state = PartitionState(3, CONFIG)
    out = state.process(
        [
            rec(0, T0 + S, value=2),
            rec(1, T0 + 2 * S, value=3),
            rec(2, T0 + S, "e0"),
            RecordRef(3, None, b"{broken"),
            rec(4, T0 + MIN + 10 * S, value=4),
        ]
    )
    assert out.duplicates == 1
    assert [(ref.offset, reason[:8]) for ref, reason in out.rejected] == [(3, "not JSON")]
    assert out.processed == 3
    # The watermark is 1m10s - 5s: the minute [0, 1m) and the hop [-4m, 1m) have closed.
    assert out.closed == [
        WindowResult("1m", 3, "acme", "click", T0, T0 + MIN, 2, 5.0, 2.0, 3.0),
        WindowResult("5m/1m", 3, "acme", "click", T0 - 4 * MIN, T0 + MIN, 2, 5.0, 2.0, 3.0),
    ]
    assert state.next_offset == 5
    late = state.process([rec(5, T0 + 30 * S), rec(6, T0 + MIN + 20 * S)])
    assert [r.offset for r in late.late] == [5]
    assert late.processed == 1


def test_a_partition_the_broker_has_nothing_more_for_closes_on_the_clock() -> None:
    state = PartitionState(0, CONFIG)
    assert state.process([rec(0, T0 + S, arrival=T0 + 2 * S)]).closed == []
    state.watermark.at_end(T0 + 3 * S)
    state.watermark.at_end(T0 + 32 * S)  # at the end, but not for 30 s yet
    assert state.tick() == ([], [])
    state.watermark.at_end(T0 + 10 * MIN)  # at the end for 30 s and more: idle
    closed, _alerts = state.tick()
    assert one_minute(closed) == [(0, 1, 1.0)]
    assert {r.window for r in closed} == {"1m", "5m/1m"}


def test_a_paused_worker_moves_no_watermark() -> None:
    """Time passing without data (GC, a slow sink, SIGSTOP) closes nothing; only the
    broker saying, twice an idle timeout apart, that there is nothing more does."""
    state = PartitionState(0, CONFIG)
    state.process([rec(0, T0 + S, arrival=T0 + 2 * S)])
    state.watermark.at_end(T0 + 3 * S)
    # ... the worker stops for ten minutes; records arrive meanwhile
    state.watermark.not_at_end()
    state.watermark.at_end(T0 + 10 * MIN)
    assert state.tick() == ([], [])
    out = state.process([rec(1, T0 + 20 * S, arrival=T0 + 21 * S)])  # the backlog
    assert (out.processed, out.late) == (1, [])


def test_open_windows_are_visible() -> None:
    state = PartitionState(0, CONFIG)
    state.process([rec(0, T0 + S, value=7)])
    assert one_minute(state.open_windows()) == [(0, 1, 7.0)]


def test_restore_and_rebuild_continue_exactly() -> None:
    records = [rec(i, T0 + i * 7 * S, value=i) for i in range(40)]
    records += [rec(40, T0 + 3 * S, "e3")]  # a duplicate of offset 3
    whole = PartitionState(0, CONFIG)
    expected = whole.process(records)

    first = PartitionState(0, CONFIG)
    got = first.process(records[:20]).closed
    snap = orjson.loads(orjson.dumps(first.snapshot()))
    again = PartitionState.restore(CONFIG, snap)
    assert snap["dedup_from"] == 0
    again.rebuild_dedup(records[snap["dedup_from"] : snap["next_offset"]])
    rest = again.process(records[20:])
    assert rest.duplicates == 1
    assert sorted(got + rest.closed, key=repr) == sorted(expected.closed, key=repr)


@settings(max_examples=50)
@given(
    # within the dedup horizon, so that every repeated id is caught
    st.lists(st.tuples(st.integers(0, 9 * MIN), st.integers(0, 60)), min_size=1, max_size=120),
    st.integers(1, 10),
)
def test_nothing_lost_nothing_twice_whatever_the_batching(
    events: list[tuple[int, int]], batch: int
) -> None:
    records = [rec(i, T0 + ts, f"id{eid}") for i, (ts, eid) in enumerate(events)]
    state = PartitionState(0, CONFIG)
    closed: list[WindowResult] = []
    late = dupes = 0
    for i in range(0, len(records), batch):
        out = state.process(records[i : i + batch])
        closed += out.closed
        late += len(out.late)
        dupes += out.duplicates
    state.watermark.progress = T0 + 10**9  # past everything
    closed += state.tick()[0]
    counted = sum(r.count for r in closed if r.window == "1m")
    assert counted + late + dupes == len(records)
    assert dupes == len(records) - len({eid for _, eid in events})
    hopping = sum(r.count for r in closed if r.window == "5m/1m")
    assert hopping == 5 * counted


class Reference:
    """The per-record oracle: orjson, the dedup filter and WindowOperator.add, one
    event at a time, the way the pipeline worked before it was vectorised."""

    def __init__(self, config: ProcessingConfig) -> None:
        self.state = PartitionState(0, config)

    def process(self, records: list[RecordRef]) -> tuple[int, int, list[int]]:
        st = self.state
        events = [dict(orjson.loads(r.value or b""), _offset=r.offset) for r in records]
        fresh, dupes = st.dedup.split(events, [e["_offset"] for e in events])
        mark = st.watermark.of("acme")
        on_time, late = [], []
        for e in fresh:
            if any(op.is_late(e["ts"], mark) for op in st.operators.values()):
                late.append(e["_offset"])
            else:
                on_time.append(e)
        for op in st.operators.values():
            op.add(on_time, lambda e: (e["tenant"], e["type"]), mark)
        newest = max(e["ts"] for e in events)
        st.watermark.observe({"acme": (newest, newest)})
        st.next_offset = records[-1].offset + 1
        return len(on_time), len(dupes), late


def _plain(results: list[WindowResult]) -> list[WindowResult]:
    return sorted((replace(r, distinct=None, quantiles=None) for r in results), key=repr)


@settings(max_examples=60)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 9 * MIN),
            st.integers(0, 40),
            st.integers(-5, 5),
            st.sampled_from(["click", "view"]),
        ),
        min_size=1,
        max_size=80,
    ),
    st.integers(1, 30),
)
def test_the_vectorised_batch_agrees_with_a_per_record_reference(
    events: list[tuple[int, int, int, str]], batch: int
) -> None:
    records = [
        rec(i, T0 + ts, f"id{eid}", value, type_)
        for i, (ts, eid, value, type_) in enumerate(events)
    ]
    fast, slow = PartitionState(0, CONFIG), Reference(CONFIG)
    for i in range(0, len(records), batch):
        chunk = records[i : i + batch]
        a = fast.process(chunk)
        processed, dupes, late = slow.process(chunk)
        assert (a.processed, a.duplicates, [r.offset for r in a.late]) == (processed, dupes, late)
        assert _plain(a.closed) == _plain(slow.state.tick()[0])
    assert _plain(fast.open_windows()) == _plain(slow.state.open_windows())
    fast_snap, slow_snap = fast.snapshot(), slow.state.snapshot()
    del fast_snap["windows"], slow_snap["windows"]
    assert fast_snap == slow_snap


@settings(max_examples=30)
@given(
    st.lists(
        st.tuples(st.integers(0, 9 * MIN), st.integers(0, 40), st.integers(-5, 5)),
        min_size=1,
        max_size=60,
    ),
    st.integers(1, 30),
)
def test_the_per_record_decoder_gives_what_the_arrow_decoder_gives(
    events: list[tuple[int, int, int]], batch: int
) -> None:
    records = [rec(i, T0 + ts, f"id{eid}", value) for i, (ts, eid, value) in enumerate(events)]
    fast, slow = PartitionState(0, DISTINCT), PartitionState(0, DISTINCT)
    for i in range(0, len(records), batch):
        chunk = records[i : i + batch]
        a = fast.process(chunk)
        with pytest.MonkeyPatch.context() as m:
            m.setattr("core.batch.decode_json", lambda _values, _layout: None)
            b = slow.process(chunk)
        assert (a.processed, a.duplicates, a.late, a.closed) == (
            b.processed,
            b.duplicates,
            b.late,
            b.closed,
        )
    assert fast.snapshot() == slow.snapshot()


@pytest.mark.parametrize(
    "value",
    [
        b"{broken",
        b'{"event_id": 5, "source": "a", "tenant": "t", "type": "x", "ts": 1, "value": 1}',
        b'{"event_id": "a", "tenant": "t", "type": "x", "ts": 1.5, "value": 1}',
        b'{"event_id": "a", "tenant": "t", "type": "x", "ts": 1, "value": true}',
        b'{"event_id": "a", "tenant": "t", "type": "x", "ts": 1}',
        b"[]",
    ],
)
def test_one_bad_record_sends_the_batch_down_the_per_record_path(value: bytes) -> None:
    state = PartitionState(0, CONFIG)
    out = state.process([rec(0, T0), RecordRef(1, None, value), rec(2, T0 + 1)])
    assert out.processed == 2
    assert [ref.offset for ref, _reason in out.rejected] == [1]


def test_a_record_spanning_lines_is_still_read() -> None:
    pretty = b'{"event_id": "a",\n "tenant": "t", "type": "x", "ts": 1, "value": 1}'
    out = PartitionState(0, CONFIG).process([rec(0, T0), RecordRef(1, None, pretty)])
    assert (out.processed, out.rejected) == (2, [])


def test_a_snapshot_from_other_group_by_settings_is_regrouped() -> None:
    by_site = replace(CONFIG, group_by=("site",))
    before = PartitionState(0, CONFIG)
    before.process([rec(0, T0 + S, value=2), rec(1, T0 + 2 * S, value=3)])
    after = PartitionState.restore(by_site, orjson.loads(orjson.dumps(before.snapshot())))
    (minute,) = [r for r in after.open_windows() if r.window == "1m"]
    assert (minute.dims, minute.count, minute.sum) == ((("site", ""),), 2, 5.0)
    back = PartitionState.restore(CONFIG, after.snapshot())
    assert one_minute(back.open_windows()) == [(0, 2, 5.0)]


def test_one_tenants_clock_makes_no_other_tenant_late() -> None:
    """A tenant stamping events minutes ahead (within the allowed skew) moves its own
    watermark no further than their arrival, and never another tenant's."""
    state = PartitionState(0, CONFIG)
    now = T0 + 30 * MIN
    ahead = state.process([rec(0, now + 4 * MIN, tenant="fast", arrival=now)])
    assert ahead.processed == 1
    assert ahead.rejected == []
    out = state.process(
        [
            rec(1, now - 2 * S, tenant="slow", arrival=now + S),
            rec(2, now - 1 * S, tenant="fast", arrival=now + S),  # its own: not late either
        ]
    )
    assert (out.processed, out.late) == (2, [])
    assert state.watermark.of("fast") == now - 5 * S  # capped at its arrival, not 4 min on


def test_an_event_stamped_too_far_ahead_is_refused_as_future() -> None:
    state = PartitionState(0, CONFIG)
    now = T0 + 30 * MIN
    out = state.process(
        [
            rec(0, now + 301 * S, arrival=now),
            rec(1, now - S, tenant="other", arrival=now),
        ]
    )
    assert [(r.offset, reason) for r, reason in out.rejected] == [(0, "future")]
    assert out.processed == 1
    assert state.watermark.of("acme") == now - 5 * S  # the base: the refused event moved nothing
    assert state.process([rec(2, now - 3 * S, arrival=now + S)]).late == []


def test_a_restored_partition_reads_its_backlog_on_time() -> None:
    """After a restart, however long the worker was away, the backlog is judged by the
    checkpointed watermark and the broker's time of each record, not the clock."""
    state = PartitionState(0, CONFIG)
    state.process([rec(i, T0 + i * S, arrival=T0 + i * S + 300) for i in range(10)])
    again = PartitionState.restore(CONFIG, orjson.loads(orjson.dumps(state.snapshot())))
    backlog = [rec(i, T0 + i * S, arrival=T0 + i * S + 900) for i in range(10, 70)]
    out = again.process(backlog)
    assert (out.processed, out.late) == (60, [])
    assert one_minute(out.closed) == [(0, 60, 60.0)]  # the minute [0, 1m) closed whole


def test_a_tenant_behind_the_others_keeps_its_windows_open() -> None:
    """A source that delivers its tenant's events 30 s after they happen (say, a poller)
    shares a partition with a tenant sending live: neither makes the other late."""
    state = PartitionState(0, CONFIG)
    for second in range(0, 120, 2):
        at = T0 + second * S
        out = state.process(
            [
                rec(2 * second, at, tenant="live", arrival=at + 100),
                rec(2 * second + 1, at - 30 * S, tenant="polled", arrival=at + 100),
            ]
        )
        assert out.late == []
        assert out.processed == 2
