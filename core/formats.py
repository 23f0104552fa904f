"""Request bodies and uploaded files in JSON, NDJSON, CSV, Avro and Parquet, as records.

:func:`format_of` picks the format from the Content-Type (or the file name);
:func:`decode_body` decodes a request body whole; :func:`iter_records` streams a file
of any size in constant memory. Both split their output into records that decoded and
:class:`RecordError` values (with the record's original bytes, for the dead-letter
topic): one bad line or row never fails the others. A body that is unusable as a whole
raises :class:`BodyMalformed` (HTTP 400); a format Rayline does not read raises
:class:`UnsupportedFormat` (HTTP 415).

====================== ==============================================================
format                 records
====================== ==============================================================
``json``               a document: an array gives one record per item, an object one
``ndjson``             one JSON value per line; blank lines are skipped
``csv``                one object per row, keyed by the header row; cells typed by an
                       Avro record schema when one is given, strings otherwise
``avro``               one datum in the Confluent wire format (0x00, schema id, body)
                       or Avro's single-object encoding (0xC3 0x01, fingerprint, body)
``avro-container``     an Avro object container file, read block by block
``parquet``            a Parquet file, read batch by batch
====================== ==============================================================

Values are JSON values, whatever the format: Avro and Parquet timestamps and dates
become ISO 8601 strings (``2026-11-29T10:00:00+00:00``; a Parquet timestamp without a
time zone has no offset), decimals become decimal strings, bytes become strings with
one character per byte (as in Avro's JSON encoding and ``core.avro``).

Bounds, so that a hostile or broken file cannot exhaust memory: an NDJSON line or a
CSV line may be :data:`MAX_LINE_BYTES` long, a CSV cell :data:`MAX_CELL_CHARS`, a JSON
document :data:`MAX_DOCUMENT_BYTES` (stream larger files as NDJSON), and the bytes a
:class:`RecordError` keeps :data:`MAX_RAW_BYTES`.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, BinaryIO
from uuid import UUID

import fastavro
import fastavro.schema
import orjson

# The compiled reader recurses on the C stack; the pure-Python one raises RecursionError.
from fastavro._read_py import reader as _python_container_reader
from fastavro._read_py import schemaless_reader as _python_reader
from fastavro.schema import to_parsing_canonical_form

from core import avro
from core.exceptions import InvalidInputError

__all__ = [
    "FORMATS",
    "MAX_CELL_CHARS",
    "MAX_DOCUMENT_BYTES",
    "MAX_LINE_BYTES",
    "MAX_RAW_BYTES",
    "BodyMalformed",
    "Decoded",
    "RecordError",
    "UnsupportedFormat",
    "decode_body",
    "format_of",
    "iter_records",
    "single_object_fingerprint",
]

FORMATS = ("json", "ndjson", "csv", "avro", "avro-container", "parquet")

MAX_RAW_BYTES = 64 << 10
MAX_LINE_BYTES = 1 << 20
MAX_CELL_CHARS = 128 << 10
MAX_DOCUMENT_BYTES = 64 << 20

_BOM = b"\xef\xbb\xbf"
_SINGLE_OBJECT_MAGIC = b"\xc3\x01"
_SINGLE_OBJECT_HEADER = 10
_CONTENT_TYPES = {
    "application/json": "json",
    "text/json": "json",
    "application/x-ndjson": "ndjson",
    "application/ndjson": "ndjson",
    "application/jsonl": "ndjson",
    "application/x-jsonlines": "ndjson",
    "text/csv": "csv",
    "application/csv": "csv",
    "application/vnd.apache.avro+binary": "avro",
    "avro/binary": "avro",
    "application/vnd.apache.avro+container": "avro-container",
    "avro/container": "avro-container",
    "application/vnd.apache.parquet": "parquet",
}
_SUFFIXES = {
    ".json": "json",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
    ".csv": "csv",
    ".avro": "avro-container",
    ".parquet": "parquet",
}
_INTEGER = re.compile(r"[+-]?[0-9]{1,20}")
_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})


class UnsupportedFormat(InvalidInputError):
    """The body's format is not one Rayline reads (HTTP 415)."""


class BodyMalformed(InvalidInputError):
    """The body as a whole cannot be used (HTTP 400)."""


