"""Applies Debezium change topics to ClickHouse, in order, and publishes the positions.

:class:`CdcApplier` (no Ray in it) reads the change topics ``<prefix>.<schema>.<table>``
with one consumer and manual commits. For each batch it turns the change events into
versioned rows (:mod:`core.cdc`), creates a table's ClickHouse mirror on its first
change, writes the rows through a :class:`CdcSink`, publishes each table's last LSN
to Redis (so workers reload the matching enrichment cache), and only then commits the
offsets. :class:`CdcApplierActor` is the thin Ray actor that runs its loop.

Sink contract: ``ensure_cdc_table`` and ``insert_cdc_rows`` return after ClickHouse
stored the table or the rows; they raise ``StoreUnavailable`` otherwise. Rows are
versioned by LSN, so writing a batch again (after a failure or a crash before the
commit) leaves the table as it was: the applier simply reads the batch again.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import orjson
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from adapters.exceptions import StoreUnavailable
from core.cdc import DELETED_COLUMN, VERSION_COLUMN, CdcEventError, Change, parse_change
from core.cdc import clickhouse_table as mirror_name
from core.dead_letters import dead_letter_headers

log = logging.getLogger(__name__)

APPLIER_NAME = "rayline-cdc-applier"
DeadLetter = tuple[bytes | None, bytes | None, list[tuple[str, str | bytes | None]]]


class CdcSink(Protocol):
    """Where the rows go: :class:`adapters.clickhouse.ClickHouseStore` or the owner actor."""

    def ensure_cdc_table(
        self, table: str, columns: Sequence[tuple[str, str]], key: Sequence[str]
    ) -> None: ...

    def insert_cdc_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> int: ...


class Positions(Protocol):
    def publish(self, positions: dict[str, int]) -> None: ...


class Stats(Protocol):
    def record(
        self,
        source: str,
        *,
        now_ms: int,
        accepted: int = 0,
        rejected: int = 0,
        errors: int = 0,
        error: str | None = None,
    ) -> None: ...


class RemoteCdcSink:
    """A CdcSink that writes through the ClickHouse owner actor (inside Ray)."""

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace

    def ensure_cdc_table(
        self, table: str, columns: Sequence[tuple[str, str]], key: Sequence[str]
    ) -> None:
        self._call("ensure_cdc_table", table, list(columns), list(key))

    def insert_cdc_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> int:
        return int(self._call("insert_cdc_rows", table, list(columns), list(rows)))

    def _call(self, method: str, *args: Any) -> Any:
        import ray
        from ray.exceptions import RayActorError

        from actors.clickhouse_owner import OWNER_NAME

        try:
            owner = ray.get_actor(OWNER_NAME, namespace=self._namespace)
            return ray.get(getattr(owner, method).remote(*args))
        except (RayActorError, ValueError) as exc:
            raise StoreUnavailable(f"ClickHouse owner actor is unavailable: {exc}") from exc


@dataclass
class _Batch:
    changes: list[Change]
    dead: list[DeadLetter]
    ends: dict[tuple[str, int], int]  # next offset to commit per (topic, partition)
    starts: dict[tuple[str, int], int]  # first offset read per (topic, partition)


def topic_pattern(prefix: str) -> str:
    """The subscription regex of the change topics (Debezium's heartbeats stay out)."""
    return "^" + re.escape(prefix) + r"\..+\..+"


class CdcApplier:
    """Applies change events to ClickHouse; see the module docstring for the guarantees."""

    def __init__(
        self,
        consumer: Consumer,
        sink: CdcSink,
        *,
        positions: Positions | None = None,
        dead_letters: Callable[[list[DeadLetter]], None] | None = None,
        stats: Stats | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._consumer = consumer
        self._sink = sink
        self._positions = positions
        self._dead_letters = dead_letters
        self._stats = stats
        self._clock = clock
        self._tables: dict[str, tuple[tuple[str, str], ...]] = {}
        self.applied = 0
        self.rejected = 0

    def poll_once(self, max_records: int = 2000, timeout: float = 0.5) -> int:
        """Read one batch and apply it; return the changes applied.

        Raises:
            StoreUnavailable: ClickHouse, Redis or Kafka failed; nothing was committed,
                and the consumer was moved back so that the next call reads it again.
        """
        messages = self._consumer.consume(max_records, timeout)
        batch = self._decode([m for m in messages if m.error() is None])
        if not batch.ends:
            return 0
        try:
            written = self._write(batch.changes)
            if batch.dead and self._dead_letters is not None:
                self._dead_letters(batch.dead)
            if self._positions is not None and batch.changes:
                self._positions.publish(_last_positions(batch.changes))
            self._commit(batch.ends)
        except StoreUnavailable as exc:
            self._rewind(batch.starts)
            self._record_stats(batch, error=str(exc))
            raise
        self.applied += written
        self.rejected += len(batch.dead)
        self._record_stats(batch)
        return written

    def run(self, stop: threading.Event, backoff: float = 1.0) -> None:
        """Apply batches until ``stop`` is set; a failed batch is retried after ``backoff``."""
        while not stop.is_set():
            try:
                self.poll_once()
            except StoreUnavailable as exc:
                log.warning("CDC batch not applied, retrying: %s", exc)
                stop.wait(backoff)

    def _decode(self, messages: Sequence[Message]) -> _Batch:
        batch = _Batch([], [], {}, {})
        for msg in messages:
            where = (str(msg.topic()), int(msg.partition() or 0))
            offset = int(msg.offset() or 0)
            batch.starts.setdefault(where, offset)
            batch.ends[where] = offset + 1
            try:
                change = parse_change(_json(msg.key()), _json(msg.value()))
            except CdcEventError as exc:
                batch.dead.append(self._dead_letter(msg, str(exc)))
                continue
            except (ValueError, TypeError, OverflowError, ArithmeticError, RecursionError) as exc:
                # A value no conversion takes (a date past year 9999, bad base64...): the
                # record is the problem, and retrying it would stop every table behind it.
                reason = f"a value cannot be converted: {type(exc).__name__}: {exc}"
                batch.dead.append(self._dead_letter(msg, reason))
                continue
            if change is not None:
                batch.changes.append(change)
        return batch

    def _dead_letter(self, msg: Message, reason: str) -> DeadLetter:
        headers = dead_letter_headers(
            "cdc",
            reason,
            int(self._clock() * 1000),
            topic=str(msg.topic()),
            partition=int(msg.partition() or 0),
            offset=int(msg.offset() or 0),
        )
        log.warning(
            "CDC record %s[%s]@%s rejected: %s", msg.topic(), msg.partition(), msg.offset(), reason
        )
        return (msg.key(), msg.value(), list(headers))

    def _write(self, changes: Sequence[Change]) -> int:
        """Write the rows, grouped by table and column layout (a schema change splits)."""
        groups: dict[tuple[str, tuple[tuple[str, str], ...], tuple[str, ...]], list[Change]] = {}
        for change in changes:
            layout = tuple((c.name, c.type) for c in change.columns)
            groups.setdefault(
                (mirror_name(change.schema, change.table), layout, change.key), []
            ).append(change)
        written = 0
        for (table, layout, key), group in groups.items():
            if self._tables.get(table) != layout:
                self._sink.ensure_cdc_table(table, layout, key)
                self._tables[table] = layout
            names = [name for name, _type in layout] + [VERSION_COLUMN, DELETED_COLUMN]
            written += self._sink.insert_cdc_rows(table, names, [c.values() for c in group])
        return written

    def _commit(self, ends: dict[tuple[str, int], int]) -> None:
        offsets = [TopicPartition(t, p, o) for (t, p), o in ends.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:  # the rows are stored: a replay is harmless
            raise StoreUnavailable(f"Kafka did not take the CDC offsets: {exc}") from exc

    def _rewind(self, starts: dict[tuple[str, int], int]) -> None:
        for (topic, partition), offset in starts.items():
            try:
                self._consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:  # the partition was revoked meanwhile
                log.warning("could not rewind %s[%d] to %d: %s", topic, partition, offset, exc)

    def _record_stats(self, batch: _Batch, error: str | None = None) -> None:
        if self._stats is None:
            return
        now_ms = int(self._clock() * 1000)
        if error is not None:
            self._stats.record("cdc", now_ms=now_ms, errors=1, error=error)
            return
        accepted, rejected = len(batch.changes), len(batch.dead)
        if accepted or rejected:
            self._stats.record("cdc", now_ms=now_ms, accepted=accepted, rejected=rejected)


def _json(data: bytes | str | None) -> Any:
    if data is None:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CdcEventError(f"record is not JSON: {exc}") from exc


def _last_positions(changes: Sequence[Change]) -> dict[str, int]:
    last: dict[str, int] = {}
    for change in changes:
        last[change.qualified] = max(last.get(change.qualified, 0), change.version)
    return last


@dataclass(frozen=True)
class CdcApplierConfig:
    """What the applier actor needs; built from the settings by ``cluster.deploy``."""

    bootstrap: str
    topic_prefix: str
    dlq_topic: str
    redis_url: str
    namespace: str
    group_id: str = "rayline-cdc-applier"


def make_applier(config: CdcApplierConfig, sink: CdcSink) -> CdcApplier:
    """An applier subscribed to the change topics, with Redis positions and stats."""
    from adapters.kafka import Record, make_consumer
    from adapters.publisher import EventPublisher, Outgoing
    from adapters.redis import CdcPositions
    from adapters.source_stats import SourceStats

    consumer = make_consumer(
        config.bootstrap,
        config.group_id,
        # New change topics appear whenever a table is added: find them quickly.
        **{"topic.metadata.refresh.interval.ms": 2000},
    )
    consumer.subscribe([topic_pattern(config.topic_prefix)])
    # Changes go to ClickHouse, not to a raw topic: only dead letters are published.
    publisher = EventPublisher.connect(config.bootstrap, "", config.dlq_topic)

    def dead_letters(records: list[DeadLetter]) -> None:
        # A tombstone's dead letter keeps its null value: the producer takes None.
        publisher.publish_blocking(Outgoing(dead=cast("list[Record]", records)), timeout=30)

    return CdcApplier(
        consumer,
        sink,
        positions=CdcPositions(config.redis_url),
        dead_letters=dead_letters,
        stats=SourceStats(config.redis_url),
    )


class CdcApplierActor:
    """Ray actor body: runs :class:`CdcApplier` in a thread until stopped."""

    def __init__(self, config: CdcApplierConfig) -> None:
        self._applier = make_applier(config, RemoteCdcSink(config.namespace))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._applier.run, args=(self._stop,), name="cdc-applier", daemon=True
        )
        self._thread.start()

    def status(self) -> dict[str, Any]:
        return {
            "running": self._thread.is_alive(),
            "applied": self._applier.applied,
            "rejected": self._applier.rejected,
        }

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
