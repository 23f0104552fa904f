"""The one publishing path of every ingest source: validated envelopes to ``events.raw``,
rejected records to ``events.dlq``, acknowledged together.

The API edge, webhooks, the upload job, the REST pollers, the MQTT bridge and the CDC
applier all publish through :class:`EventPublisher`, so that each one writes the same
records (keys, headers, encoding) and gains from every change made here:

* **key** ``<tenant>:<entity>`` (:func:`core.envelope.partition_key`), computed for the
  whole batch at once: every event of one entity lands on one partition, whichever
  path brought it;
* **value** the envelope as JSON (or, where a registry schema applies, the Avro record
  the caller encoded), refused with a reason when it cannot be written or is larger
  than :data:`core.envelope.MAX_EVENT_BYTES`;
* **headers** ``schema`` and ``traceparent`` (W3C), built once per batch and shared by
  its records, plus what the path adds (``origin.upload``, ``schema.subject``...);
* **dead letters** with :func:`core.dead_letters.dead_letter_headers` (reason, stage,
  origin, received time);
* **backpressure** a batch is enqueued whole or not at all (:class:`Backpressure` when
  the producer's queue has no room), and :meth:`EventPublisher.publish` returns only
  once Kafka acknowledged every record of both topics (:class:`StoreUnavailable`
  otherwise). Each path decides what a refusal means for it (503 at the edge, a retry
  in the pollers, the job, the bridge).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from adapters.kafka import AsyncBatchProducer, Headers, Record
from core.dead_letters import dead_letter_headers
from core.envelope import ENVELOPE_SCHEMA, size_problem

_SCHEMA_HEADER = ("schema", ENVELOPE_SCHEMA.encode())


def new_traceparent() -> bytes:
    """A fresh W3C trace context (version 00, sampled)."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01".encode()


def raw_headers(traceparent: bytes | None = None, *extra: tuple[str, bytes]) -> Headers:
    """The headers every record of one batch on ``events.raw`` shares: the envelope
    schema, the trace context (a new trace when ``traceparent`` is None), then
    ``extra``. Built once per batch: the producer copies them per record anyway."""
    return [_SCHEMA_HEADER, ("traceparent", traceparent or new_traceparent()), *extra]


def envelope_keys(envelopes: Sequence[dict[str, Any]]) -> list[bytes]:
    """The Kafka keys of a batch of envelopes, as :func:`core.envelope.partition_key`
    gives them one at a time (``<tenant>:<entity>``)."""
    return [f"{e['tenant']}:{e['entity']}".encode() for e in envelopes]


@dataclass
class Outgoing:
    """One batch on its way to Kafka: the accepted records and the dead letters."""

    raw: list[Record] = field(default_factory=list)
    dead: list[Record] = field(default_factory=list)

    def add_envelopes(
        self, envelopes: Sequence[dict[str, Any]], headers: Headers
    ) -> list[tuple[int, str]]:
        """Add validated envelopes as JSON records sharing ``headers``.

        Returns:
            ``(position, problem)`` of each envelope that cannot be written (too deep
            for JSON, too large); those are not added: the caller dead-letters them
            with its own origin.
        """
        refused: list[tuple[int, str]] = []
        keys = envelope_keys(envelopes)
        append = self.raw.append
        dumps = orjson.dumps
        for position, envelope in enumerate(envelopes):
            try:
                data = dumps(envelope)
            except orjson.JSONEncodeError as exc:
                refused.append((position, f"cannot be written as JSON: {exc}"))
                continue
            if len(data) > _MAX_FAST_BYTES:
                problem = size_problem(len(data))
                if problem is not None:
                    refused.append((position, problem))
                    continue
            append((keys[position], data, headers))
        return refused

    def add(self, key: bytes | None, value: bytes, headers: Headers) -> None:
        """Add one record encoded by the caller (e.g. Avro under a registry schema)."""
        self.raw.append((key, value, headers))

    def dead_letter(
        self,
        stage: str,
        reason: str,
        value: bytes,
        received_at_ms: int | None,
        *,
        key: bytes | None = None,
        detail: str | None = None,
        **origin: str | int,
    ) -> None:
        """Add a rejected record to the dead letters, with its reason and origin."""
        headers = dead_letter_headers(stage, reason, received_at_ms, detail=detail, **origin)
        self.dead.append((key, value, list(headers)))


# Below this many bytes an envelope cannot be over the limit: skip the call.
_MAX_FAST_BYTES = 64 * 1024


class EventPublisher:
    """Produces :class:`Outgoing` batches to the raw and dead-letter topics.

    One per process (it owns a producer and its poll thread); safe to share between
    the coroutines of one event loop and, for :meth:`publish_blocking`, threads.
    """

    def __init__(self, producer: AsyncBatchProducer, raw_topic: str, dlq_topic: str) -> None:
        self.producer = producer
        self.raw_topic = raw_topic
        self.dlq_topic = dlq_topic

    @classmethod
    def connect(
        cls,
        bootstrap: str,
        raw_topic: str,
        dlq_topic: str,
        *,
        linger_ms: int = 5,
        queue_max_messages: int = 200_000,
    ) -> EventPublisher:
        """A publisher with a producer of its own."""
        producer = AsyncBatchProducer(
            bootstrap, linger_ms=linger_ms, queue_max_messages=queue_max_messages
        )
        return cls(producer, raw_topic, dlq_topic)

    async def publish(self, batch: Outgoing) -> None:
        """Enqueue the batch's records (all or none) and wait for Kafka's
        acknowledgement of each.

        Raises:
            Backpressure: the producer's queue has no room for the batch; nothing was
                enqueued, the caller may retry after ``retry_after``.
            StoreUnavailable: Kafka refused or did not acknowledge a record.
        """
        self.producer.reserve(len(batch.raw) + len(batch.dead))
        await asyncio.gather(
            self.producer.send(self.raw_topic, batch.raw),
            self.producer.send(self.dlq_topic, batch.dead),
        )

    def publish_blocking(self, batch: Outgoing, timeout: float = 30.0) -> None:
        """:meth:`publish` for a thread with no event loop (e.g. the CDC applier)."""
        self.producer.reserve(len(batch.raw) + len(batch.dead))
        self.producer.send_blocking(
            [(self.raw_topic, batch.raw), (self.dlq_topic, batch.dead)], timeout
        )

    def queued(self) -> int:
        """Records enqueued and not yet acknowledged."""
        return self.producer.queued()

    def close(self, timeout: float = 10.0) -> None:
        self.producer.close(timeout)
