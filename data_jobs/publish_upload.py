"""Publish one uploaded file: read it from S3, validate every row, produce it to Kafka,
and hand the rows the stream can no longer take to the history job.

Started by the uploads Serve app as a Ray task (:func:`start`); calling :func:`start`
again with the same upload id retries a failed upload (a finished one is left alone).

Design. The file is one object of up to many GB whose rows must be read in order (a
CSV row can only be found by reading the rows before it), with a verdict per row. So
one Ray task streams the object (``S3Store.open``: bounded read-ahead), splits it into
records with ``core.formats.iter_records`` and works through them in batches of
``batch_rows``: validate, produce the accepted envelopes to ``events.raw`` and the
rejected rows to ``events.dlq``, wait for Kafka's acknowledgement of both, then write
the counters to the ``uploads`` row. Memory holds one batch. Reading the file is not a
Ray Data job: it has no streaming source for a single row-ordered file in Ray 2.60
(``read_csv`` and friends parallelise over files or Parquet row groups and cannot give a
per-row reject with its row number).

History. An accepted row stamped before the stream's cutoff for its tenant
(``data_jobs.history.stream_cutoff_ms``: now less the tenant's lateness, plus
``history_margin_ms``) would be dead-lettered as late by the workers. Such rows are
staged in S3 instead, one part per batch, before the batch is counted; once the whole
file is read, the history job (``data_jobs.history``, Ray Data over the parts) counts
them into the raw events and recomputes the rollups of their days. The upload is
``done`` when both are.

Idempotence. A row's ``event_id`` comes from the file; a row without one gets
``<upload id>-<row index>``, the same on every run. A retried run starts from the
``rows_read`` counter, which is written only after Kafka acknowledged the batch, so at
most one batch is published twice, with the same event ids: the partition workers'
dedup on (source, event_id) drops the second copy.

Tenancy. Every event of a file belongs to the uploader's tenant and comes from the
upload's source: a row without ``tenant`` gets it, a row naming another tenant is
rejected (a file cannot write into another tenant), ``source`` is always set.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import orjson
import ray

from adapters.exceptions import Backpressure, StoreUnavailable
from adapters.kafka import Record
from adapters.publisher import EventPublisher, Outgoing, raw_headers
from adapters.s3 import S3Config, S3Store
from adapters.source_stats import SourceStats
from adapters.sources import SourceCatalog
from adapters.uploads import Upload, UploadTable
from core.envelope import validate_events
from core.formats import RecordError, iter_records
from core.source_mapping import apply_mapping, parse_mapping
from data_jobs.history import (
    STAGING_PREFIX,
    HistoryConfig,
    run_history,
    split_history,
    stage,
    staged_key,
    stream_cutoff_ms,
)

_SEND_ATTEMPTS = 30
Item: TypeAlias = "tuple[int, Any] | RecordError"


@dataclass(frozen=True, slots=True)
class UploadJobConfig:
    """Everything the job needs, as plain data (it travels to the Ray worker)."""

    s3: S3Config
    dsn: str
    bootstrap: str
    raw_topic: str
    dlq_topic: str
    redis_url: str | None = None
    batch_rows: int = 5000
    linger_ms: int = 20
    history: HistoryConfig | None = None
    """Where rows behind the stream's watermark go (None: all rows to the stream)."""
    history_margin_ms: int = 5_000
    """How long a record may take from its verdict to Kafka: rows stamped less than this
    much after ``now - lateness`` go to history too (a late row in the stream would be
    dead-lettered, a recent one in history is only missing from the live windows)."""


class Batch(Outgoing):
    """One batch's verdicts: records for the raw topic (``accepted``) and for the
    dead-letter topic (``rejected``), published through the shared publisher."""

    @property
    def accepted(self) -> list[Record]:
        return self.raw

    @property
    def rejected(self) -> list[Record]:
        return self.dead


def event_id_for(upload_id: str, index: int) -> str:
    """The id of a row that has none: the same on every run of the same upload."""
    return f"{upload_id}-{index}"


def _stamp(record: Any, index: int, upload: Upload) -> tuple[Any, str | None]:
    """The record with the upload's tenant, source and a default id; or why it cannot be."""
    if not isinstance(record, dict):
        return record, None  # validation names the type
    tenant = record.get("tenant", upload.tenant)
    if tenant != upload.tenant:
        return record, (
            f"tenant: row names tenant {tenant!r}, but the file was uploaded by tenant "
            f"{upload.tenant!r}; remove the column or upload with that tenant's key"
        )
    stamped = dict(record)
    stamped["tenant"] = upload.tenant
    stamped["source"] = upload.source
    stamped.setdefault("event_id", event_id_for(upload.id, index))
    return stamped, None


