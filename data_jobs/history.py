"""History: events behind the stream's watermark, counted by a Ray Data job.

An uploaded file of last week's events cannot go through the stream: every partition's
watermark is past them, so the workers would dead-letter each one as ``late``. The
upload job (``data_jobs.publish_upload``) therefore sends only the rows the stream can
still take (:func:`stream_cutoff_ms`) to ``events.raw``; the older rows it stages in S3
(``history/<upload id>/<first row>.ndjson``, the exact envelope bytes it would have
produced), and once the whole file is read it runs :func:`run_history` over them.

The job is Ray Data: one block per staged part, a pool of :class:`HistoryPass` actors
each of which, per part,

1. runs the stream's own columnar pass (``core.batch.process_batch``) over the part on
   a fresh partition state: the same decoding, schema checks, transforms (a filter
   drops what the stream would drop), enrichment and dedup by ``(source, event_id)``;
   a fresh state has no watermark, so nothing is late;
2. drops the events ClickHouse already holds (same tenant, ``(source, event_id)``,
   within the part's time range): a re-upload, or a retried job, adds nothing;
3. writes the rest straight to the raw events table through the ClickHouse owner
   actor (with partition :data:`HISTORY_PARTITION`: they never were in Kafka).

Then the rollups of every day the written events touch are recomputed
(``Rollups.rebuild``): the minutes already sealed get the new events; those not sealed
yet take them from the raw events when they are sealed, as any minute does. The query
API reads both. The workers' live windows (``/latest``) are left alone: they are the
stream's view.

Idempotent: a retried upload rewrites the same staged parts (same keys, same bytes)
and the job drops what is stored already, so every row counts once however often it
runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import ray
from confluent_kafka import Producer

from adapters.exceptions import StoreUnavailable
from adapters.kafka import Record
from adapters.s3 import S3Config, S3Store
from core.batch import Runtime, process_batch, raw_event_rows
from core.event_time import Lateness
from core.partition_state import PartitionState, ProcessingConfig, RecordRef
from core.query_plan import utc_datetime

log = logging.getLogger(__name__)

HISTORY_PARTITION = 65535
"""The ``partition`` of raw events written by the history job (Kafka's are smaller)."""

STAGING_PREFIX = "history/"


def stream_cutoff_ms(tenant: str, now_ms: int, lateness: Lateness, margin_ms: int) -> int:
    """The oldest event time the stream still takes from ``tenant`` for a record
    produced now.

    A partition's watermark for a tenant never passes the newest append time it has
    seen minus the tenant's lateness, and a record produced now is appended after
    every record before it; so an event stamped at or after ``now - lateness`` is never
    late. ``margin_ms`` covers the time until the record is produced.
    """
    return now_ms - lateness.of(tenant) + margin_ms


def split_history(records: Sequence[Record], cutoff_ms: int) -> tuple[list[Record], list[Record]]:
    """(records for the stream, records older than ``cutoff_ms`` for the history job).

    The records are validated envelopes (JSON with an epoch-ms ``ts``).
    """
    stream: list[Record] = []
    history: list[Record] = []
    loads = orjson.loads
    for record in records:
        (history if loads(record[1])["ts"] < cutoff_ms else stream).append(record)
    return stream, history


def staged_key(upload_id: str, first_row: int) -> str:
    return f"{STAGING_PREFIX}{upload_id}/{first_row:012d}.ndjson"


def stage(store: S3Store, key: str, records: Sequence[Record]) -> None:
    """Write one part: the envelopes' bytes, one per line (JSON has no raw newline)."""
    with store.writer(key, "application/x-ndjson") as out:
        out.write(b"\n".join(record[1] for record in records) + b"\n")
        out.complete()


@dataclass
class PartResult:
    """What one staged part came to."""

    rows: int = 0
    written: int = 0
    stored_already: int = 0
    duplicates: int = 0
    filtered: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    first_ms: int | None = None
    last_ms: int | None = None


def history_rows(
    values: Sequence[bytes], processing: ProcessingConfig, runtime: Runtime
) -> tuple[pa.Table | None, PartResult]:
    """The raw-event rows of ``values`` (envelope bytes) through the stream's pass."""
    state = PartitionState(HISTORY_PARTITION, processing, 0)
    refs = [RecordRef(i, None, value, None) for i, value in enumerate(values)]
    outcomes, counted = process_batch(
        {HISTORY_PARTITION: state}, {HISTORY_PARTITION: refs}, runtime
    )
    outcome = outcomes[HISTORY_PARTITION]
    result = PartResult(
        rows=len(values),
        duplicates=outcome.duplicates,
        filtered=outcome.filtered,
        rejected=[(ref.offset, reason) for ref, reason in outcome.rejected],
    )
    rows = raw_event_rows(counted, {HISTORY_PARTITION: refs}, {HISTORY_PARTITION})
    return rows, result


def not_stored(rows: pa.Table, stored: set[tuple[str, str]]) -> pa.Table:
    """``rows`` but those whose ``(source, event_id)`` is in ``stored``."""
    if not stored:
        return rows
    keys = zip(rows["source"].to_pylist(), rows["event_id"].to_pylist(), strict=True)
    return rows.filter(pa.array([key not in stored for key in keys]))


@dataclass(frozen=True, slots=True)
class HistoryConfig:
    """Everything the job needs, as plain data (it travels to the Ray workers)."""

    processing: ProcessingConfig
    s3: S3Config
    dsn: str
    bootstrap: str
    dlq_topic: str
    namespace: str
    owner_actor: str
    database: str
    redis_url: str | None = None
    enrichment_ttl_ms: int = 30_000
    rules_refresh_ms: int = 5_000
    concurrency: int | None = None
    """Actors of the job's pass at most (None: the cluster's CPUs when the job starts)."""


def job_concurrency(configured: int | None) -> int:
    """How many actors a batch job's pass runs (and how many parts its shuffles make):
    ``configured``, else the connected cluster's CPUs, so that a job scales with it."""
    if configured is not None:
        return max(1, configured)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


class HistoryPass:
    """A Ray Data actor: one staged part per row of its batch; see the module."""

    def __init__(self, config: HistoryConfig) -> None:
        from adapters.postgres import MetadataStore
        from adapters.runtime_inputs import RuntimeInputs

        self._config = config
        self._store = S3Store(config.s3)
        # Kept open while the actor lives: Avro decoding reads schemas through it.
        self._inputs = RuntimeInputs(config, MetadataStore(config.dsn))
        self._runtime, _errors = self._inputs.refresh(Runtime(), int(time.time() * 1000), True)
        self._owner = ray.get_actor(config.owner_actor, namespace=config.namespace)
        self._dlq = Producer({"bootstrap.servers": config.bootstrap, "linger.ms": 20})

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = [self._part(str(key)) for key in batch["key"].to_pylist()]
        return pa.table(
            {
                "key": batch["key"],
                "rows": [r.rows for r in results],
                "written": [r.written for r in results],
                "stored_already": [r.stored_already for r in results],
                "duplicates": [r.duplicates for r in results],
                "filtered": [r.filtered for r in results],
                "rejected": [len(r.rejected) for r in results],
                "reasons": [orjson.dumps(r.rejected[:20]).decode() for r in results],
                "first_ms": pa.array([r.first_ms for r in results], pa.int64()),
                "last_ms": pa.array([r.last_ms for r in results], pa.int64()),
            }
        )

    def _part(self, key: str) -> PartResult:
        with self._store.open(key) as stream:
            values = [line for line in stream.read().split(b"\n") if line]
        rows, result = history_rows(values, self._config.processing, self._runtime)
        self._dead_letter(key, values, result.rejected)
        if rows is None or not rows.num_rows:
            return result
        first, last = pc.min_max(rows["ts"]).values()
        result.first_ms, result.last_ms = _ms(first), _ms(last)
        stored = self._stored(rows, result.first_ms, result.last_ms)
        fresh = not_stored(rows, stored)
        result.stored_already = rows.num_rows - fresh.num_rows
        if fresh.num_rows:
            ref: Any = self._owner.insert_events.remote(fresh)
            result.written = int(ray.get(ref))
        return result

    def _dead_letter(self, key: str, values: list[bytes], rejected: list[tuple[int, str]]) -> None:
        """Rows the stream's pass refused (schema, transform) go where the stream's go."""
        if not rejected:
            return
        topic = self._config.dlq_topic
        for line, reason in rejected:
            headers: list[tuple[str, str | bytes | None]] = [
                ("reason", reason.encode()),
                ("stage", b"history"),
                ("origin.history", key.encode()),
                ("origin.line", str(line).encode()),
            ]
            self._dlq.produce(topic, values[line], headers=headers)
            self._dlq.poll(0)
        if self._dlq.flush(30) > 0:
            raise StoreUnavailable("Kafka did not acknowledge the history job's dead letters")

    def _stored(self, rows: pa.Table, first_ms: int, last_ms: int) -> set[tuple[str, str]]:
        tenants = pc.unique(rows["tenant"]).to_pylist()
        ids = pc.unique(rows["event_id"]).to_pylist()
        db = self._config.database
        sql = (
            f"SELECT DISTINCT source, event_id FROM {db}.events "
            "WHERE tenant IN {tenants:Array(String)} AND ts >= {first:DateTime64(3)} "
            "AND ts <= {last:DateTime64(3)} AND event_id IN {ids:Array(String)}"
        )
        params = {
            "tenants": tenants,
            "first": utc_datetime(first_ms),
            "last": utc_datetime(last_ms),
            "ids": ids,
        }
        ref: Any = self._owner.run_query.remote(sql, params)
        _columns, found = ray.get(ref)
        return {(str(source), str(event_id)) for source, event_id in found}


def _ms(value: pa.Scalar) -> int:
    return int(pc.cast(value, pa.int64()).as_py())


@dataclass
class HistoryResult:
    """The job's totals, and the days whose rollups were recomputed."""

    parts: int = 0
    rows: int = 0
    written: int = 0
    stored_already: int = 0
    duplicates: int = 0
    filtered: int = 0
    rejected: int = 0
    reasons: list[tuple[int, str]] = field(default_factory=list)
    rebuilt: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "parts": self.parts,
            "rows": self.rows,
            "written": self.written,
            "stored_already": self.stored_already,
            "duplicates": self.duplicates,
            "filtered": self.filtered,
            "rejected": self.rejected,
            "rebuilt": self.rebuilt,
        }


