"""Apache Kafka through confluent-kafka: topics, an awaitable batch producer, consumers.

Driver errors become :class:`~adapters.exceptions.StoreUnavailable` or
:class:`~adapters.exceptions.Backpressure` here; nothing above this module sees a
``KafkaException``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)

from adapters.exceptions import Backpressure, StoreUnavailable

Headers = list[tuple[str, str | bytes | None]]
Record = tuple[bytes | None, bytes, Headers]
"""One Kafka record to produce: key, value, headers."""


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    config: Mapping[str, str] | None = None  # topic configs, e.g. cleanup.policy=compact


def admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


def broker_answers(bootstrap: str, timeout: float = 1.0) -> bool:
    """True when a broker answers a metadata request within ``timeout`` seconds."""
    try:
        return bool(admin(bootstrap).list_topics(timeout=timeout).brokers)
    except KafkaException:
        return False


def ensure_topics(bootstrap: str, topics: Sequence[TopicSpec], timeout: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; return the names created.

    A topic that exists with fewer partitions than asked for is grown (Kafka cannot
    shrink one); the configs asked for are set on topics that exist already.
    """
    client = admin(bootstrap)
    try:
        existing = client.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        raise StoreUnavailable(f"Kafka at {bootstrap} did not list topics: {exc}") from exc
    missing = [
        NewTopic(t.name, t.partitions, 1, config=dict(t.config or {}))
        for t in topics
        if t.name not in existing
    ]
    grow = [
        t for t in topics if t.name in existing and len(existing[t.name].partitions) < t.partitions
    ]
    futures: dict[str, Any] = {}
    if missing:
        futures.update(client.create_topics(missing, operation_timeout=timeout))
    if grow:
        from confluent_kafka.admin import NewPartitions

        futures.update(
            client.create_partitions([NewPartitions(t.name, t.partitions) for t in grow])
        )
    configured = [
        ConfigResource(
            ConfigResource.Type.TOPIC,
            t.name,
            incremental_configs=[
                ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                for k, v in t.config.items()
            ],
        )
        for t in topics
        if t.name in existing and t.config
    ]
    if configured:
        futures.update({str(r): f for r, f in client.incremental_alter_configs(configured).items()})
    for name, future in futures.items():
        try:
            future.result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise StoreUnavailable(f"Kafka could not set up topic {name!r}: {exc}") from exc
    return [t.topic for t in missing]


def partition_ids(bootstrap: str, topic: str, timeout: float = 10.0) -> list[int]:
    try:
        meta = admin(bootstrap).list_topics(topic, timeout=timeout)
    except KafkaException as exc:
        raise StoreUnavailable(f"Kafka at {bootstrap} did not describe {topic!r}: {exc}") from exc
    info = meta.topics.get(topic)
    if info is None or info.error is not None:
        raise StoreUnavailable(f"topic {topic!r} does not exist on {bootstrap}; run `rayline up`")
    return sorted(info.partitions)


def topic_id(bootstrap: str, topic: str, timeout: float = 10.0) -> str | None:
    """The id Kafka gave ``topic`` when it was created (base64), or None when the broker
    does not answer or does not know topic ids.

    A topic deleted and created again under the same name gets a new id: offsets saved
    against the old id mean nothing in the new topic.
    """
    from confluent_kafka import TopicCollection

    client = admin(bootstrap)  # kept alive until the answer came
    try:
        futures = client.describe_topics(TopicCollection([topic]), request_timeout=timeout)
        description = futures[topic].result(timeout)
    except (KafkaException, TimeoutError, KeyError):
        return None
    found = getattr(description, "topic_id", None)
    text = None if found is None else str(found)
    # The all-zero id is Kafka's "none" (brokers before topic ids).
    return None if not text or text == "AAAAAAAAAAAAAAAAAAAAAA" else text


