"""Replay the archive, compare with live: ``rayline verify --from --to``.

The raw archive (docs/archive.md) holds every record of ``events.raw`` as Kafka had it.
This job (Ray Data) reads the archive's Parquet files of a time range, runs each batch
through the stream's own pass (``core.batch.process_batch``: decoding, schema checks,
transforms, enrichment), takes out what the stream had good reason not to count, and
sums the rest into 1-minute windows per ``(tenant, type)``: count, sum, min and max of
``value``. It reads the same of what ClickHouse holds (the raw events table, which every
query and rollup is computed from) and reports every window where the two differ.

What the replay takes out, so that a healthy pipeline shows no difference:

- records the stream dead-lettered (late, schema, transform, poison): the dead letters
  the workers write name the record's partition and offset (``origin.*``), and the DLQ
  archive keeps them; those dead-lettered in ``[from - 1 h, now)`` are read;
- records the stream's pass drops or refuses anyway (a filter, a schema violation);
- duplicates: one row per ``(tenant, type, ts, source, event_id)``, the key of the raw
  events table.

The other side leaves out the rows written by the history job (partition
:data:`~data_jobs.history.HISTORY_PARTITION`): they never were in Kafka, so the archive
has none of them. Events without a source are left out on both sides: the archive files
them under ``source=_unknown`` by the time Kafka appended them, not by event time.

Limits, said in the report rather than hidden: the archive is written every
``archive.flush_seconds``, so a range that ends later than that ago misses its newest
records; a record whose dead letter was written more than an hour before its event
time, or after the job started, counts in the replay; an event id sent twice with
different event times beyond the dedup horizon is stored twice by the stream and
replayed twice, so it agrees. Distinct counts and quantiles are not compared (they are
estimates of the same sketches, computed from these same rows).

Windows are compared exactly for count, min and max, and for sum within a relative
1e-9 (the order of additions differs).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from adapters.archive import read_manifest
from adapters.exceptions import StoreUnavailable
from adapters.s3 import S3Store, filesystem
from core.archive_layout import UNKNOWN_SOURCE, Kind, hours_of_key, source_keys_of
from core.batch import Runtime, process_batch, raw_event_rows
from core.partition_state import PartitionState, RecordRef
from core.query_plan import utc_datetime
from data_jobs.history import HISTORY_PARTITION, HistoryConfig

log = logging.getLogger(__name__)

MINUTE_MS = 60_000
DEAD_LETTER_LOOKBACK_MS = 3_600_000
SUM_TOLERANCE = 1e-9
WINDOW_COLUMNS = ["tenant", "type", "minute", "events", "sum", "min", "max"]
_REPLAY_COLUMNS = ["payload", "key", "partition", "offset", "kafka_timestamp"]


@dataclass(frozen=True, slots=True)
class VerifyConfig:
    """Everything the job needs, as plain data (it travels to the Ray workers)."""

    history: HistoryConfig  # the stream's processing and where the stores are
    archive_prefix: str
    raw_topic: str
    concurrency: int = 2


@dataclass(frozen=True, slots=True, order=True)
class Window:
    """One 1-minute window of one tenant's event type."""

    tenant: str
    type: str
    minute_ms: int


@dataclass(frozen=True, slots=True)
class Totals:
    """What one window holds."""

    events: int
    sum: float
    min: float
    max: float

    def agrees(self, other: Totals) -> bool:
        scale = max(1.0, abs(self.sum), abs(other.sum))
        return (
            self.events == other.events
            and self.min == other.min
            and self.max == other.max
            and math.isclose(self.sum, other.sum, rel_tol=0, abs_tol=SUM_TOLERANCE * scale)
        )


@dataclass(frozen=True, slots=True)
class Difference:
    """A window where the replay and ClickHouse differ (None: the side has no events)."""

    window: Window
    replayed: Totals | None
    stored: Totals | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.window.tenant,
            "type": self.window.type,
            "minute": _iso(self.window.minute_ms),
            "replayed": _totals_dict(self.replayed),
            "stored": _totals_dict(self.stored),
        }


def _totals_dict(totals: Totals | None) -> dict[str, Any] | None:
    if totals is None:
        return None
    return {"events": totals.events, "sum": totals.sum, "min": totals.min, "max": totals.max}