class TooManyRecords(BodyMalformed):
    """The body holds more records than one request may (HTTP 413)."""


@dataclass(frozen=True, slots=True)
class RecordError:
    """One record that did not decode.

    Attributes:
        index: the record's position (0-based; for CSV the data row, header not counted).
        message: what is wrong and how to fix it.
        raw: the record's original bytes (at most :data:`MAX_RAW_BYTES`), for the DLQ.
    """

    index: int
    message: str
    raw: bytes


@dataclass
class Decoded:
    """A decoded body: the records that decoded, with their index, and the errors."""

    records: list[tuple[int, Any]]
    errors: list[RecordError]


Item = tuple[int, Any] | RecordError
SchemaLookup = Callable[[int], str | None]
FingerprintLookup = Callable[[bytes], str | None]


# ------------------------------------------------------------------------------ formats


def _accepted() -> str:
    return ", ".join(_CONTENT_TYPES) + " (or a file named " + ", ".join(_SUFFIXES) + ")"


def format_of(content_type: str | None, filename: str | None = None) -> str:
    """The format of a body from its Content-Type, else from its file name's suffix.

    Raises:
        UnsupportedFormat: when neither names a format; the message lists those accepted.
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in _CONTENT_TYPES:
        return _CONTENT_TYPES[media]
    if media.startswith("application/") and media.endswith("+json"):
        return "json"
    name = (filename or "").strip().lower()
    for suffix, fmt in _SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    shown = f"Content-Type {content_type!r}" + (f" and file name {filename!r}" if filename else "")
    raise UnsupportedFormat(f"{shown} name no format Rayline reads: send one of {_accepted()}")


def _bounded(raw: bytes) -> bytes:
    return bytes(raw[:MAX_RAW_BYTES])


def _plain(value: Any) -> Any:
    """A decoded Avro or Parquet value as a JSON value."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, UUID):
        return str(value)
    return value


# ------------------------------------------------------------------------------- JSON


def _json_records(data: bytes) -> Iterator[Item]:
    yield from _json_document(data)


def _json_document(data: bytes) -> list[tuple[int, Any]]:
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BodyMalformed(
            f"body is not a JSON document: {exc}; send UTF-8 JSON (no NaN or Infinity), "
            "an array of events or one event object"
        ) from None
    if isinstance(document, dict):
        return [(0, document)]
    if isinstance(document, list):
        return list(enumerate(document))
    raise BodyMalformed(
        f"body is a JSON {type(document).__name__}: expected an array of events or one event object"
    )


def _iter_json(stream: BinaryIO) -> Iterator[Item]:
    data = stream.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise BodyMalformed(
            f"JSON document is over {MAX_DOCUMENT_BYTES >> 20} MiB and must be read whole: "
            "upload large files as NDJSON (one event per line), which is read line by line"
        )
    yield from _json_records(data)


# ----------------------------------------------------------------------------- lines


def _lines(stream: BinaryIO, first_number: int = 1) -> Iterator[tuple[int, bytes, bool, int]]:
    """(line number, line, whether it was cut at MAX_LINE_BYTES, bytes it took in the
    stream) without the rest of a cut line; a BOM is dropped from line 1 only."""
    number = first_number - 1
    while True:
        line = stream.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        size = len(line)
        if number == 1 and line.startswith(_BOM):
            line = line[len(_BOM) :]
        too_long = len(line) > MAX_LINE_BYTES and not line.endswith(b"\n")
        while too_long:  # skip the rest of the line in bounded steps
            rest = stream.readline(MAX_LINE_BYTES)
            size += len(rest)
            if not rest or rest.endswith(b"\n"):
                break
        yield number, line, too_long, size


def _ndjson_items(
    lines: Iterator[tuple[int, bytes, bool, int]], first_index: int = 0
) -> Iterator[Item]:
    index = first_index
    for number, line, too_long, _ in lines:
        if not line.strip():
            continue
        if too_long:
            yield RecordError(
                index,
                f"line {number} is longer than {MAX_LINE_BYTES >> 20} MiB: "
                "keep each event small and put large payloads in object storage",
                _bounded(line),
            )
        else:
            try:
                yield index, orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield RecordError(
                    index,
                    f"line {number} is not JSON: {exc}; write one JSON value per line",
                    _bounded(line.rstrip(b"\r\n")),
                )
        index += 1


