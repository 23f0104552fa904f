"""A checkpoint's effects are written on the effects thread while the worker folds the
next batches: with the fakes of ``test_worker_recovery``, a sink that holds its first
write shows what may and may not happen meanwhile."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest
from confluent_kafka import TopicPartition

from actors.partition_worker import PartitionWorker
from core.partition_state import PartitionState
from tests.unit.test_worker_recovery import CONFIG, TOPIC, Consumer, Producer, Sink, Store, worker

__all__ = ["worker"]  # the fixture, used by name below


class CommittingConsumer(Consumer):
    def __init__(self, low: int, high: int) -> None:
        super().__init__(low, high)
        self.commits: list[int] = []
        self.assign([TopicPartition(TOPIC, 0, low)])

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.commits += [tp.offset for tp in offsets]


class HeldSink(Sink):
    """Holds its first raw-event write until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.events_written: list[int] = []

    def write_events(self, table: pa.Table) -> int:
        self.entered.set()
        assert self.release.wait(10)
        self.events_written.append(table.num_rows)
        return int(table.num_rows)


@pytest.fixture
def effects() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown(wait=True)


def test_the_next_batches_fold_while_effects_are_written_and_the_next_snapshot_waits(
    worker: PartitionWorker, effects: ThreadPoolExecutor
) -> None:
    sink, store, consumer = HeldSink(), Store(), CommittingConsumer(0, 10)
    worker._sink = sink
    worker._states = {0: PartitionState(0, CONFIG, 0)}
    producer = Producer()

    worker._step(consumer.consume(5, 0))
    worker._flush(consumer, store, producer, None, effects)  # type: ignore[arg-type]
    assert store.rows[0][1] == 5  # the snapshot is saved before any effect
    assert sink.entered.wait(5)
    # Written, not yet acknowledged: nothing counts, commits or seals meanwhile.
    stats = worker.stats()
    assert (stats["batches"], stats["processed"], stats["events_written"]) == (0, 0, 0)
    assert consumer.commits == []
    assert worker.sealed_watermark() is None

    worker._step(consumer.consume(5, 0))  # the loop reads and folds on
    assert worker._states[0].next_offset == 10
    second = threading.Thread(target=worker._flush, args=(consumer, store, producer, None, effects))
    second.start()
    second.join(0.3)
    # The next snapshot waits for the effects before it: its outbox holds only its own.
    assert second.is_alive()
    assert store.rows[0][1] == 5

    sink.release.set()
    second.join(5)
    assert not second.is_alive()
    assert store.rows[0][1] == 10
    assert consumer.commits == [5]  # the first checkpoint's offsets, as they were then
    worker._settle(consumer, None, wait=True)
    assert consumer.commits == [5, 10]
    stats = worker.stats()
    assert stats["batches"] == 2
    assert stats["processed"] == 10
    assert stats["events_written"] == sum(sink.events_written) == 10
    assert worker.sealed_watermark() is not None


def test_a_failed_effect_is_raised_by_the_loop_and_nothing_of_it_counts(
    worker: PartitionWorker, effects: ThreadPoolExecutor
) -> None:
    class FailingSink(Sink):
        def write_events(self, table: pa.Table) -> int:
            raise RuntimeError("the owner actor died")

    store, consumer = Store(), CommittingConsumer(0, 5)
    worker._sink = FailingSink()
    worker._states = {0: PartitionState(0, CONFIG, 0)}
    worker._step(consumer.consume(5, 0))
    worker._flush(consumer, store, Producer(), None, effects)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="owner actor died"):
        worker._settle(consumer, None, wait=True)
    assert consumer.commits == []
    assert worker.stats()["processed"] == 0
    assert store.rows[0][1] == 5  # the snapshot (and its outbox) stays: a restart replays it
