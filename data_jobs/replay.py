"""The archive replayed through the stream's own pass, as a Ray Data dataset.

The raw archive (docs/archive.md) holds every record of ``events.raw`` as Kafka had it.
:func:`replay` reads the archive's Parquet files of a time range (the files that the
hour manifests list, through ``pyarrow.fs.S3FileSystem``, one read task per file), runs
each batch through the stream's pass (``core.batch.process_batch``: decoding, schema
checks, transforms, enrichment) and gives the raw-event rows that the stream counted:
``tenant, type, minute, ts, source, event_id, entity, value`` (:data:`EVENT_COLUMNS`).
The batch jobs that recompute from the archive build on it: ``rayline verify``
(``data_jobs.verify``) and the sessions job (``data_jobs.sessions``).

What the replay takes out, as the stream did:

- records the stream dead-lettered (late, schema, transform, poison): the dead letters
  the workers write name the record's partition and offset (``origin.*``), and the DLQ
  archive keeps them; those dead-lettered in ``[from - 1 h, now)`` are read;
- records the stream's pass drops or refuses anyway (a filter, a schema violation);
- events without a source: the archive files them under ``source=_unknown`` by the
  time Kafka appended them, not by event time, so a range cannot find them all.

Duplicates are not taken out here: a row per archived record. A consumer collapses
them on the raw events table's key, ``(tenant, type, ts, source, event_id)``, where its
rows meet (after its shuffle), as :data:`EVENT_KEY` says.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from adapters.archive import read_manifest
from adapters.exceptions import StoreUnavailable
from adapters.s3 import S3Store, filesystem
from core.archive_layout import UNKNOWN_SOURCE, HourDir, Kind, hours_of_key, source_keys_of
from core.batch import Runtime, process_batch, raw_event_rows
from core.partition_state import PartitionState, RecordRef
from data_jobs.history import HISTORY_PARTITION, HistoryConfig, job_concurrency

MINUTE_MS = 60_000
DEAD_LETTER_LOOKBACK_MS = 3_600_000
REPLAY_BATCH_ROWS = 20_000
EVENT_KEY = ["tenant", "type", "ts", "source", "event_id"]
"""The raw events table's key: rows equal on it are one event."""
EVENT_SCHEMA = pa.schema(
    [
        ("tenant", pa.string()),
        ("type", pa.string()),
        ("minute", pa.int64()),
        ("ts", pa.int64()),
        ("source", pa.string()),
        ("event_id", pa.string()),
        ("entity", pa.string()),
        ("value", pa.float64()),
    ]
)
EVENT_COLUMNS = EVENT_SCHEMA.names
_ARCHIVE_COLUMNS = ["payload", "key", "partition", "offset", "kafka_timestamp"]


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """Everything a replay needs, as plain data (it travels to the Ray workers)."""

    history: HistoryConfig  # the stream's processing and where the stores are
    archive_prefix: str
    raw_topic: str
    concurrency: int | None = None
    """Actors of the pass, parts of the shuffles (None: the cluster's CPUs at the start)."""


@dataclass(frozen=True, slots=True)
class Replay:
    """A replay of ``[from_ms, to_ms)``: the dataset of its event rows (None: the archive
    has no file of the range) and what was read to make it."""

    events: ray.data.Dataset | None
    files: int
    dead_letter_files: int
    dead_lettered: int


def replay(config: ReplayConfig, from_ms: int, to_ms: int, tenant: str | None = None) -> Replay:
    """The event rows of ``[from_ms, to_ms)`` (of ``tenant`` only, if given) replayed
    from the archive; lazy: the dataset runs on the Ray cluster when it is consumed.

    Raises:
        StoreUnavailable: S3 failed.
        InvalidInputError: a manifest cannot be read.
    """
    store = S3Store(config.history.s3)
    root = config.archive_prefix
    raw = archive_read(store, root, from_ms, to_ms)
    now_ms = int(time.time() * 1000)
    dead = archive_files(store, root, "dlq", from_ms - DEAD_LETTER_LOOKBACK_MS, now_ms)
    excluded = _dead_lettered(store, dead, config.raw_topic)
    if not raw.files:
        return Replay(None, 0, len(dead), len(excluded))
    dataset = ray.data.read_parquet(
        raw.directories,
        filesystem=filesystem(config.history.s3),
        columns=_ARCHIVE_COLUMNS,
        partitioning=None,  # the rows carry their source; the path adds nothing
        file_extensions=["parquet"],
        skip_paths=raw.skip or None,
    )
    events = dataset.map_batches(
        ReplayPass,
        fn_constructor_kwargs={
            "config": config,
            "excluded": excluded,
            "span": (from_ms, to_ms),
            "tenant": tenant,
        },
        batch_format="pyarrow",
        # the stream's pass has a cost per call: batches of a consumer poll's size
        batch_size=REPLAY_BATCH_ROWS,
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=job_concurrency(config.concurrency)
        ),
        num_cpus=0.5,
    )
    return Replay(events, raw.files, len(dead), len(excluded))


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