def _raw_bytes(record: Any) -> bytes:
    return orjson.dumps(record, default=str, option=orjson.OPT_NON_STR_KEYS)


def _dead_letter(
    batch: Batch, upload: Upload, index: int, reason: str, value: bytes, at_ms: int
) -> None:
    batch.dead_letter(
        "upload",
        reason,
        value,
        at_ms,
        source=upload.source,
        upload=upload.id,
        index=index,
        tenant=upload.tenant,
    )


def split_batch(
    items: Iterable[Item],
    upload: Upload,
    received_at_ms: int,
    mapping: Any = None,
) -> Batch:
    """Validate one batch of rows; every row ends in exactly one of the two lists.

    Args:
        items: ``(row index, record)`` pairs and ``RecordError`` values from the parser.
        upload: the upload the rows belong to (tenant, source, id).
        received_at_ms: the batch's ``received_at``.
        mapping: a parsed ``core.source_mapping`` mapping, or None when the rows are
            envelopes already.
    """
    batch = Batch()
    candidates: list[tuple[int, Any]] = []
    for item in items:
        if isinstance(item, RecordError):
            _dead_letter(batch, upload, item.index, item.message, item.raw, received_at_ms)
            continue
        index, record = item
        if mapping is not None:
            record, problems = _map(mapping, record, received_at_ms)
            if problems:
                reason = "mapping: " + "; ".join(problems)
                _dead_letter(batch, upload, index, reason, _raw_bytes(item[1]), received_at_ms)
                continue
        stamped, problem = _stamp(record, index, upload)
        if problem is not None:
            _dead_letter(batch, upload, index, problem, _raw_bytes(record), received_at_ms)
            continue
        candidates.append((index, stamped))
    _validate_into(batch, candidates, upload, received_at_ms)
    return batch


def _map(mapping: Any, record: Any, received_at_ms: int) -> tuple[Any, list[str]]:
    event, problems = apply_mapping(mapping, record, headers={}, received_at_ms=received_at_ms)
    return event, list(problems)


def _validate_into(
    batch: Batch, candidates: list[tuple[int, Any]], upload: Upload, received_at_ms: int
) -> None:
    envelopes, errors = validate_events(
        [record for _, record in candidates],
        default_source=upload.source,
        received_at_ms=received_at_ms,
    )
    problems: dict[int, list[str]] = {}
    for error in errors:
        assert error.index is not None  # a list was validated: every error has its event
        where = f"{error.field}: " if error.field else ""
        problems.setdefault(error.index, []).append(where + error.message)
    for position, (index, record) in enumerate(candidates):
        if position in problems:
            reason = "; ".join(problems[position])
            _dead_letter(batch, upload, index, reason, _raw_bytes(record), received_at_ms)
    accepted = [c for p, c in enumerate(candidates) if p not in problems]
    headers = raw_headers(None, ("origin.upload", upload.id.encode()))
    for position, problem in batch.add_envelopes(envelopes, headers):
        index, record = accepted[position]
        _dead_letter(batch, upload, index, problem, _raw_bytes(record), received_at_ms)


def batches(items: Iterator[Item], size: int, skip: int = 0) -> Iterator[list[Item]]:
    """Groups of ``size`` items, after dropping the first ``skip`` (already published)."""
    for _ in range(skip):
        if next(items, None) is None:
            return
    while True:
        group: list[Item] = []
        for item in items:
            group.append(item)
            if len(group) >= size:
                break
        if not group:
            return
        yield group


