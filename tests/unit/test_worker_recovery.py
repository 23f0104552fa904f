"""A worker restoring checkpoints that no longer fit the topic: fakes of Kafka's consumer,
the checkpoint store and the sinks, implementing the interfaces the worker uses."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import orjson
import pyarrow as pa
import pytest
from confluent_kafka import OFFSET_INVALID, TopicPartition

from actors import partition_worker
from actors.partition_worker import Outbox, PartitionWorker, WorkerConfig
from core.assignment import Assignment
from core.partition_state import PartitionState, ProcessingConfig, WindowResult, parse_window

TOPIC = "events.raw"
CONFIG = ProcessingConfig(
    windows=(parse_window("1m"),),
    allowed_lateness_ms=5_000,
    idle_timeout_ms=30_000,
    dedup_horizon_ms=600_000,
)
CLOSED = WindowResult("1m", 0, "acme", "order", 0, 60_000, 2, 3.0, 1.0, 2.0)


class Message:
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def error(self) -> None:
        return None

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"acme:e1"

    def value(self) -> bytes:
        return orjson.dumps(
            {
                "event_id": f"e{self._offset}",
                "tenant": "acme",
                "type": "order",
                "ts": 1_000,
                "value": 1,
            }
        )

    def timestamp(self) -> tuple[int, int]:
        return 1, 1_000


class Consumer:
    """Partition 0 of a topic holding offsets [low, high); ``highs`` replaces the high
    offset the broker reports, call after call (a topic cut while it is re-read)."""

    def __init__(
        self, low: int, high: int, committed: int = OFFSET_INVALID, highs: Sequence[int] = ()
    ) -> None:
        self.low, self.high, self.committed_offset = low, high, committed
        self._highs: Iterator[int] = iter(highs)
        self._position = -1001
        self.polls = 0

    def committed(self, tps: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition(TOPIC, 0, self.committed_offset)]

    def get_watermark_offsets(
        self, tp: TopicPartition, timeout: float = 0, cached: bool = False
    ) -> tuple[int, int]:
        self.high = next(self._highs, self.high)
        return self.low, self.high

    def assign(self, tps: list[TopicPartition]) -> None:
        offset = tps[0].offset
        # auto.offset.reset=earliest: an offset the partition does not hold reads from low
        self._position = offset if self.low <= offset <= self.high else self.low

    def unassign(self) -> None:
        self._position = -1001

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(TOPIC, 0, self._position)]

    def consume(self, count: int, timeout: float) -> list[Message]:
        self.polls += 1
        end = min(self._position + count, self.high)
        found = [Message(o) for o in range(self._position, end)]
        self._position = max(self._position, end)
        return found


class Store:
    """The checkpoint store: one row per partition, fenced by epoch, and topic ids."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[int, int, bytes]] = {}
        self.topic_ids: dict[int, str] = {}

    def load(self, topic: str, partition: int) -> tuple[int, int, bytes] | None:
        return self.rows.get(partition)

    def save(
        self,
        topic: str,
        epoch: int,
        snapshots: dict[int, tuple[int, bytes]],
        in_flight: Callable[[], None] | None = None,
    ) -> set[int]:
        saved = set()
        for p, (offset, blob) in snapshots.items():
            if p not in self.rows or self.rows[p][0] <= epoch:
                self.rows[p] = (epoch, offset, blob)
                saved.add(p)
        return saved

    def topic_id(self, topic: str, partition: int) -> str | None:
        return self.topic_ids.get(partition)

    def record_topic_id(self, topic: str, partitions: Sequence[int], topic_id: str) -> None:
        self.topic_ids.update(dict.fromkeys(partitions, topic_id))


class Sink:
    def __init__(self) -> None:
        self.windows: list[WindowResult] = []

    def write(self, results: Sequence[WindowResult]) -> int:
        self.windows.extend(results)
        return len(results)

    def write_events(self, table: pa.Table) -> int:
        return int(table.num_rows)


class Producer:
    def produce(self, *args: Any, **kwargs: Any) -> None:
        pass

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        return 0


def checkpoint(next_offset: int, dedup_from: int, epoch: int = 3) -> tuple[int, int, bytes]:
    """A saved snapshot at ``next_offset`` whose outbox holds one closed window."""
    snapshot = PartitionState(0, CONFIG, next_offset).snapshot()
    snapshot["dedup_from"] = dedup_from
    box = Outbox(closed=[CLOSED], raw=(dedup_from, next_offset, []))
    blob = orjson.dumps({"snapshot": snapshot, "outbox": box.to_json()})
    return epoch, next_offset, blob


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> PartitionWorker:
    """A worker of epoch 7 owning partition 0, its loop not running (the test drives
    recovery), seeing the topic under the id ``id-now``."""
    monkeypatch.setattr(partition_worker, "topic_id", lambda _bootstrap, _topic: "id-now")
    config = WorkerConfig("127.0.0.1:1", TOPIC, "events.dlq", "g", 100, 100, CONFIG, "dsn")
    made = PartitionWorker(config, Assignment(0, 7, ()), Sink(), clock=lambda: 1_800_000_000.0)
    made.stop()  # no partitions: the loop ended at once
    made._assignment = Assignment(0, 7, (0,))
    return made


