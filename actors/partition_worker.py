"""PartitionWorker: owns some partitions of the raw topic and keeps their window state.

The worker reads with explicit assignment (no consumer-group rebalancing). For each
micro-batch it lets each partition's :class:`~core.partition_state.PartitionState`
decode, dedup and fold the records, then follows *snapshot before effect*:

1. save each changed partition's snapshot together with its outbox (the windows that
   closed, the records to dead-letter) in PostgreSQL, fenced by the owner's epoch;
2. write the outbox: closed windows to ClickHouse (idempotent per window and
   partition), rejected and late records to ``events.dlq``;
3. commit the offsets to Kafka, so that standard lag tools see the progress.

After a crash the worker restores each partition's snapshot, writes its outbox again,
re-reads the dedup horizon from Kafka to re-learn the event ids, and goes on from the
snapshot's offset: whatever happened, every event counts once. An owner whose epoch
is older than the snapshot's stops owning that partition (it was reassigned).
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, field
from functools import partial
from typing import Any, Protocol

import orjson
from confluent_kafka import OFFSET_INVALID, KafkaError, KafkaException, Producer, TopicPartition

from adapters.exceptions import StoreUnavailable
from adapters.kafka import Headers, make_consumer
from adapters.postgres import CheckpointStore
from core.assignment import Assignment
from core.partition_state import (
    BatchOutcome,
    PartitionState,
    ProcessingConfig,
    RecordRef,
    WindowResult,
)

log = logging.getLogger(__name__)


class WindowSink(Protocol):
    def write(self, results: Sequence[WindowResult]) -> int:
        """Store closed windows, idempotent per window and partition; return rows."""


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What a worker needs to know; built from the settings by ``cluster.deploy``."""

    bootstrap: str
    topic: str
    dlq_topic: str
    group_id: str
    batch_max_records: int
    batch_max_ms: int
    processing: ProcessingConfig
    checkpoint_dsn: str


@dataclass(slots=True)
class WorkerStats:
    processed: int = 0
    duplicates: int = 0
    late: int = 0
    rejected: int = 0
    windows_written: int = 0
    batches: int = 0
    sink_failures: int = 0
    fenced: list[int] = field(default_factory=list)
    last_error: str | None = None
    lag: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True)