def _iter_ndjson(stream: BinaryIO) -> Iterator[Item]:
    return _ndjson_items(_lines(stream))


@dataclass(frozen=True, slots=True)
class ByteRange:
    """The lines of an NDJSON file that start in bytes ``[start, end)``, and where they
    stand in the whole file: ``first_index`` records and ``first_line - 1`` lines (blank
    ones included) come before them. ``end`` None reads to the end of the file."""

    start: int
    end: int | None
    first_index: int = 0
    first_line: int = 1


def _range_lines(stream: BinaryIO, span: ByteRange) -> Iterator[tuple[int, bytes, bool, int]]:
    """The lines of ``span`` in a seekable stream: a line belongs to the range its first
    byte is in, so ranges that meet at any bytes split a file without loss or overlap."""
    position = _first_line_start(stream, span.start)
    for line in _lines(stream, span.first_line):  # line 1 (and its BOM) only at byte 0
        if span.end is not None and position >= span.end:
            return
        position += line[3]
        yield line


def _first_line_start(stream: BinaryIO, at: int) -> int:
    """Seek to the first line that starts at or after byte ``at``; return its offset."""
    if at == 0:
        stream.seek(0)
        return 0
    position = stream.seek(at - 1)  # a newline at at-1 means a line starts at at
    while True:
        chunk = stream.readline(MAX_LINE_BYTES)
        position += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return position


def ndjson_range(stream: BinaryIO, span: ByteRange) -> Iterator[Item]:
    """The records of the lines of ``span`` (see :class:`ByteRange`), indexed and
    numbered as :func:`iter_records` would number them reading the whole file."""
    return _ndjson_items(_range_lines(stream, span), span.first_index)


def count_ndjson_range(stream: BinaryIO, span: ByteRange) -> tuple[int, int]:
    """(records, lines) of ``span``: what a range that follows it must skip."""
    records = lines = 0
    for _, line, _, _ in _range_lines(stream, span):
        lines += 1
        records += bool(line.strip())
    return records, lines


# ------------------------------------------------------------------------------- CSV


@dataclass(frozen=True, slots=True)
class _Cell:
    kind: str  # "int", "float", "boolean" or "string"
    nullable: bool


def _cell_kinds(schema: Mapping[str, Any] | None) -> dict[str, _Cell]:
    if schema is None:
        return {}
    kinds: dict[str, _Cell] = {}
    for field in schema.get("fields", ()):
        kind: Any = field.get("type")
        nullable = False
        if isinstance(kind, list):
            nullable = "null" in kind
            branches = [branch for branch in kind if branch != "null"]
            kind = branches[0] if len(branches) == 1 else "string"
        if isinstance(kind, dict):
            kind = kind.get("type")
        kind = {"long": "int", "double": "float"}.get(kind, kind)
        kinds[field["name"]] = _Cell(
            kind if kind in ("int", "float", "boolean") else "string", nullable
        )
    return kinds


def _convert(cell: str, kind: _Cell) -> Any:
    """The typed value of a cell; raises ValueError when the cell does not convert."""
    if kind.nullable and cell == "":
        return None
    if kind.kind == "string":
        return cell
    text = cell.strip()
    if kind.kind == "int":
        if not _INTEGER.fullmatch(text):
            raise ValueError
        return int(text)
    if kind.kind == "float":
        number = float(text)
        if not math.isfinite(number):
            raise ValueError
        return number
    lowered = text.lower()
    if lowered in _TRUE or lowered in _FALSE:
        return lowered in _TRUE
    raise ValueError


class _LineFeed:
    """Feeds lines to csv.reader and keeps the bytes of the row being read."""

    def __init__(self, stream: BinaryIO) -> None:
        self._lines = _lines(stream)
        self.pending: list[bytes] = []
        self.bad_encoding = False

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        number, line, too_long, _ = next(self._lines)
        if too_long:
            raise BodyMalformed(
                f"CSV line {number} is longer than {MAX_LINE_BYTES >> 20} MiB: split the file "
                f"or keep cells under {MAX_CELL_CHARS >> 10} KiB; rows before it were read"
            )
        self.pending.append(line)
        try:
            return line.decode()
        except UnicodeDecodeError:
            self.bad_encoding = True
            return line.decode(errors="surrogateescape")

    def take(self) -> tuple[bytes, bool]:
        raw, bad = b"".join(self.pending), self.bad_encoding
        self.pending.clear()
        self.bad_encoding = False
        return raw, bad


