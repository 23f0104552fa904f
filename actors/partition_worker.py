"""PartitionWorker: owns some partitions of the raw topic and keeps their window state.

The worker reads with explicit assignment (no consumer-group rebalancing). For each
micro-batch it lets each partition's :class:`~core.partition_state.PartitionState`
decode, dedup and fold the records, then follows *snapshot before effect*:

1. save each changed partition's snapshot together with its outbox (the windows that
   closed, the records to dead-letter, the alerts raised, the offsets whose raw events
   go to ClickHouse) in PostgreSQL, fenced by the owner's epoch;
2. write the outbox: raw events and closed windows to ClickHouse (both idempotent:
   rows keyed by event and by window and partition), rejected and late records to
   ``events.dlq``, CEP matches to ``alerts`` (keyed by their deterministic id);
3. commit the offsets to Kafka, so that standard lag tools see the progress;
4. write the open windows of the partitions touched to Redis (live tiles; best
   effort: with Redis down the pipeline goes on and reports it).

A checkpoint covers the batches folded since the last one (every batch, or at most
``checkpoint_interval_ms`` of them, their effects held back meanwhile). Steps 2-4 of
one checkpoint run on an effects thread while the loop reads and folds the next
batches; the next snapshot is saved only once they are done, so a snapshot's outbox
never lacks an earlier checkpoint's effects and a crash replays at most one.

Between batches the worker keeps its runtime inputs current: the CEP rules and the
registered schemas (reloaded from PostgreSQL when they change), and the enrichment
dimension tables (checked for changes once per TTL).

After a crash the worker restores each partition's snapshot, writes its outbox again,
re-reads the dedup horizon from Kafka to re-learn the event ids, and goes on from the
snapshot's offset: whatever happened, every event counts once. An owner whose epoch
is older than the snapshot's stops owning that partition (it was reassigned).
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import OFFSET_INVALID, KafkaError, KafkaException, Producer, TopicPartition

from adapters.exceptions import StoreUnavailable
from adapters.kafka import Headers, make_consumer, topic_id
from adapters.postgres import CheckpointStore, MetadataStore
from adapters.redis import LiveTiles
from adapters.runtime_inputs import RuntimeInputs
from core.assignment import Assignment
from core.batch import Runtime, flat_offsets, process_batch, raw_event_rows
from core.checkpoint_policy import Action, Decision, OffsetCheck, decide
from core.columnar import Layout, decode_record, table_from_events
from core.dead_letters import LATE
from core.partition_state import (
    BatchOutcome,
    PartitionState,
    ProcessingConfig,
    RecordRef,
    WindowResult,
)
from core.poison import PoisonHunt

log = logging.getLogger(__name__)


class WindowSink(Protocol):
    """Where closed windows and raw events go.

    ``write`` and ``write_events`` return once the store has the rows; both are
    idempotent (a window is keyed by window, group and partition, an event by its
    identity and time), so the worker retries a failed call at will and replays its
    outbox after a crash. Offsets are committed only after both returned.
    """

    def write(self, results: Sequence[WindowResult]) -> int:
        """Store closed windows; return the rows written."""

    def write_events(self, table: pa.Table) -> int:
        """Store raw events (see ``adapters.clickhouse``); return the rows written."""


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
    checkpoint_interval_ms: int = 1_000
    """Longest time batches are folded before their snapshot and effects (0: every batch)."""
    alerts_topic: str = "alerts"
    redis_url: str | None = None
    enrichment_ttl_ms: int = 30_000
    rules_refresh_ms: int = 5_000


@dataclass(slots=True)
class WorkerStats:
    processed: int = 0
    duplicates: int = 0
    late: int = 0
    rejected: int = 0
    windows_written: int = 0
    events_written: int = 0
    alerts: int = 0
    filtered: int = 0
    tiles_failures: int = 0
    rule_errors: list[str] = field(default_factory=list)
    batches: int = 0
    sink_failures: int = 0
    fenced: list[int] = field(default_factory=list)
    last_error: str | None = None
    lag: dict[int, int] = field(default_factory=dict)
    # Checkpoints that did not fit the topic's offsets, and what was done (the latest
    # CHECKPOINT_REPORTS_KEPT; see core.checkpoint_policy).
    checkpoint_resets: list[dict[str, Any]] = field(default_factory=list)
    # Wall-clock times (epoch s): when the loop first began to consume, and when its
    # latest batch was done; a benchmark times a backlog between the two.
    consuming_since: float | None = None
    last_batch_at: float | None = None


@dataclass(slots=True)
class Outbox:
    """The effects of one batch of one partition, saved with its snapshot."""

    closed: list[WindowResult] = field(default_factory=list)
    dead_letters: list[tuple[RecordRef, str]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    # The raw events of this batch: offsets [first, end) minus those that did not count.
    raw: tuple[int, int, list[int]] | None = None

    def then(self, later: Outbox) -> Outbox:
        """This outbox followed by the next batch's of the same partition: one outbox
        whose raw range spans both (the partition's offsets run on from one to the next)."""
        raw = self.raw
        if raw is None or later.raw is None:
            raw = raw or later.raw
        else:
            raw = (raw[0], later.raw[1], raw[2] + later.raw[2])
        return Outbox(
            self.closed + later.closed,
            self.dead_letters + later.dead_letters,
            self.alerts + later.alerts,
            raw,
        )

    @classmethod
    def of(cls, outcome: BatchOutcome, refs: Sequence[RecordRef], counted: set[int]) -> Outbox:
        letters = list(outcome.rejected) + [(ref, LATE) for ref in outcome.late]
        alerts = [m.as_json() for m in outcome.alerts]
        raw = None
        if refs:
            skipped = [r.offset for r in refs if r.offset not in counted]
            raw = (refs[0].offset, refs[-1].offset + 1, skipped)
        return cls(list(outcome.closed), letters, alerts, raw)

    def to_json(self) -> dict[str, Any]:
        def b64(data: bytes | None) -> str | None:
            return None if data is None else base64.b64encode(data).decode()

        return {
            "closed": [r.to_row() for r in self.closed],
            "alerts": self.alerts,
            "raw": None if self.raw is None else list(self.raw),
            "dead_letters": [
                [ref.offset, b64(ref.key), b64(ref.value), reason]
                for ref, reason in self.dead_letters
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outbox:
        def unb64(text: str | None) -> bytes | None:
            return None if text is None else base64.b64decode(text)

        raw = data.get("raw")
        return cls(
            [WindowResult.from_row(row) for row in data["closed"]],
            [
                (RecordRef(offset, unb64(key), unb64(value)), reason)
                for offset, key, value, reason in data["dead_letters"]
            ],
            list(data.get("alerts", [])),
            None if raw is None else (raw[0], raw[1], list(raw[2])),
        )


@dataclass(slots=True)
class HeldBatches:
    """The batches folded since the last checkpoint, whose effects wait for it.

    Snapshot before effect still holds: nothing here reaches a sink, Kafka or Redis
    before the snapshot that covers it is saved. A crash loses them together with
    the state they built, and the restored snapshot's offsets replay them.
    """

    boxes: dict[int, Outbox] = field(default_factory=dict)
    outcomes: list[BatchOutcome] = field(default_factory=list)
    events: list[pa.Table] = field(default_factory=list)
    consumed: set[int] = field(default_factory=set)  # partitions with records: to commit
    batches: int = 0
    since: float | None = None  # monotonic time of the first batch held

    def add(
        self,
        boxes: dict[int, tuple[BatchOutcome, Outbox]],
        consumed: set[int],
        events: pa.Table | None,
        now: float,
    ) -> None:
        """Hold one batch's per-partition outcomes and outboxes and its raw events."""
        for partition, (outcome, box) in boxes.items():
            held = self.boxes.get(partition)
            self.boxes[partition] = box if held is None else held.then(box)
            self.outcomes.append(outcome)
        if events is not None and events.num_rows:
            self.events.append(events)
        self.consumed |= consumed
        self.batches += 1
        if self.since is None:
            self.since = now

    def due(self, now: float, interval_ms: int, caught_up: bool) -> bool:
        """Whether to checkpoint now: the interval has passed, or the consumer is caught
        up (holding back effects would only delay them)."""
        if self.since is None:
            return False
        return caught_up or (now - self.since) * 1000 >= interval_ms

    def events_of(self, partitions: set[int]) -> pa.Table | None:
        """The held raw events of ``partitions`` (those whose snapshot was saved)."""
        if not self.events:
            return None
        table = pa.concat_tables(self.events, promote_options="default")
        if {int(p) for p in pc.unique(table["partition"]).to_pylist()} <= partitions:
            return table
        return table.filter(pc.is_in(table["partition"], pa.array(sorted(partitions), pa.uint16())))


@dataclass
class _Writing:
    """A checkpoint whose snapshot is saved and whose effects are being written (on the
    effects thread) while the loop folds the next batches.

    What it carries was taken when its snapshot was saved: the offsets to commit and
    each partition's lowest watermark then (every event below it is in these effects or
    written before), both applied once the sinks acknowledged; and the windows it
    closed, still listed live until then.
    """

    future: Future[tuple[int, int]]
    held: HeldBatches
    partitions: list[int]  # those whose snapshot was saved
    offsets: dict[int, int]
    marks: dict[int, int]
    windows: list[WindowResult]


CRASH_POINTS = ("before_sink", "after_sink", "during_snapshot")
CHECKPOINT_REPORTS_KEPT = 20


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
        self._held = HeldBatches()
        self._writing: _Writing | None = None
        self._sealed: dict[int, int] = {}  # partition -> watermark with all events below written
        self._runtime = Runtime()
        self._inputs: RuntimeInputs | None = None
        self._crash_at: tuple[str, int] | None = None
        self._poison = PoisonHunt()  # outlives a restart of the loop, unlike its state
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
                "filtered": s.filtered,
                "dead_lettered": s.rejected + s.late,
                "windows_written": s.windows_written,
                "events_written": s.events_written,
                "alerts": s.alerts,
                "batches": s.batches,
                "sink_failures": s.sink_failures,
                "tiles_failures": s.tiles_failures,
                "rules": len(self._runtime.rules),
                "dimensions": {n: t.num_rows for n, t in self._runtime.dimensions.items()},
                "cep": {
                    "state_entries": sum(len(st.cep) for st in self._states.values()),
                    "ignored_late": sum(st.cep.stats.late for st in self._states.values()),
                    "rules_in_force": sorted(
                        {r.id for st in self._states.values() for r in st.cep.rules}
                    ),
                },
                "rule_errors": list(s.rule_errors),
                "fenced": list(s.fenced),
                "last_error": s.last_error,
                "lag": dict(s.lag),
                "checkpoint_resets": [dict(r) for r in s.checkpoint_resets],
                "consuming_since": s.consuming_since,
                "last_batch_at": s.last_batch_at,
                "open_windows": sum(
                    len(op) for st in self._states.values() for op in st.operators.values()
                ),
                # per partition: Kafka's time of the newest record read (or of a confirmed
                # idle spell), the lowest tenant watermark, and the tenants kept apart
                "watermarks": {
                    p: {
                        "progress": st.watermark.progress,
                        "low": st.watermark.low(),
                        "tenants": len(st.watermark.tenants),
                    }
                    for p, st in self._states.items()
                },
            }

    def open_windows(
        self, tenant: str, type_: str, window: str, from_ms: int, to_ms: int
    ) -> list[WindowResult]:
        """Windows still open here, and closed ones the sink has not acknowledged yet."""
        with self._lock:
            candidates = [r for st in self._states.values() for r in st.open_windows()]
            candidates += self._pending
            if self._writing is not None:
                candidates += self._writing.windows
        return [
            r
            for r in candidates
            if r.tenant == tenant
            and r.type == type_
            and r.window == window
            and from_ms <= r.start < to_ms
        ]

    def arm_crash(self, point: str, after_batches: int = 0) -> None:
        """Test hook: SIGKILL this process at ``point`` of a coming batch.

        ``before_sink``: after the snapshot is saved, before any sink write;
        ``after_sink``: after the sinks acknowledged, before the offsets are committed;
        ``during_snapshot``: while the snapshot statement is in flight in PostgreSQL.
        """
        if point not in CRASH_POINTS:
            raise ValueError(f"crash point must be one of {CRASH_POINTS}, got {point!r}")
        with self._lock:
            self._crash_at = (point, self._stats.batches + after_batches)

    def _maybe_crash(self, point: str) -> None:
        armed = self._crash_at
        if armed is not None and armed[0] == point and self._stats.batches >= armed[1]:
            log.warning("worker %s: crash point %s reached", self._assignment.worker, point)
            os.kill(os.getpid(), signal.SIGKILL)

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
            except _BatchFailed as failed:  # the records, not a store: find the poison
                log.warning(
                    "worker %s: a batch of %d records failed: %r",
                    self._assignment.worker,
                    len(failed.records),
                    failed.__cause__,
                )
                self._poison.failed(failed.records, failed.__cause__ or failed)
                with self._lock:
                    self._stats.last_error = f"batch failed, searching its poison: {failed}"
                self._stopping.wait(0.5)
            except Exception as exc:  # report and start over; a worker never just vanishes
                log.exception("worker %s failed; restarting its loop", self._assignment.worker)
                with self._lock:
                    self._stats.last_error = f"loop restarted after: {exc}"
                self._stopping.wait(delay)
                delay = min(delay * 2, 10.0)

    def _consume_until_stopped(self) -> None:
        cfg = self._config
        consumer = make_consumer(cfg.bootstrap, cfg.group_id)
        producer = Producer({"bootstrap.servers": cfg.bootstrap, "enable.idempotence": True})
        store = CheckpointStore(cfg.checkpoint_dsn)
        inputs = RuntimeInputs(cfg, MetadataStore(cfg.checkpoint_dsn))
        tiles = LiveTiles(cfg.redis_url, cfg.topic) if cfg.redis_url else None
        probe: threading.Thread | None = None
        # One checkpoint's effects are written on this thread while the next batches
        # are read and folded; the next snapshot waits for them (see _flush).
        effects = ThreadPoolExecutor(1, thread_name_prefix="effects")
        try:
            self._inputs = inputs
            self._held = HeldBatches()  # effects of a failed run's batches: replayed instead
            self._refresh_inputs(inputs, force=True)
            states = self._recover(consumer, store, producer)
            with self._lock:
                self._states = states
            consumer.assign(
                [TopicPartition(cfg.topic, p, s.next_offset) for p, s in states.items()]
            )
            with self._lock:
                if self._stats.consuming_since is None:
                    self._stats.consuming_since = self._clock()
            probe_stop = threading.Event()
            probe = threading.Thread(
                target=self._probe_lag, args=(probe_stop,), name="lag-probe", daemon=True
            )
            probe.start()
            while not self._stopping.is_set() and self._states:
                size = self._poison.batch_size(cfg.batch_max_records)
                messages = consumer.consume(size, cfg.batch_max_ms / 1000)
                self._refresh_inputs(inputs)  # a batch sees inputs at most one TTL old
                self._step(messages)
                self._settle(consumer, tiles, wait=False)
                # while a poison record is hunted, every batch is checkpointed on its own
                hunting = self._poison.limit is not None
                interval = 0 if hunting else cfg.checkpoint_interval_ms
                if self._held.due(time.monotonic(), interval, caught_up=not messages):
                    self._flush(consumer, store, producer, tiles, effects)
                elif not self._held.batches and self._writing is None:
                    self._note_sealed()
            if self._held.batches and self._states:  # stopped: the held batches count
                self._flush(consumer, store, producer, tiles, effects)
            self._settle(consumer, tiles, wait=True)
        finally:
            # Effects in flight finish (a sink that stays down gives up once stopping).
            effects.shutdown(wait=True)
            if probe is not None:
                probe_stop.set()
                probe.join(5)
            producer.flush(10)
            consumer.close()
            store.close()
            inputs.close()
            if tiles is not None:
                tiles.close()

    def _refresh_inputs(self, inputs: RuntimeInputs, force: bool = False) -> None:
        try:
            runtime, errors = inputs.refresh(self._runtime, int(self._clock() * 1000), force)
        except StoreUnavailable as exc:
            if force:
                raise
            with self._lock:
                self._stats.last_error = f"refreshing rules, schemas or dimensions: {exc}"
            return
        with self._lock:
            self._runtime = runtime
            if errors is not None:
                self._stats.rule_errors = errors

    def _step(self, messages: list[Any]) -> None:
        """Fold one micro-batch and hold its effects back until the next checkpoint."""
        by_partition: dict[int, list[RecordRef]] = defaultdict(list)
        new_ref = tuple.__new__  # RecordRef without its Python-level __new__, per record
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    with self._lock:
                        self._stats.last_error = f"consume: {err}"
                continue
            kind, appended = msg.timestamp()
            by_partition[msg.partition()].append(
                new_ref(
                    RecordRef, (msg.offset(), msg.key(), msg.value(), appended if kind else None)
                )
            )
        with self._lock:
            records = {p: by_partition.get(p, []) for p in self._states}
            outcomes, counted, folded = self._process(records)
            offsets = counted_offsets(counted, folded)
            boxes = {
                p: (o, Outbox.of(o, records[p], offsets.get(p, set())))
                for p, o in outcomes.items()
                if records[p] or o.closed or o.alerts
            }
            for outcome, _box in boxes.values():
                self._pending.extend(outcome.closed)
            if boxes:
                events = raw_event_rows(counted, folded, set(boxes))
                consumed = {p for p in boxes if records[p]}
                self._held.add(boxes, consumed, events, time.monotonic())
        self._poison.succeeded(self._config.batch_max_records)

    def _flush(
        self,
        consumer: Any,
        store: CheckpointStore,
        producer: Producer,
        tiles: LiveTiles | None,
        effects: ThreadPoolExecutor,
    ) -> None:
        """Checkpoint the held batches: save their snapshot (with their outbox), then
        write their effects on the effects thread; offsets, stats, sealed marks and live
        tiles follow once the sinks acknowledged (:meth:`_settle`).

        The previous checkpoint's effects are settled first: a snapshot's outbox holds
        only its own batches' effects, so it is saved only once the earlier ones are
        written, and a crash replays at most the one checkpoint in flight.
        """
        self._settle(consumer, tiles, wait=True)
        held = self._held
        saved = self._checkpoint(store, held.boxes)
        events = held.events_of(set(saved))
        with self._lock:
            marks = {
                p: low for p, st in self._states.items() if (low := st.watermark.low()) is not None
            }
            offsets = {
                p: self._states[p].next_offset
                for p in held.consumed & set(saved)
                if p in self._states
            }
            windows, self._pending = self._pending, []
            self._held = HeldBatches()
            future = effects.submit(self._effects, saved, producer, events)
            self._writing = _Writing(future, held, sorted(saved), offsets, marks, windows)

    def _effects(
        self, saved: dict[int, Outbox], producer: Producer, events: pa.Table | None
    ) -> tuple[int, int]:
        """The effects thread: write one saved checkpoint's effects."""
        self._maybe_crash("before_sink")
        written = self._apply(saved, producer, events)
        self._maybe_crash("after_sink")
        return written

    def _settle(self, consumer: Any, tiles: LiveTiles | None, wait: bool) -> None:
        """Once the checkpoint in flight is written (``wait``: wait for it): commit its
        offsets, count its batches, seal below its marks, and write the live tiles.

        Raises:
            Whatever writing its effects raised: the loop then starts over from the
            snapshot, whose outbox writes them again.
        """
        writing = self._writing
        if writing is None or not (wait or writing.future.done()):
            return
        written, events_written = writing.future.result()
        self._commit(consumer, writing.offsets)
        with self._lock:
            self._writing = None
            s = self._stats
            s.batches += writing.held.batches
            s.last_batch_at = self._clock()
            s.windows_written += written
            s.events_written += events_written
            for outcome in writing.held.outcomes:
                s.processed += outcome.processed
                s.duplicates += outcome.duplicates
                s.late += len(outcome.late)
                s.rejected += len(outcome.rejected)
                s.filtered += outcome.filtered
                s.alerts += len(outcome.alerts)
            for p, mark in writing.marks.items():
                if p in self._states:
                    self._sealed[p] = max(mark, self._sealed.get(p, mark))
        self._write_tiles(tiles, writing.partitions)

    def _process(
        self, records: dict[int, list[RecordRef]]
    ) -> tuple[dict[int, BatchOutcome], pa.Table | None, dict[int, list[RecordRef]]]:
        """Fold the batch but its known poison records, which become dead letters.

        Returns:
            The outcomes, the counted rows, and the records that were folded (the rows'
            ``_row`` index into them).

        Raises:
            _BatchFailed: the fold raised something other than a store being down; the
                states are then unusable, and the loop starts over from the snapshot.
        """
        folded, poisoned = self._poison.split(records) if self._poison.found else (records, {})
        try:
            outcomes, counted = process_batch(self._states, folded, self._runtime)
        except StoreUnavailable:
            raise
        except Exception as exc:
            pairs = [(p, r.offset) for p, batch in folded.items() for r in batch]
            raise _BatchFailed(pairs) from exc
        for p, letters in poisoned.items():
            outcomes[p].rejected.extend(letters)
            last = max(ref.offset for ref, _reason in letters)
            self._states[p].next_offset = max(self._states[p].next_offset, last + 1)
        return outcomes, counted, folded

    def _note_sealed(self) -> None:
        """Record each partition's lowest watermark now that every event below it is
        written. A partition has none before its first record or confirmed idle spell."""
        with self._lock:
            for p, st in self._states.items():
                low = st.watermark.low()
                if low is not None:
                    self._sealed[p] = max(low, self._sealed.get(p, low))

    def sealed_watermark(self) -> int | None:
        """The lowest watermark of this worker's partitions whose events are all written.

        No event below it can count any more (it would be late), so every minute that
        ends at or before it is final. None before the first batch.
        """
        with self._lock:
            marks = [self._sealed.get(p) for p in self._states]
        if not marks or any(m is None for m in marks):
            return None
        return min(m for m in marks if m is not None)

    # Snapshot, effects, commit -------------------------------------------------

    def _checkpoint(self, store: CheckpointStore, outboxes: dict[int, Outbox]) -> dict[int, Outbox]:
        """Save each partition's snapshot with its outbox; return the outboxes saved.

        A partition fenced by a newer epoch is dropped, and so is its outbox: an effect
        whose decision is not durable must not happen.
        """
        snapshots = {}
        with self._lock:  # the lag probe moves watermarks meanwhile
            for partition, box in outboxes.items():
                state = self._states[partition]
                blob = orjson.dumps({"snapshot": state.snapshot(), "outbox": box.to_json()})
                snapshots[partition] = (state.next_offset, blob)
        epoch = self._assignment.epoch
        in_flight = partial(self._maybe_crash, "during_snapshot")
        saved = self._retry(
            partial(store.save, self._config.topic, epoch, snapshots, in_flight=in_flight)
        )
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

    def _apply(
        self, boxes: dict[int, Outbox], producer: Producer, events: pa.Table | None
    ) -> tuple[int, int]:
        """Write an outbox's effects; return (windows, raw events) written."""
        events_written = 0
        if events is not None and events.num_rows:
            events_written = self._retry(lambda: self._sink.write_events(events))
        closed = [r for box in boxes.values() for r in box.closed]
        written = self._retry(lambda: self._sink.write(closed)) if closed else 0
        for partition, box in boxes.items():
            for ref, reason in box.dead_letters:
                self._dead_letter(producer, partition, ref, reason)
            for alert in box.alerts:
                producer.produce(
                    self._config.alerts_topic,
                    orjson.dumps(alert),
                    str(alert["alert_id"]).encode(),
                    headers=[("rule", str(alert["rule_id"]).encode())],
                )
                producer.poll(0)
        if producer.flush(30) > 0:
            raise StoreUnavailable("Kafka did not acknowledge dead letters or alerts within 30 s")
        return written, events_written

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

    def _write_tiles(self, tiles: LiveTiles | None, partitions: list[int]) -> None:
        if tiles is None or not partitions:
            return
        with self._lock:
            windows = {
                # count, sum, min, max, avg: merging every hopping window's sketches
                # after each batch would cost more than the batch itself
                p: self._states[p].open_windows(sketches=False)
                for p in partitions
                if p in self._states
            }
        try:
            tiles.write(windows)
        except StoreUnavailable as exc:
            with self._lock:
                self._stats.tiles_failures += 1
                self._stats.last_error = str(exc)

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

    def _commit(self, consumer: Any, next_offsets: dict[int, int]) -> None:
        offsets = [
            TopicPartition(self._config.topic, p, offset)
            for p, offset in sorted(next_offsets.items())
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
        self, consumer: Any, store: CheckpointStore, producer: Producer
    ) -> dict[int, PartitionState]:
        """Each owned partition's state: from its snapshot, or new at the committed offset.

        A snapshot that does not fit the offsets the partition holds now (the topic was
        recreated, truncated, or retention passed it) is dealt with by
        ``core.checkpoint_policy`` and reported in the log and the stats; the topic id
        the partitions' states belong to is recorded beside their checkpoints.
        """
        cfg = self._config
        states: dict[int, PartitionState] = {}
        with self._lock:
            self._pending.clear()
            self._writing = None  # its snapshot's outbox is written again below
        current_id = topic_id(cfg.bootstrap, cfg.topic)
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
            snapshot = data["snapshot"]
            box = Outbox.from_json(data["outbox"])
            low, high = self._retry(partial(self._offsets, consumer, partition))
            decision = self._decide(
                OffsetCheck(
                    partition,
                    snapshot["next_offset"],
                    min(snapshot["dedup_from"], box.raw[0] if box.raw else 2**62),
                    low,
                    high,
                    self._retry(partial(store.topic_id, cfg.topic, partition)),
                    current_id,
                )
            )
            if decision.action is Action.RESET:
                fresh = self._reset(store, partition, decision.start_offset)
                if fresh is not None:
                    states[partition] = fresh
                continue
            state = PartitionState.restore(cfg.processing, snapshot, self._runtime)
            state.next_offset = decision.start_offset
            replayed = self._replay(consumer, partition, decision.replay_from, state.next_offset)
            self._apply({partition: box}, producer, self._replayed_events(partition, box, replayed))
            state.rebuild_dedup(
                [r for r in replayed if r.offset >= snapshot["dedup_from"]], self._runtime.avro
            )
            states[partition] = state
        if current_id is not None and states:
            self._retry(partial(store.record_topic_id, cfg.topic, sorted(states), current_id))
        return states

    def _decide(self, check: OffsetCheck) -> Decision:
        """The policy's decision for one partition; anything but resuming is reported."""
        decision = decide(check)
        if decision.reported:
            worker = self._assignment.worker
            log.warning("worker %s: %s (action %s)", worker, decision.reason, decision.action)
            at = datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="seconds")
            with self._lock:
                reports = self._stats.checkpoint_resets
                reports.append(decision.report(check, at))
                del reports[:-CHECKPOINT_REPORTS_KEPT]
        return decision

    def _reset(self, store: CheckpointStore, partition: int, start: int) -> PartitionState | None:
        """A fresh state at ``start``, saved at once: a restart before the first batch
        must not find the discarded snapshot again. None when a newer epoch owns it."""
        state = PartitionState(partition, self._config.processing, start)
        blob = orjson.dumps({"snapshot": state.snapshot(), "outbox": Outbox().to_json()})
        epoch = self._assignment.epoch
        saved = self._retry(
            partial(store.save, self._config.topic, epoch, {partition: (start, blob)})
        )
        if partition not in saved:
            self._give_up(
                partition, f"partition {partition} belongs to an epoch newer than {epoch}"
            )
            return None
        return state

    def _offsets(self, consumer: Any, partition: int) -> tuple[int, int]:
        """The partition's (low, high) offsets as the broker has them now."""
        tp = TopicPartition(self._config.topic, partition)
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
        except KafkaException as exc:
            raise StoreUnavailable(
                f"Kafka did not report the offsets of {self._config.topic!r} "
                f"partition {partition}: {exc}"
            ) from exc
        return int(low), int(high)

    def _replayed_events(
        self, partition: int, box: Outbox, replayed: Sequence[RecordRef]
    ) -> pa.Table | None:
        """The raw events of a saved outbox, decoded again from the re-read records."""
        if box.raw is None:
            return None
        first, end, skipped = box.raw
        excluded = set(skipped)
        refs, rows = [], []
        for ref in replayed:
            if first <= ref.offset < end and ref.offset not in excluded:
                row, _reason = decode_record(ref.value, Layout(), self._runtime.avro)
                if row is not None:
                    refs.append(ref)
                    rows.append(row)
        table = table_from_events(rows, Layout())
        table = table.append_column("_row", pa.array(range(len(rows)), pa.int64()))
        table = table.append_column("_partition", pa.array([partition] * len(rows), pa.int64()))
        return raw_event_rows(table, {partition: refs}, {partition})

    def _start_offset(self, consumer: Any, partition: int) -> int:
        """Where a partition with no snapshot starts: its committed offset when the
        partition still holds it (see ``core.checkpoint_policy``), else its low offset."""
        tp = TopicPartition(self._config.topic, partition)
        (committed,) = consumer.committed([tp], timeout=30)
        low, high = self._retry(partial(self._offsets, consumer, partition))
        if committed.offset == OFFSET_INVALID or committed.offset < 0:
            return low
        offset = int(committed.offset)
        check = OffsetCheck(partition, offset, offset, low, high, has_state=False)
        return self._decide(check).start_offset

    def _replay(self, consumer: Any, partition: int, start: int, end: int) -> list[RecordRef]:
        """The records of ``partition`` in [start, end) that it still holds, read again.

        The range is cut to the partition's offsets first, and again whenever a poll
        comes back empty: a topic truncated or recreated meanwhile ends the replay
        instead of leaving it waiting for offsets that will never come.
        """
        low, high = self._retry(partial(self._offsets, consumer, partition))
        start, end = max(start, low), min(end, high)
        if start >= end:
            return []
        tp = TopicPartition(self._config.topic, partition, start)
        consumer.assign([tp])
        records: list[RecordRef] = []
        deadline = time.monotonic() + 300
        while consumer.position([tp])[0].offset < end:
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"re-reading partition {partition} from {start} timed out")
            messages = consumer.consume(self._config.batch_max_records, 1.0)
            for msg in messages:
                if msg.error() is None and msg.offset() < end:
                    records.append(RecordRef(msg.offset(), msg.key(), msg.value()))
            if not messages:  # nothing came: the partition may have been cut meanwhile
                end = min(end, self._offsets(consumer, partition)[1])
        consumer.unassign()
        return records

    def _probe_lag(self, stop: threading.Event) -> None:
        """Refresh the lag every second until ``stop``, on this thread and a consumer of its
        own: a broker round trip per partition (100 ms each on a busy broker) must not
        stall the batches."""
        consumer = make_consumer(self._config.bootstrap, self._config.group_id)
        try:
            while True:
                try:
                    self._refresh_lag(consumer)
                except Exception:  # a report only; the next round tries again
                    log.exception("worker %s: refreshing the lag failed", self._assignment.worker)
                if stop.wait(1.0):
                    return
        finally:
            consumer.close()

    def _refresh_lag(self, consumer: Any) -> None:
        """Ask the broker how far each partition goes: the lag, and whether the worker
        has read everything there is (what lets an idle partition's watermark move)."""
        lag, ends = {}, {}
        with self._lock:
            positions = {p: s.next_offset for p, s in self._states.items()}
        for partition, position in positions.items():
            asked_at = int(self._clock() * 1000)  # before asking: the answer holds then
            try:
                _low, high = consumer.get_watermark_offsets(
                    TopicPartition(self._config.topic, partition), timeout=1, cached=False
                )
            except KafkaException:
                continue
            lag[partition] = max(high - position, 0)
            ends[partition] = (high <= position, asked_at)
        with self._lock:
            self._stats.lag = lag
            for partition, (at_end, asked_at) in ends.items():
                state = self._states.get(partition)
                if state is None:
                    continue
                if at_end:
                    state.watermark.at_end(asked_at)
                else:
                    state.watermark.not_at_end()


class _BatchFailed(Exception):
    """A batch's fold raised; ``records`` are its (partition, offset) pairs."""

    def __init__(self, records: list[tuple[int, int]]) -> None:
        super().__init__(f"{len(records)} records")
        self.records = records


def counted_offsets(
    counted: pa.Table | None, records: dict[int, list[RecordRef]]
) -> dict[int, set[int]]:
    """Per partition, the offsets of the records that counted."""
    if counted is None or not counted.num_rows:
        return {}
    offsets = flat_offsets(records)[counted["_row"].to_numpy()]
    parts = counted["_partition"].to_numpy()
    return {int(p): set(offsets[parts == p].tolist()) for p in np.unique(parts).tolist()}