def compare(replayed: dict[Window, Totals], stored: dict[Window, Totals]) -> list[Difference]:
    """Every window in either side that the other does not hold the same, in order."""
    differ = []
    for window in sorted(replayed.keys() | stored.keys()):
        mine, theirs = replayed.get(window), stored.get(window)
        if mine is None or theirs is None or not mine.agrees(theirs):
            differ.append(Difference(window, mine, theirs))
    return differ


def windows_of(table: pa.Table) -> dict[Window, Totals]:
    """Rows of :data:`WINDOW_COLUMNS` as a mapping."""
    return {
        Window(str(row["tenant"]), str(row["type"]), int(row["minute"])): Totals(
            int(row["events"]), float(row["sum"]), float(row["min"]), float(row["max"])
        )
        for row in table.select(WINDOW_COLUMNS).to_pylist()
    }


def window_totals(rows: pa.Table) -> pa.Table:
    """Raw-event rows (tenant, type, minute, ts, source, event_id, value) summed per
    window, one row per raw-events key (the later copies of a duplicate dropped)."""
    key = ["tenant", "type", "minute", "ts", "source", "event_id"]
    unique = rows.group_by(key, use_threads=False).aggregate([("value", "first")])
    totals = unique.group_by(["tenant", "type", "minute"], use_threads=False).aggregate(
        [("value_first", "count"), ("value_first", "sum"), ("value_first", "min_max")]
    )
    bounds = totals["value_first_min_max"]
    return pa.table(
        {
            "tenant": totals["tenant"],
            "type": totals["type"],
            "minute": totals["minute"],
            "events": pc.cast(totals["value_first_count"], pa.int64()),
            "sum": totals["value_first_sum"],
            "min": pc.struct_field(bounds, "min"),
            "max": pc.struct_field(bounds, "max"),
        }
    )


def dead_letter_origins(table: pa.Table, topic: str) -> set[tuple[int, int]]:
    """(partition, offset) of the ``topic`` records that dead letters (DLQ archive rows,
    ``stage`` and ``origin`` columns) name."""
    found: set[tuple[int, int]] = set()
    for origin in table["origin"].to_pylist():
        try:
            fields = orjson.loads(origin or "{}")
            if fields.get("topic") == topic:
                found.add((int(fields["partition"]), int(fields["offset"])))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            continue  # a dead letter of another stage (the edge, an upload) names none
    return found


def archive_files(store: S3Store, root: str, kind: Kind, from_ms: int, to_ms: int) -> list[str]:
    """Keys of the files that manifests list with rows in ``[from_ms, to_ms)``, of every
    source but ``_unknown``."""
    base = f"{root.strip('/')}/{kind}/" if root.strip("/") else f"{kind}/"
    keys: list[str] = []
    for source in source_keys_of(store.folders(base)):
        if source == UNKNOWN_SOURCE:
            continue
        for directory in hours_of_key(kind, source, from_ms, to_ms):
            manifest = read_manifest(store, root, directory)
            keys += [f.key for f in manifest.files if f.max_ts >= from_ms and f.min_ts < to_ms]
    return keys


