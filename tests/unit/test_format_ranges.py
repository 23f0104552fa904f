"""Reading one file in parts: NDJSON byte ranges and Parquet row groups give, part after
part, exactly the records (indexes, line numbers, errors) of reading the file whole."""

from __future__ import annotations

import io
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from core import formats
from core.formats import (
    ByteRange,
    RecordError,
    RowGroupRange,
    count_ndjson_range,
    iter_records,
    ndjson_range,
    parquet_range,
    parquet_row_groups,
)


def _plain(items: Any) -> list[Any]:
    return [(i.index, i.message, i.raw) if isinstance(i, RecordError) else i for i in items]


def _in_ranges(data: bytes, cuts: list[int]) -> list[Any]:
    """Read ``data`` as consecutive ranges split at ``cuts``, as the upload job does:
    each range's start position in the file comes from counting the ranges before it."""
    starts = [0, *sorted({c for c in cuts if 0 < c < len(data)})]
    ends: list[int | None] = [*starts[1:], None]
    stream = io.BytesIO(data)
    out: list[Any] = []
    index, line = 0, 1
    for start, end in zip(starts, ends, strict=True):
        span = ByteRange(start, end, index, line)
        out += _plain(ndjson_range(stream, span))
        records, lines = count_ndjson_range(stream, span)
        index, line = index + records, line + lines
    return out


LINES = st.sampled_from(
    [
        b'{"a": 1}\n',
        b"\n",
        b"   \r\n",
        b'{"a": 2,\n',
        b"[3]\r\n",
        b'{"v": NaN}\n',
        b'{"s": "\xff"}\n',
        b'{"long": "' + b"x" * 300 + b'"}\n',
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(LINES, max_size=30),
    tail=st.sampled_from([b"", b'{"last": true}', b"  "]),
    bom=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=2_000), max_size=6),
)
@example(lines=[b'{"a": 1}\n'] * 3, tail=b"", bom=True, cuts=[1, 2, 3, 9, 10])
def test_ranges_read_every_line_once_with_its_index_and_number(
    lines: list[bytes], tail: bytes, bom: bool, cuts: list[int]
) -> None:
    data = (b"\xef\xbb\xbf" if bom else b"") + b"".join(lines) + tail
    whole = _plain(iter_records("ndjson", io.BytesIO(data)))
    assert _in_ranges(data, cuts) == whole


def test_a_cut_inside_a_line_leaves_the_line_to_the_range_it_starts_in() -> None:
    data = b'{"a": 1}\n{"b": 2}\n{"c": 3}\n'
    first = list(ndjson_range(io.BytesIO(data), ByteRange(0, 12)))
    second = list(ndjson_range(io.BytesIO(data), ByteRange(12, None, 2, 3)))
    assert first == [(0, {"a": 1}), (1, {"b": 2})]
    assert second == [(2, {"c": 3})]
    assert count_ndjson_range(io.BytesIO(data), ByteRange(0, 12)) == (2, 2)


def test_a_line_longer_than_a_range_is_one_record_of_the_first(monkeypatch) -> None:
    monkeypatch.setattr(formats, "MAX_LINE_BYTES", 64)
    data = b'{"a": "' + b"x" * 200 + b'"}\n{"b": 2}\n'
    assert _in_ranges(data, [50, 100, 150]) == _plain(iter_records("ndjson", io.BytesIO(data)))
    assert list(ndjson_range(io.BytesIO(data), ByteRange(50, 100, 1, 2))) == []


def _parquet(groups: list[int]) -> bytes:
    out = io.BytesIO()
    rows = [{"n": i} for i in range(sum(groups))]
    with pq.ParquetWriter(out, pa.schema([("n", pa.int64())])) as writer:
        at = 0
        for size in groups:
            writer.write_table(pa.Table.from_pylist(rows[at : at + size]))
            at += size
    return out.getvalue()


def test_parquet_row_groups_are_read_as_parts_with_their_file_index() -> None:
    data = _parquet([3, 2, 4])
    layout = parquet_row_groups(io.BytesIO(data))
    assert [rows for rows, _ in layout] == [3, 2, 4]
    assert all(size > 0 for _, size in layout)
    parts = list(parquet_range(io.BytesIO(data), RowGroupRange(1, 3, 3)))
    assert parts == [(i, {"n": i}) for i in range(3, 9)]


def test_parquet_layout_of_a_file_that_is_not_parquet_is_a_clear_error() -> None:
    with pytest.raises(formats.BodyMalformed, match="not a Parquet file"):
        parquet_row_groups(io.BytesIO(b"PAR1 nonsense"))


def test_ranges_split_a_large_file_without_loss_or_overlap() -> None:
    body = b"".join(orjson.dumps({"i": i, "pad": "p" * (i % 97)}) + b"\n" for i in range(5000))
    step = len(body) // 7
    assert _in_ranges(body, list(range(step, len(body), step))) == [
        (i, {"i": i, "pad": "p" * (i % 97)}) for i in range(5000)
    ]