class Outbox:
    """The effects of one batch of one partition, saved with its snapshot."""

    closed: list[WindowResult] = field(default_factory=list)
    dead_letters: list[tuple[RecordRef, str]] = field(default_factory=list)

    @classmethod
    def of(cls, outcome: BatchOutcome) -> Outbox:
        letters = list(outcome.rejected) + [(ref, "late") for ref in outcome.late]
        return cls(list(outcome.closed), letters)

    def to_json(self) -> dict[str, Any]:
        def b64(data: bytes | None) -> str | None:
            return None if data is None else base64.b64encode(data).decode()

        return {
            "closed": [list(astuple(r)) for r in self.closed],
            "dead_letters": [
                [ref.offset, b64(ref.key), b64(ref.value), reason]
                for ref, reason in self.dead_letters
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outbox:
        def unb64(text: str | None) -> bytes | None:
            return None if text is None else base64.b64decode(text)

        return cls(
            [WindowResult(*row) for row in data["closed"]],
            [
                (RecordRef(offset, unb64(key), unb64(value)), reason)
                for offset, key, value, reason in data["dead_letters"]
            ],
        )


class PartitionWorker:
    """The micro-batch loop, run in a background thread of its actor."""

    def __init__(
        self,
        config: WorkerConfig,
        assignment: Assignment,
        sink: WindowSink,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._assignment = assignment
        self._sink = sink
        self._clock = clock
        self._stats = WorkerStats()
        self._states: dict[int, PartitionState] = {}
        self._pending: list[WindowResult] = []  # closed, not yet acknowledged by the sink
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="partition-worker", daemon=True)
        self._thread.start()

    # Reports -------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            s = self._stats
            return {
                "worker": self._assignment.worker,
                "pid": os.getpid(),
                "epoch": self._assignment.epoch,
                "partitions": list(self._assignment.partitions),
                "alive": self._thread.is_alive(),
                "processed": s.processed,
                "duplicates": s.duplicates,
                "late": s.late,
                "dead_lettered": s.rejected + s.late,
                "windows_written": s.windows_written,
                "batches": s.batches,
                "sink_failures": s.sink_failures,
                "fenced": list(s.fenced),
                "last_error": s.last_error,
                "lag": dict(s.lag),
                "open_windows": sum(
                    len(op) for st in self._states.values() for op in st.operators.values()
                ),
            }

    def open_windows(
        self, tenant: str, type_: str, window: str, from_ms: int, to_ms: int
    ) -> list[WindowResult]:
        """Windows still open here, and closed ones the sink has not acknowledged yet."""
        with self._lock:
            candidates = [r for st in self._states.values() for r in st.open_windows()]
            candidates += self._pending
        return [
            r
            for r in candidates
            if r.tenant == tenant
            and r.type == type_
            and r.window == window
            and from_ms <= r.start < to_ms
        ]

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    # The loop -----------------------------------------------------------------

    def _run(self) -> None:
        """Run the loop; after any failure start over from the last snapshot."""
        if not self._assignment.partitions:
            return
        delay = 0.5
        while not self._stopping.is_set():
            try:
                self._consume_until_stopped()
                return
            except Exception as exc:  # report and start over; a worker never just vanishes
                log.exception("worker %s failed; restarting its loop", self._assignment.worker)
                with self._lock:
                    self._stats.last_error = f"loop restarted after: {exc}"
                self._stopping.wait(delay)
                delay = min(delay * 2, 10.0)

    def _consume_until_stopped(self) -> None:
        cfg = self._config
        consumer = make_consumer(cfg.bootstrap, cfg.group_id)
        dlq = Producer({"bootstrap.servers": cfg.bootstrap, "enable.idempotence": True})
        store = CheckpointStore(cfg.checkpoint_dsn)
        try:
            states = self._recover(consumer, store, dlq)
            with self._lock:
                self._states = states
            consumer.assign(
                [TopicPartition(cfg.topic, p, s.next_offset) for p, s in states.items()]
            )
            next_lag_at = 0.0
            while not self._stopping.is_set() and self._states:
                messages = consumer.consume(cfg.batch_max_records, cfg.batch_max_ms / 1000)
                self._step(messages, consumer, store, dlq)
                if time.monotonic() >= next_lag_at:
                    self._refresh_lag(consumer)
                    next_lag_at = time.monotonic() + 1.0
        finally:
            dlq.flush(10)
            consumer.close()
            store.close()

    def _step(
        self, messages: list[Any], consumer: Any, store: CheckpointStore, dlq: Producer
    ) -> None:
        by_partition: dict[int, list[RecordRef]] = defaultdict(list)
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    with self._lock:
                        self._stats.last_error = f"consume: {err}"
                continue
            by_partition[msg.partition()].append(RecordRef(msg.offset(), msg.key(), msg.value()))
        wall_ms = int(self._clock() * 1000)
        outboxes: dict[int, tuple[BatchOutcome, Outbox]] = {}
        with self._lock:
            for partition, state in self._states.items():
                refs = by_partition.get(partition)
                outcome = (
                    state.process(refs, wall_ms)
                    if refs
                    else BatchOutcome(closed=state.tick(wall_ms))
                )
                if refs or outcome.closed:
                    outboxes[partition] = (outcome, Outbox.of(outcome))
                    self._pending.extend(outcome.closed)
        if not outboxes:
            return
        saved = self._checkpoint(store, {p: box for p, (_o, box) in outboxes.items()})
        written = self._apply(saved, dlq)
        self._commit(consumer, [p for p in outboxes if by_partition.get(p)])
        with self._lock:
            self._pending.clear()
            s = self._stats
            s.batches += 1
            s.windows_written += written
            for outcome, _box in outboxes.values():
                s.processed += outcome.processed
                s.duplicates += outcome.duplicates
                s.late += len(outcome.late)
                s.rejected += len(outcome.rejected)

    # Snapshot, effects, commit -------------------------------------------------

    def _checkpoint(self, store: CheckpointStore, outboxes: dict[int, Outbox]) -> dict[int, Outbox]:
        """Save each partition's snapshot with its outbox; return the outboxes saved.

        A partition fenced by a newer epoch is dropped, and so is its outbox: an effect
        whose decision is not durable must not happen.
        """
        snapshots = {}
        for partition, box in outboxes.items():
            state = self._states[partition]
            blob = orjson.dumps({"snapshot": state.snapshot(), "outbox": box.to_json()})
            snapshots[partition] = (state.next_offset, blob)
        epoch = self._assignment.epoch
        saved = self._retry(partial(store.save, self._config.topic, epoch, snapshots))
        for partition in sorted(set(outboxes) - saved):
            self._give_up(
                partition, f"partition {partition} belongs to an epoch newer than {epoch}"
            )
        return {p: box for p, box in outboxes.items() if p in saved}

    def _give_up(self, partition: int, why: str) -> None:
        log.warning("worker %s gives up partition %s: %s", self._assignment.worker, partition, why)
        with self._lock:
            self._states.pop(partition, None)
            self._stats.fenced.append(partition)
            self._stats.last_error = why

    def _apply(self, boxes: dict[int, Outbox], dlq: Producer) -> int:
        closed = [r for box in boxes.values() for r in box.closed]
        written = self._retry(lambda: self._sink.write(closed)) if closed else 0
        for partition, box in boxes.items():
            for ref, reason in box.dead_letters:
                self._dead_letter(dlq, partition, ref, reason)
        if dlq.flush(30) > 0:
            raise StoreUnavailable("Kafka did not acknowledge the dead letters within 30 s")
        return written

    def _dead_letter(self, dlq: Producer, partition: int, ref: RecordRef, reason: str) -> None:
        # Keyed like the original record; the origin headers let a consumer of the
        # dead letters drop the copy that a replay after a crash may send again.
        headers: Headers = [
            ("reason", reason.encode()),
            ("stage", b"process"),
            ("origin.topic", self._config.topic.encode()),
            ("origin.partition", str(partition).encode()),
            ("origin.offset", str(ref.offset).encode()),
        ]
        dlq.produce(self._config.dlq_topic, ref.value, ref.key, headers=headers)
        dlq.poll(0)

    def _retry(self, action: Callable[[], Any]) -> Any:
        """Retry a sink or store call with backoff; nothing moves on until it succeeds."""
        delay = 0.1
        while True:
            try:
                return action()
            except StoreUnavailable as exc:
                with self._lock:
                    self._stats.sink_failures += 1
                    self._stats.last_error = str(exc)
                if self._stopping.wait(delay):
                    raise
                delay = min(delay * 2, 5.0)

    def _commit(self, consumer: Any, partitions: list[int]) -> None:
        offsets = [
            TopicPartition(self._config.topic, p, self._states[p].next_offset)
            for p in partitions
            if p in self._states
        ]
        if not offsets:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # The snapshot holds the truth; a missed commit only delays what lag tools see.
            with self._lock:
                self._stats.last_error = f"commit: {exc}"

    # Recovery ------------------------------------------------------------------

    def _recover(
        self, consumer: Any, store: CheckpointStore, dlq: Producer
    ) -> dict[int, PartitionState]:
        """Each owned partition's state: from its snapshot, or new at the committed offset."""
        cfg = self._config
        states: dict[int, PartitionState] = {}
        with self._lock:
            self._pending.clear()
        for partition in self._assignment.partitions:
            saved = self._retry(partial(store.load, cfg.topic, partition))
            if saved is None:
                states[partition] = PartitionState(
                    partition, cfg.processing, self._start_offset(consumer, partition)
                )
                continue
            epoch, _offset, blob = saved
            if epoch > self._assignment.epoch:
                self._give_up(partition, f"partition {partition} belongs to epoch {epoch}")
                continue
            data = orjson.loads(blob)
            state = PartitionState.restore(cfg.processing, data["snapshot"])
            self._apply({partition: Outbox.from_json(data["outbox"])}, dlq)
            start = data["snapshot"]["dedup_from"]
            state.rebuild_dedup(self._replay(consumer, partition, start, state.next_offset))
            states[partition] = state
        return states

    def _start_offset(self, consumer: Any, partition: int) -> int:
        tp = TopicPartition(self._config.topic, partition)
        (committed,) = consumer.committed([tp], timeout=30)
        if committed.offset != OFFSET_INVALID and committed.offset >= 0:
            return int(committed.offset)
        low, _high = consumer.get_watermark_offsets(tp, timeout=10)
        return int(low)

    def _replay(self, consumer: Any, partition: int, start: int, end: int) -> list[RecordRef]:
        """The records of ``partition`` in [start, end), read again from Kafka."""
        if start >= end:
            return []
        tp = TopicPartition(self._config.topic, partition, start)
        consumer.assign([tp])
        records: list[RecordRef] = []
        deadline = time.monotonic() + 300
        while consumer.position([tp])[0].offset < end:
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"re-reading partition {partition} from {start} timed out")
            for msg in consumer.consume(self._config.batch_max_records, 1.0):
                if msg.error() is None and msg.offset() < end:
                    records.append(RecordRef(msg.offset(), msg.key(), msg.value()))
        consumer.unassign()
        return records

    def _refresh_lag(self, consumer: Any) -> None:
        lag = {}
        with self._lock:
            positions = {p: s.next_offset for p, s in self._states.items()}
        for partition, position in positions.items():
            try:
                _low, high = consumer.get_watermark_offsets(
                    TopicPartition(self._config.topic, partition), timeout=1, cached=False
                )
            except KafkaException:
                continue
            lag[partition] = max(high - position, 0)
        with self._lock:
            self._stats.lag = lag
