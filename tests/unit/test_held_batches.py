"""Batches held back until their checkpoint: the outboxes of several batches of one
partition merge into one that replays the same effects, and the raw events of a
partition whose snapshot was refused (a newer epoch owns it) never leave."""

from __future__ import annotations

import pyarrow as pa
import pytest

from actors.partition_worker import HeldBatches, Outbox
from core.partition_state import BatchOutcome, RecordRef, WindowResult

W1 = WindowResult("1m", 0, "acme", "order", 0, 60_000, 2, 3.0, 1.0, 2.0)
W2 = WindowResult("1m", 0, "acme", "order", 60_000, 120_000, 1, 1.0, 1.0, 1.0)


def events(partitions: list[int]) -> pa.Table:
    return pa.table(
        {
            "event_id": [f"e{i}" for i in range(len(partitions))],
            "partition": pa.array(partitions, pa.uint16()),
        }
    )


@pytest.mark.parametrize(
    ("first", "later", "raw"),
    [
        ((10, 20, [12]), (20, 25, [21, 24]), (10, 25, [12, 21, 24])),
        (None, (20, 25, []), (20, 25, [])),  # a batch that only closed windows, then records
        ((10, 20, []), None, (10, 20, [])),
        (None, None, None),
    ],
)
def test_outboxes_of_consecutive_batches_merge_in_order(
    first: tuple[int, int, list[int]] | None,
    later: tuple[int, int, list[int]] | None,
    raw: tuple[int, int, list[int]] | None,
) -> None:
    late = RecordRef(13, b"k", b"{}")
    a = Outbox([W1], [(late, "late")], [{"alert_id": "a1"}], first)
    b = Outbox([W2], [], [{"alert_id": "a2"}], later)
    merged = a.then(b)
    assert merged.closed == [W1, W2]
    assert merged.dead_letters == [(late, "late")]
    assert [x["alert_id"] for x in merged.alerts] == ["a1", "a2"]
    assert merged.raw == raw
    # and it survives the snapshot's JSON like any outbox
    assert Outbox.from_json(merged.to_json()).raw == raw


def test_held_batches_are_due_after_the_interval_or_when_caught_up() -> None:
    held = HeldBatches()
    assert not held.due(100.0, 0, caught_up=True)  # nothing held: nothing to checkpoint
    held.add({0: (BatchOutcome(processed=1), Outbox(raw=(0, 1, [])))}, {0}, events([0]), 100.0)
    assert not held.due(101.0, 2000, caught_up=False)
    assert held.due(101.0, 2000, caught_up=True)
    assert held.due(102.0, 2000, caught_up=False)
    assert held.due(100.0, 0, caught_up=False)  # an interval of 0: every batch


def test_only_the_events_of_saved_partitions_are_written() -> None:
    held = HeldBatches()
    held.add({0: (BatchOutcome(), Outbox(raw=(0, 2, [])))}, {0}, events([0, 3]), 1.0)
    held.add({3: (BatchOutcome(), Outbox(raw=(5, 7, [])))}, {3}, events([3, 0, 3]), 2.0)
    assert held.batches == 2
    assert held.consumed == {0, 3}
    assert held.boxes[0].raw == (0, 2, [])
    assert held.boxes[3].raw == (5, 7, [])
    everything = held.events_of({0, 3})
    assert everything is not None
    assert everything.num_rows == 5
    only_zero = held.events_of({0})  # partition 3 was fenced at the checkpoint
    assert only_zero is not None
    assert only_zero["partition"].to_pylist() == [0, 0]
    assert HeldBatches().events_of({0}) is None