def replay_rows(
    batch: pa.Table,
    runtime: Runtime,
    config: VerifyConfig,
    excluded: set[tuple[int, int]],
    span: tuple[int, int],
    tenant: str | None,
) -> pa.Table:
    """The raw-event rows of one batch of archive rows through the stream's pass, those
    dead-lettered by the stream left out, restricted to ``span`` and ``tenant``."""
    partitions = batch["partition"].to_pylist()
    offsets = batch["offset"].to_pylist()
    keep = [(p, o) not in excluded for p, o in zip(partitions, offsets, strict=True)]
    batch = batch.filter(pa.array(keep, pa.bool_()))
    arrivals = pc.cast(batch["kafka_timestamp"], pa.int64()).to_pylist()
    refs = [
        RecordRef(i, key, value, arrival)
        for i, (key, value, arrival) in enumerate(
            zip(batch["key"].to_pylist(), batch["payload"].to_pylist(), arrivals, strict=True)
        )
    ]
    state = PartitionState(HISTORY_PARTITION, config.history.processing, 0)
    _outcomes, counted = process_batch(
        {HISTORY_PARTITION: state}, {HISTORY_PARTITION: refs}, runtime
    )
    rows = raw_event_rows(counted, {HISTORY_PARTITION: refs}, {HISTORY_PARTITION})
    if rows is None:
        return _empty_rows()
    ts = pc.cast(rows["ts"], pa.int64())
    inside = pc.and_(pc.greater_equal(ts, span[0]), pc.less(ts, span[1]))
    inside = pc.and_(inside, pc.not_equal(rows["source"], ""))
    if tenant is not None:
        inside = pc.and_(inside, pc.equal(rows["tenant"], tenant))
    rows = rows.filter(inside)
    ts = pc.cast(rows["ts"], pa.int64())
    minute = pc.subtract(ts, pc.remainder(ts, MINUTE_MS))
    return pa.table(
        {
            "tenant": rows["tenant"],
            "type": rows["type"],
            "minute": minute,
            "ts": ts,
            "source": rows["source"],
            "event_id": rows["event_id"],
            "value": pc.cast(rows["value"], pa.float64()),
        }
    )


def _empty_rows() -> pa.Table:
    return pa.table(
        {
            "tenant": pa.array([], pa.string()),
            "type": pa.array([], pa.string()),
            "minute": pa.array([], pa.int64()),
            "ts": pa.array([], pa.int64()),
            "source": pa.array([], pa.string()),
            "event_id": pa.array([], pa.string()),
            "value": pa.array([], pa.float64()),
        }
    )


class ReplayPass:
    """A Ray Data actor: archive rows in, raw-event rows out (see :func:`replay_rows`)."""

    def __init__(
        self,
        config: VerifyConfig,
        excluded: set[tuple[int, int]],
        span: tuple[int, int],
        tenant: str | None,
    ) -> None:
        from adapters.postgres import MetadataStore
        from adapters.runtime_inputs import RuntimeInputs

        self._config = config
        self._excluded = excluded
        self._span = span
        self._tenant = tenant
        self._inputs = RuntimeInputs(config.history, MetadataStore(config.history.dsn))
        self._runtime, _errors = self._inputs.refresh(Runtime(), int(time.time() * 1000), True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return replay_rows(
            batch, self._runtime, self._config, self._excluded, self._span, self._tenant
        )


@dataclass
class VerifyReport:
    """What the job found, and what it read to find it."""

    from_ms: int
    to_ms: int
    tenant: str | None
    files: int = 0
    dead_letter_files: int = 0
    dead_lettered: int = 0
    windows: int = 0
    replayed_events: int = 0
    stored_events: int = 0
    differences: list[Difference] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "from": _iso(self.from_ms),
            "to": _iso(self.to_ms),
            "tenant": self.tenant,
            "files": self.files,
            "dead_letter_files": self.dead_letter_files,
            "dead_lettered": self.dead_lettered,
            "windows": self.windows,
            "replayed_events": self.replayed_events,
            "stored_events": self.stored_events,
            "differences": [d.as_dict() for d in self.differences],
            "seconds": round(self.seconds, 3),
        }


def _iso(ms: int) -> str:
    return utc_datetime(ms).isoformat().replace("+00:00", "Z")


def run_verify(
    config: VerifyConfig, from_ms: int, to_ms: int, tenant: str | None = None
) -> VerifyReport:
    """Replay ``[from_ms, to_ms)`` of the archive and compare (see the module); runs on
    the Ray cluster this process is connected to.

    Raises:
        StoreUnavailable: S3 or ClickHouse failed, or a Ray task of the job did.
        InvalidInputError: a manifest cannot be read.
    """
    started = time.monotonic()
    report = VerifyReport(from_ms, to_ms, tenant)
    store = S3Store(config.history.s3)
    root = config.archive_prefix
    raw = archive_files(store, root, "raw", from_ms, to_ms)
    now_ms = int(time.time() * 1000)
    dead = archive_files(store, root, "dlq", from_ms - DEAD_LETTER_LOOKBACK_MS, now_ms)
    report.files, report.dead_letter_files = len(raw), len(dead)
    excluded = _dead_lettered(store, dead, config)
    report.dead_lettered = len(excluded)
    replayed = _replay(config, raw, excluded, (from_ms, to_ms), tenant)
    stored = _stored(config, from_ms, to_ms, tenant)
    report.replayed_events = sum(t.events for t in replayed.values())
    report.stored_events = sum(t.events for t in stored.values())
    report.windows = len(replayed.keys() | stored.keys())
    report.differences = compare(replayed, stored)
    report.seconds = time.monotonic() - started
    log.info("verify: %s", {k: v for k, v in report.as_dict().items() if k != "differences"})
    return report


