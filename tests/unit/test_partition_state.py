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
    offset: int, ts: int, event_id: str | None = None, value: float = 1, type_: str = "click"
) -> RecordRef:
    event = {
        "event_id": event_id or f"e{offset}",
        "source": "api",
        "tenant": "acme",
        "type": type_,
        "ts": ts,
        "value": value,
    }
    return RecordRef(offset, b"acme:x", orjson.dumps(event))


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
        ],
        wall_ms=0,
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
    late = state.process([rec(5, T0 + 30 * S), rec(6, T0 + MIN + 20 * S)], wall_ms=1)
    assert [r.offset for r in late.late] == [5]
    assert late.processed == 1


def test_idle_partition_closes_on_the_clock() -> None:
    state = PartitionState(0, CONFIG)
    assert state.process([rec(0, T0 + S)], wall_ms=10 * S).closed == []
    assert state.tick(wall_ms=39 * S) == ([], [])  # not idle for 30 s yet
    closed, _alerts = state.tick(wall_ms=T0 + 10 * MIN)  # idle: wall clock moves the watermark
    assert one_minute(closed) == [(0, 1, 1.0)]
    assert {r.window for r in closed} == {"1m", "5m/1m"}


def test_open_windows_are_visible() -> None:
    state = PartitionState(0, CONFIG)
    state.process([rec(0, T0 + S, value=7)], wall_ms=0)
    assert one_minute(state.open_windows()) == [(0, 1, 7.0)]


def test_restore_and_rebuild_continue_exactly() -> None:
    records = [rec(i, T0 + i * 7 * S, value=i) for i in range(40)]
    records += [rec(40, T0 + 3 * S, "e3")]  # a duplicate of offset 3
    whole = PartitionState(0, CONFIG)
    expected = whole.process(records, wall_ms=0)

    first = PartitionState(0, CONFIG)
    got = first.process(records[:20], wall_ms=0).closed
    snap = orjson.loads(orjson.dumps(first.snapshot()))
    again = PartitionState.restore(CONFIG, snap)
    assert snap["dedup_from"] == 0
    again.rebuild_dedup(records[snap["dedup_from"] : snap["next_offset"]])
    rest = again.process(records[20:], wall_ms=0)
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
        out = state.process(records[i : i + batch], wall_ms=0)
        closed += out.closed
        late += len(out.late)
        dupes += out.duplicates
    closed += state.tick(wall_ms=T0 + 10**9)[0]
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

    def process(self, records: list[RecordRef], wall_ms: int) -> tuple[int, int, list[int]]:
        st = self.state
        events = [dict(orjson.loads(r.value or b""), _offset=r.offset) for r in records]
        fresh, dupes = st.dedup.split(events, [e["_offset"] for e in events])
        mark = st.watermark.current(wall_ms)
        on_time, late = [], []
        for e in fresh:
            if any(op.is_late(e["ts"], mark) for op in st.operators.values()):
                late.append(e["_offset"])
            else:
                on_time.append(e)
        for op in st.operators.values():
            op.add(on_time, lambda e: (e["tenant"], e["type"]), mark)
        st.watermark.observe(max(e["ts"] for e in events), wall_ms)
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
        a = fast.process(chunk, wall_ms=0)
        processed, dupes, late = slow.process(chunk, wall_ms=0)
        assert (a.processed, a.duplicates, [r.offset for r in a.late]) == (processed, dupes, late)
        assert _plain(a.closed) == _plain(slow.state.tick(wall_ms=0)[0])
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
        a = fast.process(chunk, wall_ms=0)
        with pytest.MonkeyPatch.context() as m:
            m.setattr("core.batch.decode_json", lambda _values, _layout: None)
            b = slow.process(chunk, wall_ms=0)
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
    out = state.process([rec(0, T0), RecordRef(1, None, value), rec(2, T0 + 1)], wall_ms=0)
    assert out.processed == 2
    assert [ref.offset for ref, _reason in out.rejected] == [1]


def test_a_record_spanning_lines_is_still_read() -> None:
    pretty = b'{"event_id": "a",\n "tenant": "t", "type": "x", "ts": 1, "value": 1}'
    out = PartitionState(0, CONFIG).process([rec(0, T0), RecordRef(1, None, pretty)], wall_ms=0)
    assert (out.processed, out.rejected) == (2, [])


def test_a_snapshot_from_other_group_by_settings_is_regrouped() -> None:
    by_site = replace(CONFIG, group_by=("site",))
    before = PartitionState(0, CONFIG)
    before.process([rec(0, T0 + S, value=2), rec(1, T0 + 2 * S, value=3)], wall_ms=0)
    after = PartitionState.restore(by_site, orjson.loads(orjson.dumps(before.snapshot())))
    (minute,) = [r for r in after.open_windows() if r.window == "1m"]
    assert (minute.dims, minute.count, minute.sum) == ((("site", ""),), 2, 5.0)
    back = PartitionState.restore(CONFIG, after.snapshot())
    assert one_minute(back.open_windows()) == [(0, 2, 5.0)]