def recover(worker: PartitionWorker, consumer: Consumer, store: Store) -> PartitionState:
    states = worker._recover(consumer, store, Producer())  # type: ignore[arg-type]
    return states[0]


def test_a_checkpoint_past_the_end_starts_fresh_and_says_so(worker: PartitionWorker) -> None:
    # The user's case: the topic was recreated (3 records so far); the checkpoint says 500.
    store, consumer = Store(), Consumer(0, 3)
    store.rows[0] = checkpoint(500, 450)
    started = time.monotonic()
    state = recover(worker, consumer, store)
    assert time.monotonic() - started < 5  # never waits for offsets that will not come
    assert state.next_offset == 0
    assert consumer.polls == 0  # nothing re-read from the new topic
    assert worker._sink.windows == []  # type: ignore[attr-defined]  # the outbox is discarded
    # The reset is durable: a restart finds the fresh snapshot, not the discarded one.
    epoch, offset, blob = store.rows[0]
    assert (epoch, offset) == (7, 0)
    assert orjson.loads(blob)["outbox"]["closed"] == []
    assert store.topic_ids == {0: "id-now"}
    (report,) = worker.stats()["checkpoint_resets"]
    assert report["action"] == "reset"
    assert (report["partition"], report["checkpoint_offset"], report["low"], report["high"]) == (
        0,
        500,
        0,
        3,
    )
    assert report["at"] == "2027-01-15T08:00:00+00:00"
    assert "started fresh at offset 0" in report["reason"]


def test_a_recreated_topic_that_grew_past_the_checkpoint_is_known_by_its_id(
    worker: PartitionWorker,
) -> None:
    store, consumer = Store(), Consumer(0, 5_000)
    store.rows[0] = checkpoint(500, 450)
    store.topic_ids[0] = "id-before"
    state = recover(worker, consumer, store)
    assert state.next_offset == 0
    assert worker.stats()["checkpoint_resets"][0]["action"] == "reset"
    assert store.topic_ids == {0: "id-now"}


def test_a_checkpoint_retention_passed_keeps_its_state_and_counts_the_gap(
    worker: PartitionWorker,
) -> None:
    store, consumer = Store(), Consumer(250, 300)
    store.rows[0] = checkpoint(100, 40)
    state = recover(worker, consumer, store)
    assert state.next_offset == 250
    assert worker._sink.windows == [CLOSED]  # type: ignore[attr-defined]  # outbox written
    (report,) = worker.stats()["checkpoint_resets"]
    assert (report["action"], report["skipped"], report["start_offset"]) == (
        "skip_to_low",
        150,
        250,
    )


def test_a_dedup_horizon_below_the_start_is_re_read_from_the_start(
    worker: PartitionWorker,
) -> None:
    store, consumer = Store(), Consumer(20, 300)
    store.rows[0] = checkpoint(30, 10)
    state = recover(worker, consumer, store)
    assert state.next_offset == 30
    assert len(state.dedup) == 10  # the ids of offsets 20..29, those still held
    assert worker.stats()["checkpoint_resets"][0]["action"] == "replay_from_low"


def test_a_checkpoint_that_fits_resumes_quietly(worker: PartitionWorker) -> None:
    store, consumer = Store(), Consumer(0, 300)
    store.rows[0] = checkpoint(30, 10)
    store.topic_ids[0] = "id-now"
    state = recover(worker, consumer, store)
    assert state.next_offset == 30
    assert len(state.dedup) == 20
    assert worker.stats()["checkpoint_resets"] == []


def test_a_committed_offset_past_the_end_starts_at_the_low_offset(
    worker: PartitionWorker,
) -> None:
    state = recover(worker, Consumer(0, 10, committed=800), Store())
    assert state.next_offset == 0
    (report,) = worker.stats()["checkpoint_resets"]
    assert report["action"] == "reset"
    assert "committed offset at offset 800" in report["reason"]


def test_a_replay_reads_only_what_the_topic_holds(worker: PartitionWorker) -> None:
    # Asked for far more than the topic has, and the topic cut to 5 while re-read.
    consumer = Consumer(0, 10, highs=[10, 5])
    started = time.monotonic()
    records = worker._replay(consumer, 0, 2, 1_000_000)
    assert time.monotonic() - started < 5
    assert [r.offset for r in records] == list(range(2, 10))
    assert worker._replay(Consumer(0, 0), 0, 400, 500) == []