@dataclass(frozen=True, slots=True)
class ArchiveRead:
    """What Ray Data reads of the raw archive for a range: whole hour directories (a
    LIST each gives every file's size; a list of files is looked up file by file), less
    ``skip``: their files that no manifest lists (left by an interrupted write) or that
    hold no row of the range. Paths are ``bucket/key``."""

    directories: list[str]
    skip: list[str]
    files: int  # the files read


def archive_read(store: S3Store, root: str, from_ms: int, to_ms: int) -> ArchiveRead:
    """The raw archive's directories and skipped files for ``[from_ms, to_ms)``, of
    every source but ``_unknown``."""
    directories: list[str] = []
    skip: list[str] = []
    files = 0
    for directory in _hour_dirs(store, root, "raw", from_ms, to_ms):
        manifest = read_manifest(store, root, directory)
        wanted = {f.key for f in manifest.files if f.max_ts >= from_ms and f.min_ts < to_ms}
        if not wanted:
            continue
        prefix = directory.prefix(root)
        directories.append(f"{store.bucket}/{prefix.rstrip('/')}")
        listed = [key for key in store.all_keys(prefix) if key.endswith(".parquet")]
        skip += [f"{store.bucket}/{key}" for key in listed if key not in wanted]
        files += len(wanted)
    return ArchiveRead(directories, skip, files)


def _hour_dirs(store: S3Store, root: str, kind: Kind, from_ms: int, to_ms: int) -> list[HourDir]:
    base = f"{root.strip('/')}/{kind}/" if root.strip("/") else f"{kind}/"
    found: list[HourDir] = []
    for source in source_keys_of(store.folders(base)):
        if source != UNKNOWN_SOURCE:
            found += hours_of_key(kind, source, from_ms, to_ms)
    return found


def archive_files(store: S3Store, root: str, kind: Kind, from_ms: int, to_ms: int) -> list[str]:
    """Keys of the files that manifests list with rows in ``[from_ms, to_ms)``, of every
    source but ``_unknown``."""
    keys: list[str] = []
    for directory in _hour_dirs(store, root, kind, from_ms, to_ms):
        manifest = read_manifest(store, root, directory)
        keys += [f.key for f in manifest.files if f.max_ts >= from_ms and f.min_ts < to_ms]
    return keys


def replay_rows(
    batch: pa.Table,
    runtime: Runtime,
    config: ReplayConfig,
    excluded: set[tuple[int, int]],
    span: tuple[int, int],
    tenant: str | None,
) -> pa.Table:
    """The event rows (:data:`EVENT_SCHEMA`) of one batch of archive rows through the
    stream's pass, those dead-lettered by the stream left out, restricted to ``span``
    and ``tenant``."""
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
        return EVENT_SCHEMA.empty_table()
    ts = pc.cast(rows["ts"], pa.int64())
    inside = pc.and_(pc.greater_equal(ts, span[0]), pc.less(ts, span[1]))
    inside = pc.and_(inside, pc.not_equal(rows["source"], ""))
    if tenant is not None:
        inside = pc.and_(inside, pc.equal(rows["tenant"], tenant))
    rows = rows.filter(inside)
    ts = pc.cast(rows["ts"], pa.int64())
    minute = pc.subtract(ts, pc.remainder(ts, MINUTE_MS))
    return pa.table(
        [
            rows["tenant"],
            rows["type"],
            minute,
            ts,
            rows["source"],
            rows["event_id"],
            rows["entity"],
            pc.cast(rows["value"], pa.float64()),
        ],
        schema=EVENT_SCHEMA,
    )


class ReplayPass:
    """A Ray Data actor: archive rows in, event rows out (see :func:`replay_rows`)."""

    def __init__(
        self,
        config: ReplayConfig,
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


def _dead_lettered(store: S3Store, keys: Sequence[str], topic: str) -> set[tuple[int, int]]:
    """(partition, offset) of the records of ``topic`` that the stream dead-lettered."""
    fs = filesystem(store.config)
    found: set[tuple[int, int]] = set()
    for key in keys:
        try:
            table = pq.read_table(f"{store.bucket}/{key}", filesystem=fs, columns=["origin"])
        except OSError as exc:
            where = f"s3://{store.bucket}/{key}"
            raise StoreUnavailable(f"S3 failed to read the dead letters {where}: {exc}") from exc
        found |= dead_letter_origins(table, topic)
    return found
