"""PartitionWorker: owns some partitions of the raw topic and folds them into windows.

The worker reads with explicit assignment (no consumer-group rebalancing), folds each
micro-batch into window partials, hands them to its sink, and commits the offsets of
the batch to Kafka only after the sink acknowledged. A restarted worker resumes from
the committed offsets; a replayed batch has the same deduplication token, so the
sink stores it once.

Records that cannot be decoded or lack the folded fields go to the dead-letter topic
with their topic, partition, offset and reason; they never stop the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from confluent_kafka import (
    OFFSET_INVALID,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from adapters.exceptions import StoreUnavailable
from adapters.kafka import Headers, make_consumer
from core.assignment import Assignment
from core.envelope import check_stored
from core.windows import Partial, WindowKey, fold_tumbling

log = logging.getLogger(__name__)


class WindowSink(Protocol):
    def write(self, window_seconds: int, partials: Mapping[WindowKey, Partial], token: str) -> int:
        """Store a block of partials, idempotent per token; return rows written."""


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What a worker needs to know; built from the settings by ``cluster.deploy``."""

    bootstrap: str
    topic: str
    dlq_topic: str
    group_id: str
    batch_max_records: int
    batch_max_ms: int
    window_seconds: int


@dataclass(slots=True)
class WorkerStats:
    processed: int = 0
    dead_lettered: int = 0
    windows_written: int = 0
    batches: int = 0
    sink_failures: int = 0
    last_error: str | None = None
    next_offset: dict[int, int] = field(default_factory=dict)
    lag: dict[int, int] = field(default_factory=dict)


class PartitionWorker:
    """The micro-batch loop, run in a background thread of its actor."""

    def __init__(
        self,
        config: WorkerConfig,
        assignment: Assignment,
        sink: WindowSink,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._assignment = assignment
        self._sink = sink
        self._clock = clock
        self._stats = WorkerStats()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="partition-worker", daemon=True)
        self._thread.start()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            s = self._stats
            return {
                "worker": self._assignment.worker,
                "epoch": self._assignment.epoch,
                "partitions": list(self._assignment.partitions),
                "alive": self._thread.is_alive(),
                "processed": s.processed,
                "dead_lettered": s.dead_lettered,
                "windows_written": s.windows_written,
                "batches": s.batches,
                "sink_failures": s.sink_failures,
                "last_error": s.last_error,
                "lag": dict(s.lag),
            }

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    # The loop -----------------------------------------------------------------

    def _run(self) -> None:
        """Run the loop; after any failure start over from the committed offsets."""
        if not self._assignment.partitions:
            return
        delay = 0.5
        while not self._stopping.is_set():
            try:
                self._consume_until_stopped()
                return
            except Exception as exc:  # report and start over; a worker never just vanishes
                log.exception(
                    "partition worker %s failed; restarting its loop", self._assignment.worker
                )
                with self._lock:
                    self._stats.last_error = f"loop restarted after: {exc}"
                self._stopping.wait(delay)
                delay = min(delay * 2, 10.0)

    def _consume_until_stopped(self) -> None:
        cfg = self._config
        consumer = make_consumer(cfg.bootstrap, cfg.group_id)
        dlq = Producer({"bootstrap.servers": cfg.bootstrap, "enable.idempotence": True})
        try:
            self._start_positions(consumer)
            next_lag_at = 0.0
            while not self._stopping.is_set():
                messages = consumer.consume(cfg.batch_max_records, cfg.batch_max_ms / 1000)
                if messages:
                    self._process(messages, consumer, dlq)
                if self._clock() >= next_lag_at:
                    self._refresh_lag(consumer)
                    next_lag_at = self._clock() + 1.0
        finally:
            dlq.flush(10)
            consumer.close()

    def _start_positions(self, consumer: Any) -> None:
        cfg = self._config
        tps = [TopicPartition(cfg.topic, p) for p in self._assignment.partitions]
        committed = consumer.committed(tps, timeout=30)
        starts = {}
        for tp in committed:
            if tp.offset == OFFSET_INVALID or tp.offset < 0:
                low, _high = consumer.get_watermark_offsets(tp, timeout=10)
                starts[tp.partition] = low
            else:
                starts[tp.partition] = tp.offset
        consumer.assign([TopicPartition(cfg.topic, p, o) for p, o in starts.items()])
        with self._lock:
            self._stats.next_offset = starts

    def _process(self, messages: list[Message], consumer: Any, dlq: Producer) -> None:
        cfg = self._config
        envelopes: list[dict[str, Any]] = []
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        rejected = 0
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    with self._lock:
                        self._stats.last_error = f"consume: {err}"
                continue
            partition, offset = msg.partition(), msg.offset()
            if partition is None or offset is None:  # only error events lack them
                continue
            first.setdefault(partition, offset)
            last[partition] = offset
            reason = None
            try:
                record = orjson.loads(msg.value() or b"")
                reason = check_stored(record)
            except orjson.JSONDecodeError as exc:
                reason = f"not JSON: {exc}"
            if reason is None:
                envelopes.append(record)
            else:
                self._dead_letter(dlq, msg, reason)
                rejected += 1
        if not last:
            return
        partials = fold_tumbling(envelopes, cfg.window_seconds * 1000)
        token = ",".join(f"{cfg.topic}/{p}/{first[p]}-{last[p]}" for p in sorted(last))
        written = self._write_until_acknowledged(partials, token)
        dlq.flush(30)
        offsets = [TopicPartition(cfg.topic, p, o + 1) for p, o in last.items()]
        self._commit(consumer, offsets)
        with self._lock:
            s = self._stats
            s.processed += len(envelopes)
            s.dead_lettered += rejected
            s.windows_written += written
            s.batches += 1
            for p, o in last.items():
                s.next_offset[p] = o + 1

    def _dead_letter(self, dlq: Producer, msg: Message, reason: str) -> None:
        headers: Headers = [
            ("reason", reason.encode()),
            ("stage", b"process"),
            ("origin.topic", (msg.topic() or "").encode()),
            ("origin.partition", str(msg.partition()).encode()),
            ("origin.offset", str(msg.offset()).encode()),
        ]
        dlq.produce(self._config.dlq_topic, msg.value(), msg.key(), headers=headers)
        dlq.poll(0)

    def _write_until_acknowledged(self, partials: Mapping[WindowKey, Partial], token: str) -> int:
        """Retry the sink with backoff; offsets never move past an unwritten block."""
        delay = 0.1
        while True:
            try:
                return self._sink.write(self._config.window_seconds, partials, token)
            except StoreUnavailable as exc:
                with self._lock:
                    self._stats.sink_failures += 1
                    self._stats.last_error = str(exc)
                if self._stopping.wait(delay):
                    raise
                delay = min(delay * 2, 5.0)

    def _commit(self, consumer: Any, offsets: list[TopicPartition]) -> None:
        delay = 0.1
        while True:
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
                return
            except KafkaException as exc:
                with self._lock:
                    self._stats.last_error = f"commit: {exc}"
                if self._stopping.wait(delay):
                    raise
                delay = min(delay * 2, 5.0)

    def _refresh_lag(self, consumer: Any) -> None:
        lag = {}
        with self._lock:
            positions = dict(self._stats.next_offset)
        for partition, position in positions.items():
            try:
                _low, high = consumer.get_watermark_offsets(
                    TopicPartition(self._config.topic, partition), timeout=1, cached=False
                )
            except KafkaException:
                continue
            lag[partition] = max(high - position, 0)
        with self._lock:
            self._stats.lag.update(lag)