def end_offsets(bootstrap: str, topic: str, timeout: float = 10.0) -> dict[int, int]:
    """High watermark of every partition of ``topic``."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "rayline-offsets-probe"})
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1]
            for p in partition_ids(bootstrap, topic, timeout)
        }
    except KafkaException as exc:
        raise StoreUnavailable(f"Kafka did not report offsets of {topic!r}: {exc}") from exc
    finally:
        consumer.close()


def make_consumer(bootstrap: str, group_id: str, **extra: Any) -> Consumer:
    """A consumer for explicit assignment: no auto-commit, offsets committed by the caller."""
    config = {
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "fetch.min.bytes": 1,
        "queued.max.messages.kbytes": 65536,
    }
    config.update(extra)
    return Consumer(config)


class _BatchAck:
    """Counts the delivery reports of one batch and calls ``settle`` after the last.

    ``on_delivery`` runs in the producer's poll thread; ``settle`` must be safe to call
    from there (hand over to an event loop, set a threading event).
    """

    def __init__(self, pending: int, settle: Callable[[], None]) -> None:
        self.pending = pending
        self.error: KafkaError | None = None
        self._settle = settle

    def on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None and self.error is None:
            self.error = err
        self.pending -= 1
        if self.pending == 0:
            self._settle()

    def raise_error(self) -> None:
        if self.error is not None:
            raise StoreUnavailable(f"Kafka did not acknowledge a record: {self.error}")


class AsyncBatchProducer:
    """Produces batches and lets asyncio code (or a plain thread) wait for the broker's
    acknowledgement.

    ``send`` enqueues every record of a batch or none of them: when the producer's
    queue has no room for the whole batch it raises :class:`Backpressure` before
    enqueuing anything. It returns once the broker acknowledged every record
    (``acks=all``, idempotent producer), or raises :class:`StoreUnavailable`.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        linger_ms: int,
        queue_max_messages: int,
        tuning: Mapping[str, Any] | None = None,
    ) -> None:
        """``tuning``: librdkafka settings over the defaults (``compression.type``,
        ``batch.size``...), for the ingest benchmark's producer sweep."""
        self._queue_max = queue_max_messages
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": linger_ms,
                "compression.type": "lz4",
                "queue.buffering.max.messages": queue_max_messages,
                "queue.buffering.max.kbytes": 1024 * 1024,
                "delivery.timeout.ms": 30_000,
                **(tuning or {}),
            }
        )
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="kafka-poll", daemon=True)
        self._poller.start()

    def _poll_loop(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.05)

    def queued(self) -> int:
        return len(self._producer)

    def reserve(self, count: int) -> None:
        """Raise :class:`Backpressure` when the queue has no room for ``count`` more
        records (nothing is enqueued then)."""
        queued = len(self._producer)
        if count and queued + count > self._queue_max:
            raise Backpressure(
                f"Kafka producer queue holds {queued} records, no room for {count} more",
                retry_after=1.0,
            )

    async def send(self, topic: str, records: Sequence[Record]) -> None:
        """Produce ``records`` to ``topic`` and wait for every acknowledgement."""
        await self.send_all([(topic, records)])

    async def send_all(self, batches: Sequence[tuple[str, Sequence[Record]]]) -> None:
        """Produce several topics' records at once (all or none enqueued) and wait for
        every acknowledgement: one delivery count for the whole lot."""
        total = sum(len(records) for _, records in batches)
        if total == 0:
            return
        self.reserve(total)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            loop.call_soon_threadsafe(_resolve, done)

        ack = _BatchAck(total, settle)
        self._enqueue(batches, ack.on_delivery)
        await done
        ack.raise_error()

    def send_blocking(
        self, batches: Sequence[tuple[str, Sequence[Record]]], timeout: float = 30.0
    ) -> None:
        """:meth:`send_all` for a thread with no event loop; waits at most ``timeout``."""
        total = sum(len(records) for _, records in batches)
        if total == 0:
            return
        self.reserve(total)
        acked = threading.Event()
        ack = _BatchAck(total, acked.set)
        self._enqueue(batches, ack.on_delivery)
        if not acked.wait(timeout):
            raise StoreUnavailable(
                f"Kafka did not acknowledge {ack.pending} of {total} records within "
                f"{timeout:.0f} s; check the broker (`rayline status`)"
            )
        ack.raise_error()

    def _enqueue(
        self, batches: Sequence[tuple[str, Sequence[Record]]], callback: Callable[..., None]
    ) -> None:
        # The loop is the hot path of every ingest source: no call per record but
        # produce itself.
        produce = self._producer.produce
        for topic, records in batches:
            for key, value, headers in records:
                try:
                    produce(topic, value, key, headers=headers, on_delivery=callback)
                except BufferError:
                    self._produce(topic, key, value, headers, callback)  # waits for room
                except KafkaException as exc:
                    raise StoreUnavailable(f"Kafka refused a record for {topic!r}: {exc}") from exc

    def _produce(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers, cb: Any
    ) -> None:
        deadline = time.monotonic() + 5.0
        while True:
            try:
                self._producer.produce(topic, value, key, headers=headers, on_delivery=cb)
                return
            except BufferError:
                # The byte bound was hit although the count bound had room: wait for
                # deliveries rather than leave half a batch enqueued.
                if time.monotonic() > deadline:
                    raise
                self._producer.poll(0.01)
            except KafkaException as exc:
                raise StoreUnavailable(f"Kafka refused a record for {topic!r}: {exc}") from exc

    def flush(self, timeout: float = 10.0) -> int:
        return self._producer.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        self._closed.set()
        self._poller.join(timeout=1.0)


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def consumer_lag(bootstrap: str, topic: str, group_id: str, timeout: float = 5.0) -> int:
    """Records of ``topic`` that the group has not committed yet, over all partitions.

    A partition the group never committed counts from its low watermark.
    """
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group_id, "enable.auto.commit": False}
    )
    try:
        parts = [TopicPartition(topic, p) for p in partition_ids(bootstrap, topic, timeout)]
        committed = consumer.committed(parts, timeout=timeout)
        lag = 0
        for tp in committed:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, tp.partition), timeout=timeout
            )
            position = tp.offset if tp.offset >= 0 else low
            lag += max(0, high - position)
        return lag
    except KafkaException as exc:
        raise StoreUnavailable(f"Kafka did not report the lag of {group_id!r}: {exc}") from exc
    finally:
        consumer.close()