def _read_header(rows: Iterator[list[str]], feed: _LineFeed) -> list[str]:
    header = next(rows, None)
    _, bad = feed.take()
    if not header or all(not name.strip() for name in header):
        raise BodyMalformed("CSV body has no header row: the first line must name the columns")
    if bad:
        raise BodyMalformed("CSV header row is not UTF-8 text: save the file as UTF-8")
    blank = [position for position, name in enumerate(header, 1) if not name.strip()]
    if blank:
        raise BodyMalformed(f"CSV header has empty column name(s) at position(s) {blank}")
    twice = sorted(name for name, count in Counter(header).items() if count > 1)
    if twice:
        raise BodyMalformed(f"CSV header names column(s) {twice} more than once: rename them")
    return header


def _csv_row(
    index: int, row: list[str], header: list[str], kinds: Mapping[str, _Cell]
) -> tuple[dict[str, Any] | None, str]:
    if len(row) != len(header):
        return None, (
            f"row {index} has {len(row)} cells, expected {len(header)} (one per header column)"
        )
    record: dict[str, Any] = {}
    for name, cell in zip(header, row, strict=True):
        kind = kinds.get(name)
        if kind is None:
            record[name] = cell
            continue
        try:
            record[name] = _convert(cell, kind)
        except ValueError:
            shown = cell if len(cell) <= 40 else cell[:37] + "..."
            return None, f"row {index}, column '{name}': expected {kind.kind}, got {shown!r}"
    return record, ""


def _iter_csv(stream: BinaryIO, schema: Mapping[str, Any] | None) -> Iterator[Item]:
    # The limit is process-wide; setting it here keeps it bounded whoever changed it.
    csv.field_size_limit(MAX_CELL_CHARS)
    feed = _LineFeed(stream)
    rows = csv.reader(feed)
    kinds = _cell_kinds(schema)
    try:
        header = _read_header(rows, feed)
        index = 0
        for row in rows:
            raw, bad = feed.take()
            if not row:
                continue
            if bad:
                message = f"row {index} is not UTF-8 text: save the file as UTF-8"
            else:
                record, message = _csv_row(index, row, header, kinds)
            yield RecordError(index, message, _bounded(raw)) if message else (index, record)
            index += 1
    except csv.Error as exc:
        raise BodyMalformed(
            f"CSV is malformed at line {rows.line_num}: {exc}; quote cells that hold commas, "
            f"quotes or newlines, and keep cells under {MAX_CELL_CHARS >> 10} KiB"
        ) from None


# ------------------------------------------------------------------------------- Avro


def single_object_fingerprint(schema_text: str) -> bytes:
    """The 8 bytes that name a schema in Avro's single-object encoding.

    They are the CRC-64-AVRO (Rabin) fingerprint of the schema's Parsing Canonical Form,
    little-endian, as Java's ``SchemaNormalization.parsingFingerprint64`` writes them. A
    registry keeps them per schema to answer ``avro_schema_for_fingerprint``.

    Raises:
        avro.AvroError: when the text is not an Avro schema.
    """
    try:
        canonical = to_parsing_canonical_form(orjson.loads(schema_text))
    except Exception as exc:  # orjson or fastavro, on text that is no schema
        raise avro.AvroError(f"not an Avro schema: {type(exc).__name__}: {exc}") from None
    return bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))


def _iter_avro(
    stream: BinaryIO, by_id: SchemaLookup | None, by_fingerprint: FingerprintLookup | None
) -> Iterator[Item]:
    data = stream.read(avro.MAX_BODY_BYTES + _SINGLE_OBJECT_HEADER + 1)
    yield _avro_datum(data, by_id, by_fingerprint)


def _avro_schema(
    data: bytes, by_id: SchemaLookup | None, by_fingerprint: FingerprintLookup | None
) -> tuple[str, str | None, bytes]:
    """(what names the schema, its text or None, the Avro body) of a single datum."""
    if data[:2] == _SINGLE_OBJECT_MAGIC and len(data) >= _SINGLE_OBJECT_HEADER:
        key = data[2:_SINGLE_OBJECT_HEADER]
        text = by_fingerprint(key) if by_fingerprint is not None else None
        return f"fingerprint {key.hex()}", text, data[_SINGLE_OBJECT_HEADER:]
    schema_id, body = avro.split_frame(data)
    return f"id {schema_id}", by_id(schema_id) if by_id is not None else None, body


