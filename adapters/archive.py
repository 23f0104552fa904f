"""The raw archive's writer: Kafka records to zstd Parquet objects in S3, with manifests.

Lifecycle contract of :class:`ArchiveWriter`:

* ``write(batch)`` returns only after every Parquet object of the batch and every
  manifest it touched is stored. The caller may commit the batch's offsets after it
  returns, and never before.
* When ``write`` raises (:class:`StoreUnavailable`), some objects may be stored and some
  not. Nothing is lost: the caller does not commit, and writing the same records again
  (the same batch, or a replay from the committed offsets cut into other batches)
  overwrites or replaces what the failed attempt left (:meth:`Manifest.merge`).
* One writer per manifest: each manifest is read, changed and written back without a
  lock, which is safe because one archiver (a named singleton actor) consumes every
  partition of both topics and writes its batches one after another. Two archivers on
  one bucket and prefix could lose each other's manifest entries.

The manifest is the archive's truth. A crash between storing an object and storing its
manifest, or between storing a manifest and deleting the objects it dropped, can leave
an object that no manifest lists; readers that go through the manifest never see it.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from adapters.s3 import S3Store
from core.archive_layout import (
    SCHEMA_VERSION,
    UNKNOWN_SOURCE,
    FileEntry,
    HourDir,
    Kind,
    Manifest,
    event_time_ms,
    file_name,
    source_key,
)

TS = pa.timestamp("ms", tz="UTC")
RAW_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("source", pa.string()),
        ("tenant", pa.string()),
        ("type", pa.string()),
        ("ts", TS),
        ("received_at", TS),
        ("attributes", pa.string()),  # JSON object
        ("payload", pa.binary()),  # the record's value as it was in Kafka
        ("key", pa.binary()),
        ("headers", pa.string()),  # JSON object of header name -> text
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("kafka_timestamp", TS),
    ],
    metadata={"rayline.archive.schema_version": str(SCHEMA_VERSION)},
)
DLQ_SCHEMA = pa.schema(
    [
        *RAW_SCHEMA,
        ("reason", pa.string()),
        ("stage", pa.string()),
        ("origin", pa.string()),  # JSON object of the origin.* headers, prefix cut
    ],
    metadata=RAW_SCHEMA.metadata,
)
SCHEMAS: dict[Kind, pa.Schema] = {"raw": RAW_SCHEMA, "dlq": DLQ_SCHEMA}
PARQUET_CONTENT_TYPE = "application/vnd.apache.parquet"


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """One consumed record, as the archive needs it (plain data, no driver object)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]]
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class WriteReport:
    """What one ``write`` stored."""

    files: tuple[FileEntry, ...] = ()
    rows: int = 0
    replaced: tuple[str, ...] = ()  # keys of stale objects dropped from a manifest


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, bytes):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _decode(value: bytes | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        decoded = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return decoded if isinstance(decoded, dict) else None


@dataclass(slots=True)
class ArchiveRow:
    """One record as archive columns, and the directory it goes to."""

    directory: HourDir
    placed_ms: int  # the time the row was placed by
    columns: dict[str, Any]


def _raw_row(record: KafkaRecord, headers: dict[str, bytes | None]) -> ArchiveRow:
    envelope = _decode(record.value) or {}
    ts = event_time_ms(envelope.get("ts"))
    source = envelope.get("source")
    attributes = envelope.get("attributes")
    received = _int_or_none(envelope.get("received_at"))
    if received is None:
        received = _int_or_none(headers.get("received_at"))
    columns = {
        "event_id": _str_or_none(envelope.get("event_id")),
        "source": _str_or_none(source),
        "tenant": _str_or_none(envelope.get("tenant")),
        "type": _str_or_none(envelope.get("type")),
        "ts": ts,
        "received_at": received,
        "attributes": orjson.dumps(attributes).decode() if isinstance(attributes, dict) else None,
        "payload": record.value,
        "key": record.key,
        "headers": orjson.dumps({k: _text(v) for k, v in headers.items()}).decode(),
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "kafka_timestamp": record.timestamp_ms,
    }
    if ts is None or source_key(source) == UNKNOWN_SOURCE:
        return ArchiveRow(
            HourDir.at("raw", None, record.timestamp_ms), record.timestamp_ms, columns
        )
    return ArchiveRow(HourDir.at("raw", source, ts), ts, columns)


def _dlq_row(record: KafkaRecord, headers: dict[str, bytes | None]) -> ArchiveRow:
    row = _raw_row(record, headers)
    origin = {k[len("origin.") :]: _text(v) for k, v in headers.items() if k.startswith("origin.")}
    source = origin.get("source") or row.columns["source"]
    row.columns.update(
        reason=_text(headers.get("reason")),
        stage=_text(headers.get("stage")),
        origin=orjson.dumps(origin).decode(),
    )
    # Dead letters are placed by when they were dead-lettered: the dead letter's own
    # Kafka timestamp (the original event time may be missing or wrong).
    return ArchiveRow(
        HourDir.at("dlq", source, record.timestamp_ms), record.timestamp_ms, row.columns
    )


def to_row(record: KafkaRecord, kind: Kind) -> ArchiveRow:
    """The archive row of one record, and where it goes. Never raises on bad input."""
    headers = dict(record.headers)
    return _dlq_row(record, headers) if kind == "dlq" else _raw_row(record, headers)


def to_table(rows: Sequence[ArchiveRow], kind: Kind) -> pa.Table:
    schema = SCHEMAS[kind]
    return pa.Table.from_pydict(
        {name: [row.columns[name] for row in rows] for name in schema.names}, schema=schema
    )


def parquet_bytes(table: pa.Table, row_group_rows: int) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(
        table, sink, compression="zstd", row_group_size=row_group_rows, write_statistics=True
    )
    return bytes(sink.getvalue().to_pybytes())


class ArchiveWriter:
    """Writes batches of Kafka records into the archive (see the module docstring).

    Args:
        store: the bucket.
        root: the key prefix of the archive (``archive.prefix``).
        dlq_topics: topics whose records are dead letters (archived under ``dlq/``).
        row_group_rows: the most rows in one Parquet row group.
    """

    def __init__(
        self, store: S3Store, root: str, dlq_topics: Iterable[str], row_group_rows: int = 100_000
    ) -> None:
        self._store = store
        self._root = root
        self._dlq_topics = frozenset(dlq_topics)
        self._row_group_rows = row_group_rows

    def write(self, batch: Sequence[KafkaRecord]) -> WriteReport:
        """Store ``batch``; return once every object and manifest is stored.

        Raises:
            StoreUnavailable: S3 failed; nothing may be committed (write again).
            InvalidInputError: a stored manifest cannot be read (the message says which).
        """
        if not batch:
            return WriteReport()
        groups: dict[tuple[HourDir, str, int], list[ArchiveRow]] = defaultdict(list)
        replayed: dict[tuple[str, int], tuple[int, int]] = {}
        for record in batch:
            kind: Kind = "dlq" if record.topic in self._dlq_topics else "raw"
            row = to_row(record, kind)
            groups[(row.directory, record.topic, record.partition)].append(row)
            span = replayed.get((record.topic, record.partition), (record.offset, record.offset))
            replayed[(record.topic, record.partition)] = (
                min(span[0], record.offset),
                max(span[1], record.offset),
            )
        by_directory: dict[HourDir, list[FileEntry]] = defaultdict(list)
        for (directory, topic, partition), rows in sorted(groups.items()):
            by_directory[directory].append(self._store_file(directory, topic, partition, rows))
        replaced: list[str] = []
        for directory, entries in sorted(by_directory.items()):
            replaced += self._update_manifest(directory, entries, replayed)
        files = tuple(e for entries in by_directory.values() for e in entries)
        return WriteReport(files, sum(f.rows for f in files), tuple(replaced))

    def _store_file(
        self, directory: HourDir, topic: str, partition: int, rows: list[ArchiveRow]
    ) -> FileEntry:
        offsets = [row.columns["offset"] for row in rows]
        placed = [row.placed_ms for row in rows]
        key = directory.file_key(
            self._root, file_name(topic, partition, min(offsets), max(offsets))
        )
        data = parquet_bytes(to_table(rows, directory.kind), self._row_group_rows)
        with self._store.writer(key, PARQUET_CONTENT_TYPE) as writer:
            writer.write(data)
            writer.complete()
        return FileEntry(
            key=key,
            rows=len(rows),
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            min_ts=min(placed),
            max_ts=max(placed),
            topic=topic,
            partition=partition,
            first_offset=min(offsets),
            last_offset=max(offsets),
        )

    def _update_manifest(
        self,
        directory: HourDir,
        entries: list[FileEntry],
        replayed: dict[tuple[str, int], tuple[int, int]],
    ) -> list[str]:
        manifest, dropped = read_manifest(self._store, self._root, directory).merge(
            entries, replayed
        )
        with self._store.writer(directory.manifest_key(self._root), "application/json") as w:
            w.write(manifest.to_json())
            w.complete()
        for entry in dropped:
            self._store.delete(entry.key)
        return [entry.key for entry in dropped]


def read_manifest(store: S3Store, root: str, directory: HourDir) -> Manifest:
    """The stored manifest of ``directory`` (empty when there is none yet).

    Raises:
        StoreUnavailable: S3 failed.
        InvalidInputError: the stored manifest cannot be read.
    """
    key = directory.manifest_key(root)
    if store.head(key) is None:
        return Manifest(directory)
    with store.open(key) as stream:
        data = stream.read()
    return Manifest.from_json(data, directory, f"s3://{store.bucket}/{key}")