class _Job:
    def __init__(self, config: UploadJobConfig) -> None:
        self.config = config
        self.table = UploadTable(config.dsn, max_size=1)
        self.catalog = SourceCatalog(config.dsn, max_size=1)
        self.store = S3Store(config.s3)
        self.stats = SourceStats(config.redis_url) if config.redis_url else None

    async def run(self, upload_id: str) -> dict[str, Any]:
        upload = await self.table.start(upload_id)
        if upload is None:
            done = await self.table.get(upload_id)
            if done is None:
                raise ValueError(f"upload {upload_id!r} does not exist")
            return done.as_dict()  # published already: a repeated run does nothing
        try:
            await self._publish(upload)
        except Exception as exc:
            await self.table.finish(upload_id, error=f"{type(exc).__name__}: {exc}")
            self._record(upload.source, error=str(exc))
            raise
        await self.table.finish(upload_id)
        final = await self.table.get(upload_id)
        assert final is not None
        return final.as_dict()

    async def _publish(self, upload: Upload) -> None:
        mapping, csv_schema = await self._source_rules(upload)
        publisher = EventPublisher.connect(
            self.config.bootstrap,
            self.config.raw_topic,
            self.config.dlq_topic,
            linger_ms=self.config.linger_ms,
            queue_max_messages=max(100_000, 4 * self.config.batch_rows),
        )
        read, accepted, rejected = upload.rows_read, upload.rows_accepted, upload.rows_rejected
        historical = upload.rows_historical
        history = self.config.history
        try:
            # ranged reads as consumed; Parquet seeks to its footer first
            with self.store.open(upload.object_key) as stream:
                items = iter_records(upload.format, stream, csv_schema=csv_schema)
                for group in batches(items, self.config.batch_rows, skip=read):
                    now_ms = int(time.time() * 1000)
                    batch = split_batch(group, upload, now_ms, mapping)
                    old: list[Record] = []
                    if history is not None and batch.raw:
                        lateness = history.processing.lateness
                        margin = self.config.history_margin_ms
                        cutoff = stream_cutoff_ms(upload.tenant, now_ms, lateness, margin)
                        batch.raw, old = split_history(batch.raw, cutoff)
                        if old:  # staged before the counters say the group is read
                            stage(self.store, staged_key(upload.id, read), old)
                            historical += len(old)
                    await self._send(publisher, batch)
                    read += len(group)
                    accepted += len(batch.accepted) + len(old)
                    rejected += len(batch.rejected)
                    await self.table.progress(upload.id, read, accepted, rejected, historical)
                    self._record(upload.source, len(batch.accepted), len(batch.rejected))
        finally:
            publisher.close(5)
        if history is not None:
            keys = self.store.all_keys(f"{STAGING_PREFIX}{upload.id}/")
            result = await asyncio.to_thread(run_history, history, keys)
            await self.table.history_done(upload.id, result.written, result.stored_already)

    async def _source_rules(self, upload: Upload) -> tuple[Any, Any]:
        """The source's payload mapping (None: rows are envelopes) and, for CSV, the
        Avro schema of its subject that types the cells (None: cells stay strings)."""
        source = await self.catalog.source(upload.source)
        if source is None:
            return None, None
        mapping = parse_mapping(source.mapping) if source.mapping else None
        csv_schema = None
        if upload.format == "csv" and source.schema_subject:
            found = await self.catalog.latest_schema(source.schema_subject)
            csv_schema = None if found is None else orjson.loads(found[1])
        return mapping, csv_schema

    async def _send(self, publisher: EventPublisher, batch: Batch) -> None:
        for attempt in range(_SEND_ATTEMPTS):
            try:
                await publisher.publish(batch)
                return
            except Backpressure as exc:
                # `publish` enqueues all records or none, so a repeat sends no copy.
                if attempt == _SEND_ATTEMPTS - 1:
                    raise StoreUnavailable(
                        f"Kafka's producer queue stayed full for {_SEND_ATTEMPTS} "
                        f"attempts while publishing upload rows: {exc}"
                    ) from exc
                await asyncio.sleep(exc.retry_after)

    def _record(
        self, source: str, accepted: int = 0, rejected: int = 0, error: str | None = None
    ) -> None:
        if self.stats is not None:
            self.stats.record(
                source,
                now_ms=int(time.time() * 1000),
                accepted=accepted,
                rejected=rejected,
                errors=1 if error else 0,
                error=error,
            )

    async def close(self) -> None:
        await self.table.close()
        await self.catalog.close()
        if self.stats is not None:
            self.stats.close()


def publish_upload(config: UploadJobConfig, upload_id: str) -> dict[str, Any]:
    """Publish the upload's rows; return its final ``uploads`` row as a dict.

    Raises:
        StoreUnavailable: S3, Kafka or PostgreSQL failed; the row says ``failed`` and a
            retry resumes after the last acknowledged batch.
    """

    async def main() -> dict[str, Any]:
        job = _Job(config)
        try:
            return await job.run(upload_id)
        finally:
            await job.close()

    return asyncio.run(main())


# Retried on store outages only: a bad file fails the same way every time.
_remote_publish = ray.remote(  # type: ignore[call-overload]
    num_cpus=1, max_retries=3, retry_exceptions=[StoreUnavailable]
)(publish_upload)


def start(config: UploadJobConfig, upload_id: str) -> ray.ObjectRef[dict[str, Any]]:
    """Start the job on the Ray cluster this process is connected to."""
    ref: ray.ObjectRef[dict[str, Any]] = _remote_publish.remote(config, upload_id)
    return ref