def _avro_datum(
    data: bytes, by_id: SchemaLookup | None, by_fingerprint: FingerprintLookup | None
) -> Item:
    def error(message: str) -> RecordError:
        return RecordError(0, message, _bounded(data))

    try:
        named, text, body = _avro_schema(data, by_id, by_fingerprint)
    except avro.AvroError as exc:
        return error(f"{exc} (or 0xC3 0x01 and an 8-byte fingerprint: single-object encoding)")
    if len(body) > avro.MAX_BODY_BYTES:
        return error(f"Avro body is over {avro.MAX_BODY_BYTES >> 20} MiB: keep events small")
    if text is None:
        return error(f"unknown schema {named}; register it at /registry")
    try:
        parsed = avro.parse_schema_text(text)
    except avro.AvroError as exc:
        return error(f"schema {named} cannot be used: {exc}")
    buffer = io.BytesIO(body)
    try:
        record = _python_reader(buffer, parsed, None)
    except Exception as exc:  # a crafted body makes fastavro raise nearly anything
        return error(f"Avro body does not match schema {named}: {type(exc).__name__}: {exc}")
    if buffer.tell() != len(body):
        left = len(body) - buffer.tell()
        return error(f"Avro body does not match schema {named}: {left} byte(s) after the record")
    return 0, _plain(record)


def _recursive(schema: Any, defining: frozenset[str] = frozenset()) -> bool:
    """Whether a (fastavro-parsed) schema names a type inside its own definition."""
    if isinstance(schema, str):
        return schema in defining
    if isinstance(schema, list):
        return any(_recursive(branch, defining) for branch in schema)
    if not isinstance(schema, dict):
        return False
    if schema.get("type") in ("record", "error"):
        inner = defining | {schema.get("name", "")}
        return any(_recursive(field.get("type"), inner) for field in schema.get("fields", ()))
    return any(_recursive(schema[key], defining) for key in ("items", "values") if key in schema)


def _container_reader(stream: BinaryIO) -> Iterator[Any]:
    start = stream.tell() if stream.seekable() else 0
    try:
        reader: Iterator[Any] = fastavro.reader(stream)
        if _recursive(getattr(reader, "writer_schema", None)):
            # A crafted file could make the compiled reader overflow the C stack.
            if not stream.seekable():
                raise BodyMalformed("Avro files with recursive schemas must be seekable")
            stream.seek(start)
            reader = _python_container_reader(stream)
    except BodyMalformed:
        raise
    except Exception as exc:  # fastavro raises many types on a bad header
        raise BodyMalformed(
            f"body is not an Avro object container file: {type(exc).__name__}: {exc}; "
            "write it with an Avro DataFileWriter (fastavro.writer)"
        ) from None
    return reader


def _iter_avro_container(stream: BinaryIO) -> Iterator[Item]:
    records = iter(_container_reader(stream))
    index = 0
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as exc:  # a damaged block: what follows cannot be found again
            yield RecordError(
                index,
                f"Avro file is damaged: records from {index} on could not be read "
                f"({type(exc).__name__}: {exc}); records before it were read",
                b"",
            )
            return
        yield index, _plain(record)
        index += 1


# ----------------------------------------------------------------------------- Parquet


def _parquet_file(stream: BinaryIO) -> Any:
    import pyarrow.parquet as pq  # imported here: pyarrow is heavy and only files need it

    try:
        return pq.ParquetFile(stream)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise BodyMalformed(f"body is not a Parquet file: {exc}") from None


@dataclass(frozen=True, slots=True)
class RowGroupRange:
    """Row groups ``[start, end)`` of a Parquet file, after ``first_index`` rows."""

    start: int
    end: int
    first_index: int = 0


def parquet_row_groups(stream: BinaryIO) -> list[tuple[int, int]]:
    """(rows, uncompressed bytes) of each row group, from the file's footer.

    Raises:
        BodyMalformed: the stream is not a Parquet file.
    """
    metadata = _parquet_file(stream).metadata
    groups = (metadata.row_group(i) for i in range(metadata.num_row_groups))
    return [(group.num_rows, group.total_byte_size) for group in groups]


