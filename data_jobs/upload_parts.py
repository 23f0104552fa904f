"""An uploaded file read in parts by parallel Ray tasks, where its format allows it.

NDJSON splits at any byte: a part is the lines that *start* in its byte range
(``core.formats.ByteRange``), so ranges that meet split a file without loss or overlap
however the lines fall. Parquet splits at row groups, whose row counts its footer holds.
CSV (a quoted cell may hold a newline), a JSON document and Avro files are read in one
pass (``data_jobs/publish_upload.py``).

Row indexes stay those of the whole file, which the exactly-once contract rests on (a
row without an ``event_id`` gets ``<upload id>-<row index>``, a dead letter names its row
and line). A Parquet part's first index is the rows of the row groups before it. An
NDJSON part's first index and first line are the records and lines of the ranges before
it, which a first pass counts, one Ray task per range, at the speed of reading bytes.

The plan is stored with the upload (``upload_parts``) before any part is read, so a
retried job reads the same parts and resumes each after the rows it had published.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import BinaryIO

import ray

from adapters.exceptions import StoreUnavailable
from adapters.s3 import S3Config, S3Store
from adapters.uploads import Upload, UploadPart
from core.formats import (
    ByteRange,
    Item,
    RowGroupRange,
    count_ndjson_range,
    ndjson_range,
    parquet_range,
    parquet_row_groups,
)

SPLITTABLE = frozenset({"ndjson", "parquet"})


def plan(store: S3Store, upload: Upload, part_bytes: int) -> list[UploadPart]:
    """The parts of ``upload``: about ``part_bytes`` each (one part for a smaller file).

    Counts the lines of every NDJSON range but the last with Ray tasks, so it must run
    where Ray is initialised when the file has more than one range.

    Raises:
        BodyMalformed: a Parquet upload whose footer cannot be read.
    """
    if upload.format == "parquet":
        with store.open(upload.object_key) as stream:
            return _row_group_parts(parquet_row_groups(stream), part_bytes)
    starts = list(range(0, max(upload.size_bytes, 1), part_bytes))
    spans = [ByteRange(start, start + part_bytes) for start in starts[:-1]]
    counted = [_count.remote(store.config, upload.object_key, span) for span in spans]
    before = itertools.accumulate(ray.get(counted), lambda a, b: (a[0] + b[0], a[1] + b[1]))
    firsts = [(0, 0), *before]
    ends: list[int | None] = [*starts[1:], None]
    return [
        UploadPart(number, start, end, first_index=index, first_line=lines + 1)
        for number, (start, end, (index, lines)) in enumerate(
            zip(starts, ends, firsts, strict=True)
        )
    ]


def _row_group_parts(groups: list[tuple[int, int]], part_bytes: int) -> list[UploadPart]:
    """Consecutive row groups of about ``part_bytes`` (uncompressed) each."""
    parts: list[UploadPart] = []
    start = first_index = size = rows = 0
    for number, (group_rows, group_bytes) in enumerate(groups):
        rows += group_rows
        size += group_bytes
        if size >= part_bytes or number == len(groups) - 1:
            parts.append(UploadPart(len(parts), start, number + 1, first_index))
            start, first_index, size, rows = number + 1, first_index + rows, 0, 0
    return parts or [UploadPart(0, 0, 0, 0)]


def count_range(config: S3Config, key: str, span: ByteRange) -> tuple[int, int]:
    """(records, lines) of one NDJSON byte range of the object ``key``."""
    with S3Store(config).open(key) as stream:
        return count_ndjson_range(stream, span)


_count = ray.remote(  # type: ignore[call-overload]
    num_cpus=1, max_retries=3, retry_exceptions=[StoreUnavailable]
)(count_range)


def items(fmt: str, stream: BinaryIO, part: UploadPart) -> Iterator[Item]:
    """The records of ``part`` of a file in format ``fmt`` (one of :data:`SPLITTABLE`)."""
    if fmt == "parquet":
        assert part.end is not None
        return parquet_range(stream, RowGroupRange(part.start, part.end, part.first_index))
    return ndjson_range(stream, ByteRange(part.start, part.end, part.first_index, part.first_line))