def _dead_lettered(
    store: S3Store, keys: Sequence[str], config: VerifyConfig
) -> set[tuple[int, int]]:
    """(partition, offset) of the records of ``events.raw`` that the stream dead-lettered."""
    fs = filesystem(store.config)
    found: set[tuple[int, int]] = set()
    topic = config.raw_topic
    for key in keys:
        try:
            table = pq.read_table(f"{store.bucket}/{key}", filesystem=fs, columns=["origin"])
        except OSError as exc:
            where = f"s3://{store.bucket}/{key}"
            raise StoreUnavailable(f"S3 failed to read the dead letters {where}: {exc}") from exc
        found |= dead_letter_origins(table, topic)
    return found


def _replay(
    config: VerifyConfig,
    keys: Sequence[str],
    excluded: set[tuple[int, int]],
    span: tuple[int, int],
    tenant: str | None,
) -> dict[Window, Totals]:
    if not keys:
        return {}
    bucket = config.history.s3.bucket
    try:
        dataset = ray.data.read_parquet(
            [f"{bucket}/{key}" for key in keys],
            filesystem=filesystem(config.history.s3),
            columns=_REPLAY_COLUMNS,
            partitioning=None,  # the rows carry their source; the path adds nothing
        )
        rows = dataset.map_batches(
            ReplayPass,
            fn_constructor_kwargs={
                "config": config,
                "excluded": excluded,
                "span": span,
                "tenant": tenant,
            },
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, config.concurrency)),
            num_cpus=0.5,
        )
        # a window's rows meet in one group: a shuffle, in as many parts as the pool
        keys = ["tenant", "type", "minute"]
        windows = rows.groupby(keys, num_partitions=max(1, config.concurrency)).map_groups(
            window_totals, batch_format="pyarrow"
        )
        found: dict[Window, Totals] = {}
        for batch in windows.iter_batches(batch_format="pyarrow"):
            found.update(windows_of(batch))
        return found
    except ray.exceptions.RayError as exc:
        raise StoreUnavailable(f"the verify job failed: {exc}") from exc


def _stored(
    config: VerifyConfig, from_ms: int, to_ms: int, tenant: str | None
) -> dict[Window, Totals]:
    """The same windows of what ClickHouse holds (the history job's rows left out)."""
    history = config.history
    sql = (
        "SELECT tenant, type, toUnixTimestamp(toStartOfMinute(ts)) * 1000 AS minute, "
        "count() AS events, sum(value) AS sum, min(value) AS min, max(value) AS max "
        f"FROM {history.database}.events FINAL "
        "WHERE ts >= {start:DateTime64(3)} AND ts < {end:DateTime64(3)} "
        "AND partition != {history:UInt16} AND source != '' "
        + ("AND tenant = {tenant:String} " if tenant is not None else "")
        + "GROUP BY tenant, type, minute"
    )
    params: dict[str, Any] = {
        "start": utc_datetime(from_ms),
        "end": utc_datetime(to_ms),
        "history": HISTORY_PARTITION,
    }
    if tenant is not None:
        params["tenant"] = tenant
    owner = ray.get_actor(history.owner_actor, namespace=history.namespace)
    try:
        ref: Any = owner.run_query.remote(sql, params)
        columns, found = ray.get(ref)
    except ray.exceptions.RayError as exc:
        raise StoreUnavailable(f"ClickHouse could not be read: {exc}") from exc
    table = pa.Table.from_pylist([dict(zip(columns, row, strict=True)) for row in found])
    return windows_of(table) if table.num_rows else {}