def run_history(config: HistoryConfig, keys: Sequence[str]) -> HistoryResult:
    """Count the staged parts ``keys`` (see the module); must run on the Ray cluster.

    Raises:
        StoreUnavailable: S3, ClickHouse or PostgreSQL failed; running it again is safe.
    """
    result = HistoryResult(parts=len(keys))
    if not keys:
        return result
    dataset = ray.data.from_items([{"key": key} for key in keys], override_num_blocks=len(keys))
    counted = dataset.map_batches(
        HistoryPass,
        fn_constructor_kwargs={"config": config},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=min(job_concurrency(config.concurrency), len(keys))
        ),
        # The job runs inside an upload task that holds a CPU while it waits: actors
        # asking for one more would wait for ever once uploads hold every CPU (two
        # files on two cores). The pool's size bounds what they take instead.
        num_cpus=0,
    )
    first: int | None = None
    last: int | None = None
    try:
        for row in _rows(counted):
            result.rows += row["rows"]
            result.written += row["written"]
            result.stored_already += row["stored_already"]
            result.duplicates += row["duplicates"]
            result.filtered += row["filtered"]
            result.rejected += row["rejected"]
            result.reasons.extend((int(i), str(r)) for i, r in orjson.loads(row["reasons"]))
            if row["first_ms"] is not None:
                first = row["first_ms"] if first is None else min(first, row["first_ms"])
                last = row["last_ms"] if last is None else max(last, row["last_ms"])
    except ray.exceptions.RayError as exc:
        raise StoreUnavailable(f"the history job failed: {exc}") from exc
    if first is not None and last is not None:
        owner = ray.get_actor(config.owner_actor, namespace=config.namespace)
        ref: Any = owner.rebuild_rollups.remote(first, last + 1)
        result.rebuilt = ray.get(ref)
    log.info("history: %s", result.as_dict())
    return result


def _rows(dataset: Any) -> Iterator[dict[str, Any]]:
    yield from dataset.iter_rows()
