"""Publish one uploaded file: read it from S3, validate every row, produce it to Kafka,
and hand the rows the stream can no longer take to the history job.

Started by the uploads Serve app as a Ray task (:func:`start`); calling :func:`start`
again with the same upload id retries a failed upload (a finished one is left alone).

Design. The file is one object of up to many GB, with a verdict per row that names
the row's index in the whole file. A CSV, JSON or Avro file is read by one Ray task in
one pass (a CSV row can only be found by reading the rows before it): the task streams
the object (``S3Store.open``: bounded read-ahead), splits it into records with
``core.formats.iter_records`` and works through them in batches of ``batch_rows``:
validate, produce the accepted envelopes to ``events.raw`` and the rejected rows to
``events.dlq``, wait for Kafka's acknowledgement of both, then write the counters to
the ``uploads`` row. Memory holds one batch. An NDJSON or Parquet file over
``part_bytes`` is read in parts (``data_jobs/upload_parts.py``: byte ranges, row
groups), one Ray task per part, each doing the same with its own rows, which keep the
whole file's indexes; the job's task plans the parts and waits for them. Reading is not
a Ray Data job: Ray Data (2.60) gives no per-row reject with its row number, and a
Dataset per batch costs more than validating it.

History. An accepted row stamped before the stream's cutoff for its tenant
(``data_jobs.history.stream_cutoff_ms``: now less the tenant's lateness, plus
``history_margin_ms``) would be dead-lettered as late by the workers. Such rows are
staged in S3 instead, one part per batch, before the batch is counted; once the whole
file is read, the history job (``data_jobs.history``, Ray Data over the parts) counts
them into the raw events and recomputes the rollups of their days. The upload is
``done`` when both are.

Idempotence. A row's ``event_id`` comes from the file; a row without one gets
``<upload id>-<row index>``, the same on every run. A retried run starts from the
``rows_read`` counter (of the upload, or of each part: ``upload_parts``), which is
written only after Kafka acknowledged the batch, so at most one batch per part is
published twice, with the same event ids: the partition workers' dedup on
(source, event_id) drops the second copy.

Tenancy. Every event of a file belongs to the uploader's tenant and comes from the
upload's source: a row without ``tenant`` gets it, a row naming another tenant is
rejected (a file cannot write into another tenant), ``source`` is always set.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import orjson
import ray

from adapters.exceptions import Backpressure, StoreUnavailable
from adapters.kafka import Record
from adapters.publisher import EventPublisher, Outgoing, raw_headers
from adapters.s3 import S3Config, S3Store
from adapters.source_stats import SourceStats
from adapters.sources import SourceCatalog
from adapters.uploads import Upload, UploadPart, UploadTable
from core.envelope import validate_events
from core.formats import RecordError, iter_records
from core.source_mapping import apply_mapping, parse_mapping
from data_jobs import upload_parts
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
T = TypeVar("T")


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
    part_bytes: int = 64 << 20
    """Size of the parts an NDJSON or Parquet file is read in, one Ray task each."""
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


@dataclass(slots=True)
class Tally:
    """Rows of one batch (or of a whole run): read, accepted, rejected, and of the
    accepted ones, staged for the history job."""

    read: int = 0
    accepted: int = 0
    rejected: int = 0
    historical: int = 0

    def add(self, other: Tally) -> None:
        self.read += other.read
        self.accepted += other.accepted
        self.rejected += other.rejected
        self.historical += other.historical

    def counts(self) -> tuple[int, int, int, int]:
        return self.read, self.accepted, self.rejected, self.historical


def _first_index(group: list[Item]) -> int:
    first = group[0]
    return first.index if isinstance(first, RecordError) else first[0]


class _Job:
    """One process's share of an upload; built per ``asyncio.run`` (its pools belong
    to one event loop)."""

    def __init__(self, config: UploadJobConfig) -> None:
        self.config = config
        self.table = UploadTable(config.dsn, max_size=1)
        self.catalog = SourceCatalog(config.dsn, max_size=1)
        self.store = S3Store(config.s3)
        self.stats = SourceStats(config.redis_url) if config.redis_url else None

    async def begin(self, upload_id: str) -> Upload | dict[str, Any]:
        """The upload marked running, or its final row when it is done already."""
        upload = await self.table.start(upload_id)
        if upload is not None:
            return upload
        done = await self.table.get(upload_id)
        if done is None:
            raise ValueError(f"upload {upload_id!r} does not exist")
        return done.as_dict()  # published already: a repeated run does nothing

    async def fail(self, upload: Upload, exc: BaseException) -> None:
        await self.table.finish(upload.id, error=f"{type(exc).__name__}: {exc}")
        self._record(upload.source, error=str(exc))

    async def finish(self, upload_id: str) -> dict[str, Any]:
        await self.table.finish(upload_id)
        final = await self.table.get(upload_id)
        assert final is not None
        return final.as_dict()

    async def parts(self, upload: Upload) -> list[UploadPart] | None:
        """The stored plan of parts; [] when the upload can be read in parts and has not
        started (a plan is to be made); None when it is read in one pass."""
        stored = await self.table.parts(upload.id)
        if stored or (upload.format in upload_parts.SPLITTABLE and not upload.rows_read):
            return stored
        return None  # rows_read without a plan: begun in one pass

    async def plan_parts(self, upload: Upload, parts: list[UploadPart]) -> list[UploadPart]:
        return await self.table.plan_parts(upload.id, parts)

    async def publish_all(self, upload: Upload) -> None:
        """Read the whole file in one pass, resuming after the rows already counted."""
        totals = Tally(*_counters(upload))
        with self.store.open(upload.object_key) as stream:  # Parquet seeks to its footer
            rules = await self._source_rules(upload)
            items = iter_records(upload.format, stream, csv_schema=rules[1])
            async for step in self._publish(
                upload, batches(items, self.config.batch_rows, totals.read), rules[0]
            ):
                totals.add(step)
                await self.table.progress(upload.id, *totals.counts())

    async def publish_part(self, upload: Upload, part: UploadPart) -> None:
        """Read one part, resuming after the part's rows already counted (read again
        here: a task Ray retries carries the position of its first run)."""
        stored = {p.part: p for p in await self.table.parts(upload.id)}
        part = stored.get(part.part, part)
        if part.done:
            return
        read = part.rows_read
        with self.store.open(upload.object_key) as stream:
            mapping, _ = await self._source_rules(upload)
            items = upload_parts.items(upload.format, stream, part)
            groups = batches(items, self.config.batch_rows, skip=read)
            async for step in self._publish(upload, groups, mapping):
                read += step.read
                await self.table.part_progress(upload.id, part.part, read, step.counts())
        await self.table.part_done(upload.id, part.part)

    async def _publish(
        self, upload: Upload, groups: Iterator[list[Item]], mapping: Any
    ) -> AsyncIterator[Tally]:
        """Validate and publish each group; yield its tally once Kafka acknowledged it
        (and its historical rows are staged), for the caller to count."""
        publisher = EventPublisher.connect(
            self.config.bootstrap,
            self.config.raw_topic,
            self.config.dlq_topic,
            linger_ms=self.config.linger_ms,
            queue_max_messages=max(100_000, 4 * self.config.batch_rows),
        )
        history = self.config.history
        try:
            for group in groups:
                now_ms = int(time.time() * 1000)
                batch = split_batch(group, upload, now_ms, mapping)
                old: list[Record] = []
                if history is not None and batch.raw:
                    lateness = history.processing.lateness
                    margin = self.config.history_margin_ms
                    cutoff = stream_cutoff_ms(upload.tenant, now_ms, lateness, margin)
                    batch.raw, old = split_history(batch.raw, cutoff)
                    if old:  # staged before the counters say the group is read
                        stage(self.store, staged_key(upload.id, _first_index(group)), old)
                await self._send(publisher, batch)
                self._record(upload.source, len(batch.accepted), len(batch.rejected))
                yield Tally(
                    len(group), len(batch.accepted) + len(old), len(batch.rejected), len(old)
                )
        finally:
            publisher.close(5)

    async def history(self, upload: Upload) -> None:
        """Count the staged historical rows (when the job has a history stage)."""
        if self.config.history is None:
            return
        keys = self.store.all_keys(f"{STAGING_PREFIX}{upload.id}/")
        result = await asyncio.to_thread(run_history, self.config.history, keys)
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


def _counters(upload: Upload) -> tuple[int, int, int, int]:
    return upload.rows_read, upload.rows_accepted, upload.rows_rejected, upload.rows_historical


def _in_job(config: UploadJobConfig, work: Callable[[_Job], Awaitable[T]]) -> T:
    """Run ``work`` on a fresh job (pools, producer) in its own event loop."""

    async def main() -> T:
        job = _Job(config)
        try:
            return await work(job)
        finally:
            await job.close()

    return asyncio.run(main())


def publish_upload(config: UploadJobConfig, upload_id: str) -> dict[str, Any]:
    """Publish the upload's rows; return its final ``uploads`` row as a dict.

    An NDJSON or Parquet file of more than one part is read by one Ray task per part
    (``data_jobs/upload_parts.py``), as many at once as the cluster has CPUs; this task
    waits for them in ``ray.wait``, which lends its CPU to them meanwhile.

    Raises:
        StoreUnavailable: S3, Kafka or PostgreSQL failed; the row says ``failed`` and a
            retry resumes after the last acknowledged batch (of every part).
    """
    started = _in_job(config, lambda job: job.begin(upload_id))
    if isinstance(started, dict):
        return started
    upload = started
    try:
        parts = _in_job(config, lambda job: job.parts(upload))
        if parts == []:
            # Planned on this thread: a Ray task lends its CPU to the tasks it waits for
            # only while its main thread waits (a thread's ray.get keeps it: deadlock
            # on a one-CPU cluster).
            new = upload_parts.plan(S3Store(config.s3), upload, config.part_bytes)
            if len(new) > 1:  # a file of one part is read in one pass, with no plan
                parts = _in_job(config, lambda job: job.plan_parts(upload, new))
            else:
                parts = None
        if parts is None:
            _in_job(config, lambda job: job.publish_all(upload))
        else:
            _publish_parts(config, upload, [part for part in parts if not part.done])
        _in_job(config, lambda job: job.history(upload))
    except Exception as exc:
        error = exc
        _in_job(config, lambda job: job.fail(upload, error))
        raise
    return _in_job(config, lambda job: job.finish(upload_id))


def publish_part(config: UploadJobConfig, upload: Upload, part: UploadPart) -> None:
    """Publish one part of an upload (a Ray task of :func:`publish_upload`)."""
    _in_job(config, lambda job: job.publish_part(upload, part))


def _publish_parts(config: UploadJobConfig, upload: Upload, parts: list[UploadPart]) -> None:
    """Publish the parts, in parallel tasks when there are several; raise the first
    failure once every part has stopped (a retry must not meet a part still running)."""
    if len(parts) == 1:
        publish_part(config, upload, parts[0])
        return
    pending = [_remote_part.remote(config, upload, part) for part in parts]
    failure: BaseException | None = None
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(ready[0])
        except ray.exceptions.RayTaskError as exc:
            failure = failure or exc.as_instanceof_cause()
    if failure is not None:
        raise failure


# Retried on store outages only: a bad file fails the same way every time.
_remote_publish = ray.remote(  # type: ignore[call-overload]
    num_cpus=1, max_retries=3, retry_exceptions=[StoreUnavailable]
)(publish_upload)
_remote_part = ray.remote(  # type: ignore[call-overload]
    num_cpus=1, max_retries=3, retry_exceptions=[StoreUnavailable]
)(publish_part)


def start(config: UploadJobConfig, upload_id: str) -> ray.ObjectRef[dict[str, Any]]:
    """Start the job on the Ray cluster this process is connected to."""
    ref: ray.ObjectRef[dict[str, Any]] = _remote_publish.remote(config, upload_id)
    return ref