def _iter_parquet(stream: BinaryIO, span: RowGroupRange | None = None) -> Iterator[Item]:
    parquet = _parquet_file(stream)
    groups = None if span is None else list(range(span.start, span.end))
    index = 0 if span is None else span.first_index
    try:
        for batch in parquet.iter_batches(batch_size=1024, row_groups=groups):
            for row in batch.to_pylist():
                yield index, _plain(row)
                index += 1
    except Exception as exc:
        yield RecordError(
            index,
            f"Parquet file is damaged: rows from {index} on could not be read ({exc}); "
            "rows before it were read",
            b"",
        )


def parquet_range(stream: BinaryIO, span: RowGroupRange) -> Iterator[Item]:
    """The records of row groups ``span``, indexed as in the whole file."""
    return _iter_parquet(stream, span)


# --------------------------------------------------------------------------------- API


def iter_records(
    fmt: str,
    stream: BinaryIO,
    *,
    csv_schema: Mapping[str, Any] | None = None,
    avro_schema_for_id: SchemaLookup | None = None,
    avro_schema_for_fingerprint: FingerprintLookup | None = None,
) -> Iterator[tuple[int, Any] | RecordError]:
    """Stream the records of a file in constant memory (but for ``json``, read whole).

    Args:
        fmt: one of :data:`FORMATS` (see :func:`format_of`).
        stream: the file, opened for binary reading; ``parquet`` needs it seekable.
        csv_schema: a parsed Avro record schema that types CSV cells by column name.
        avro_schema_for_id: the schema text of a registry id, or None when unknown.
        avro_schema_for_fingerprint: the schema text of a single-object encoding's
            fingerprint (see :func:`single_object_fingerprint`), or None when unknown.

    Yields:
        ``(index, value)`` for each record that decoded, a :class:`RecordError` for each
        one that did not.

    Raises:
        UnsupportedFormat: for a format not in :data:`FORMATS`.
        BodyMalformed: when the file cannot be read as that format at all; it may come
            after records were yielded (a damaged CSV line deep in the file).
    """
    if fmt == "json":
        return _iter_json(stream)
    if fmt == "ndjson":
        return _iter_ndjson(stream)
    if fmt == "csv":
        return _iter_csv(stream, csv_schema)
    if fmt == "avro":
        return _iter_avro(stream, avro_schema_for_id, avro_schema_for_fingerprint)
    if fmt == "avro-container":
        return _iter_avro_container(stream)
    if fmt == "parquet":
        return _iter_parquet(stream)
    raise UnsupportedFormat(f"format {fmt!r} is not one Rayline reads: expected one of {FORMATS}")


def decode_body(
    fmt: str,
    body: bytes,
    *,
    csv_schema: Mapping[str, Any] | None = None,
    avro_schema_for_id: SchemaLookup | None = None,
    avro_schema_for_fingerprint: FingerprintLookup | None = None,
    max_records: int = 100_000,
) -> Decoded:
    """Decode a whole request body.

    Raises:
        UnsupportedFormat: for a format not in :data:`FORMATS`.
        BodyMalformed: when the body is unusable as a whole, or holds more than
            ``max_records`` records.
    """
    if fmt == "json" and len(body) <= MAX_DOCUMENT_BYTES:
        # The hot path of the batch API: one parse, no generator per record.
        records = _json_document(body)
        if len(records) > max_records:
            raise _too_many(max_records)
        return Decoded(records, [])
    records = []  # the slow path: one record at a time
    errors: list[RecordError] = []
    items = iter_records(
        fmt,
        io.BytesIO(body),
        csv_schema=csv_schema,
        avro_schema_for_id=avro_schema_for_id,
        avro_schema_for_fingerprint=avro_schema_for_fingerprint,
    )
    for item in items:
        if len(records) + len(errors) >= max_records:
            raise _too_many(max_records)
        if isinstance(item, RecordError):
            errors.append(item)
        else:
            records.append(item)
    return Decoded(records, errors)


def _too_many(limit: int) -> TooManyRecords:
    return TooManyRecords(
        f"body holds more than {limit} records, the limit is {limit}: "
        "split it into smaller requests, or upload it as a file"
    )
