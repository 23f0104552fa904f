"""Read events of one source and time range back from the S3 archive.

Only the hour directories of the range are visited, and in each only the files its
manifest lists with rows in the range: objects no manifest lists (a crash can leave
one) are never read. Every file's sha256 is checked against its manifest entry.

As a command (credentials from the standard AWS chain: ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``, ``~/.aws/credentials``, an instance role)::

    python -m data_jobs.read_archive --source billing \\
        --from 2026-11-29T05:00:00Z --to 2026-11-29T07:00:00Z --output billing.parquet
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from adapters.archive import SCHEMAS, read_manifest
from adapters.s3 import S3Config, S3SettingsLike, S3Store
from core.archive_layout import FileEntry, HourDir, Kind, hours_between
from core.exceptions import InvalidInputError


@dataclass(frozen=True, slots=True)
class ArchiveLocation:
    """The bucket and the key prefix of an archive."""

    s3: S3Config
    prefix: str = "archive"


class _ArchiveSettingsLike(Protocol):
    @property
    def prefix(self) -> str: ...


class SettingsLike(Protocol):
    """What :func:`read_archive` reads of ``cluster.settings.Settings``."""

    @property
    def s3(self) -> S3SettingsLike: ...

    @property
    def archive(self) -> _ArchiveSettingsLike: ...


def _location(where: SettingsLike | ArchiveLocation) -> ArchiveLocation:
    if isinstance(where, ArchiveLocation):
        return where
    return ArchiveLocation(S3Config.of(where.s3), where.archive.prefix)


def _time_column(kind: Kind, source: str | None) -> str:
    # Rows are placed (and so found) by event time, except dead letters and events of
    # an unknown source, which are placed by their Kafka timestamp.
    return "ts" if kind == "raw" and source is not None else "kafka_timestamp"


def _read_file(store: S3Store, entry: FileEntry) -> pa.Table:
    with store.open(entry.key) as stream:
        data = stream.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256 or len(data) != entry.bytes:
        raise InvalidInputError(
            f"archive file s3://{store.bucket}/{entry.key} has sha256 {digest} and "
            f"{len(data)} bytes, its manifest says {entry.sha256} and {entry.bytes}; "
            "re-archive its offsets from Kafka or restore the object from a bucket version"
        )
    return pq.read_table(pa.BufferReader(data))


def read_archive(
    where: SettingsLike | ArchiveLocation,
    source: str | None,
    from_ms: int,
    to_ms: int,
    *,
    kind: Kind = "raw",
) -> pa.Table:
    """The archived rows of ``source`` whose time lies in ``[from_ms, to_ms)``.

    Args:
        where: the settings (``s3`` and ``archive.prefix`` are read) or a location.
        source: the source name as events carry it; None for ``source=_unknown``.
        from_ms: start of the range, epoch ms, inclusive.
        to_ms: end of the range, epoch ms, exclusive.
        kind: ``raw`` for events (range on ``ts``), ``dlq`` for dead letters (range on
            the time they were dead-lettered, ``kafka_timestamp``).

    Returns:
        The rows in (topic, partition, offset) order per hour, with the archive's
        schema; an empty table when nothing matches.

    Raises:
        StoreUnavailable: S3 failed.
        InvalidInputError: a manifest cannot be read, or a file does not match it.
    """
    location = _location(where)
    store = S3Store(location.s3)
    column = _time_column(kind, source)
    start = pa.scalar(from_ms, pa.timestamp("ms", tz="UTC"))
    end = pa.scalar(to_ms, pa.timestamp("ms", tz="UTC"))
    tables = [SCHEMAS[kind].empty_table()]
    for directory in hours_between(kind, source, from_ms, to_ms):
        for entry in _files_in_range(store, location.prefix, directory, from_ms, to_ms):
            table = _read_file(store, entry)
            keep = pc.and_(pc.greater_equal(table[column], start), pc.less(table[column], end))
            tables.append(table.filter(keep))
    return pa.concat_tables(tables, promote_options="permissive")


def _files_in_range(
    store: S3Store, root: str, directory: HourDir, from_ms: int, to_ms: int
) -> list[FileEntry]:
    manifest = read_manifest(store, root, directory)
    return [f for f in manifest.files if f.max_ts >= from_ms and f.min_ts < to_ms]


def _epoch_ms(text: str) -> int:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an RFC 3339 time such as 2026-11-29T05:00:00Z, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"expected a time with an offset (Z), got {text!r}")
    return int(moment.timestamp() * 1000)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_jobs.read_archive",
        description="Read the archived events of one source and time range from S3. "
        "Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID, ...).",
    )
    parser.add_argument("--source", help="source name; omit for source=_unknown")
    parser.add_argument("--from", dest="start", type=_epoch_ms, required=True, help="RFC 3339")
    parser.add_argument("--to", dest="end", type=_epoch_ms, required=True, help="RFC 3339")
    parser.add_argument("--kind", choices=["raw", "dlq"], default="raw", help="default: raw")
    parser.add_argument("--endpoint", help="S3 endpoint, e.g. http://127.0.0.1:29000")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--bucket", default="rayline-archive")
    parser.add_argument("--prefix", default="archive", help="the archive's key prefix")
    parser.add_argument("--output", help="write a local Parquet file instead of printing rows")
    parser.add_argument("--limit", type=int, default=20, help="rows to print (default 20)")
    return parser


def _credentials() -> tuple[str, str]:
    import boto3

    found = boto3.session.Session().get_credentials()
    if found is None:
        raise SystemExit(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(for the local stack: the values of s3.access_key_id and s3.secret_access_key)"
        )
    frozen = found.get_frozen_credentials()
    return frozen.access_key, frozen.secret_key


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    key_id, secret = _credentials()
    location = ArchiveLocation(
        S3Config(args.endpoint, args.region, args.bucket, key_id, secret), args.prefix
    )
    table = read_archive(location, args.source, args.start, args.end, kind=args.kind)
    if args.output:
        pq.write_table(table, args.output, compression="zstd")
        print(f"wrote {table.num_rows} rows to {args.output}")
        return 0
    shown = table.drop_columns(["payload", "key"]).slice(0, args.limit)
    for row in shown.to_pylist():
        print(row)
    print(f"{table.num_rows} rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
