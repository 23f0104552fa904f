"""The columnar side of a micro-batch: Arrow decodes, NumPy decides and groups.

Per-event Python is what limits a stream processor written in Python. This module
turns a whole consumed batch (all partitions at once) into one Arrow table, and
aggregates it per (partition, group, window start) with NumPy, so that only the
*groups* come back to Python.

Decoding has two paths. :func:`decode_json` parses the JSON of the whole batch in one
call to Arrow's reader, against an explicit schema (the envelope fields plus the
declared attributes); it returns None as soon as any record is not a clean envelope.
The caller then decodes record by record with :func:`decode_record`, which names the
reason of each bad record (and decodes Avro records in the Confluent wire format),
and builds the table of the good ones with :func:`table_from_events`. Both paths give
the same table for the same good records; the unit tests check it.

Column names: the envelope fields as they are (``event_id``, ``source``, ``tenant``,
``type``, ``ts`` in epoch ms, ``value``, ``entity``), declared attributes as
``attributes.<name>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from core.avro import AvroError, is_framed
from core.envelope import MAX_ABS_VALUE, STORED_TS_RANGE_MS, check_stored
from core.event_time import Agg, Hopping, Tumbling
from core.sketches import ddsketch_by_group, hll_by_group

ATTRIBUTE_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "float": pa.float64(),
    "int": pa.int64(),
    "bool": pa.bool_(),
}
_ENVELOPE = [
    ("event_id", pa.string()),
    ("source", pa.string()),
    ("tenant", pa.string()),
    ("type", pa.string()),
    ("ts", pa.int64()),
    ("value", pa.float64()),
    ("entity", pa.string()),
]
_REQUIRED = ("event_id", "tenant", "type", "ts", "value")
NO_WATERMARK = np.iinfo(np.int64).min // 4


@dataclass(frozen=True, slots=True)
class Layout:
    """What a batch is decoded into: the envelope plus declared, typed attributes."""

    attributes: tuple[tuple[str, str], ...] = ()

    def json_schema(self) -> pa.Schema:
        fields = [pa.field(name, kind) for name, kind in _ENVELOPE]
        if self.attributes:
            attrs = [pa.field(n, ATTRIBUTE_TYPES[k]) for n, k in self.attributes]
            fields.append(pa.field("attributes", pa.struct(attrs)))
        return pa.schema(fields)

    def flat_schema(self) -> pa.Schema:
        fields = [pa.field(name, kind) for name, kind in _ENVELOPE]
        fields += [pa.field(f"attributes.{n}", ATTRIBUTE_TYPES[k]) for n, k in self.attributes]
        return pa.schema(fields)


def decode_json(values: Sequence[bytes | None], layout: Layout) -> pa.Table | None:
    """Parse a batch of envelope JSON documents, or None when any one is not clean."""
    # Whole-batch checks only (per-record ones cost as much as the parse): no record
    # may be missing or empty or hold a line break, so that line i is record i; an
    # Avro or otherwise bad record makes the parse fail, and the caller goes record by
    # record.
    if not values or None in values or b"" in values:
        return None
    data = b"\n".join(values)  # type: ignore[arg-type]
    if data.count(b"\n") != len(values) - 1:
        return None
    options = pj.ParseOptions(
        explicit_schema=layout.json_schema(), unexpected_field_behavior="ignore"
    )
    try:
        table = pj.read_json(
            BytesIO(data),
            # one block: one parse, no cross-block type checks
            read_options=pj.ReadOptions(block_size=len(data) + 1),
            parse_options=options,
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    if table.num_rows != len(values):
        return None
    if any(table[name].null_count for name in _REQUIRED):
        return None
    if not pc.all(pc.is_finite(table["value"])).as_py():
        return None
    if not _in_bounds(table):  # the record-by-record path names the record and field
        return None
    if layout.attributes:
        table = table.flatten()
    return table.combine_chunks()


def _in_bounds(table: pa.Table) -> bool:
    ts, value = table["ts"], table["value"]
    low, high = STORED_TS_RANGE_MS
    return bool(
        pc.min(ts).as_py() >= low
        and pc.max(ts).as_py() < high
        and pc.max(pc.abs(value)).as_py() <= MAX_ABS_VALUE
    )


def decode_record(
    value: bytes | None, layout: Layout, avro: Callable[[bytes], dict[str, Any]] | None = None
) -> tuple[dict[str, Any] | None, str]:
    """One record as a flat row of the layout, or None and the reason it is unusable."""
    if value is not None and is_framed(value):
        if avro is None:
            return None, "Avro record, but no schema registry is configured"
        try:
            event = avro(value)
        except AvroError as exc:
            return None, str(exc)
    else:
        try:
            event = orjson.loads(value or b"")
        except orjson.JSONDecodeError as exc:
            return None, f"not JSON: {exc}"
    problem = check_stored(event)
    if problem is not None:
        return None, problem
    row = {name: event.get(name) for name, _kind in _ENVELOPE}
    row["source"] = row["source"] or ""
    if not isinstance(row["entity"], str):
        row["entity"] = None
    attributes = event.get("attributes") or {}
    if not isinstance(attributes, dict):
        return None, f"field 'attributes' expected an object, got {type(attributes).__name__}"
    for name, kind in layout.attributes:
        try:
            row[f"attributes.{name}"] = coerce(attributes.get(name), kind)
        except ValueError as exc:
            return None, f"field 'attributes.{name}' {exc}"
    return row, ""


def coerce(value: Any, kind: str) -> Any:
    """A declared attribute's value as its declared type (lossless conversions only)."""
    if value is None:
        return None
    if kind == "string":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return value if isinstance(value, str) else str(value)
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind == "bool" and isinstance(value, bool):
        return value
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise ValueError(f"expected {kind}, got {shown}")


def table_from_events(rows: Sequence[Mapping[str, Any]], layout: Layout) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=layout.flat_schema())


# Grouping ---------------------------------------------------------------------


def dense_codes(column: pa.Array | pa.ChunkedArray | np.ndarray) -> np.ndarray:
    """Small integer codes (0..k-1) with equal codes for equal values; null is a value."""
    if isinstance(column, np.ndarray):
        return np.unique(column, return_inverse=True)[1].astype(np.int64)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = pc.dictionary_encode(column, null_encoding="encode")
    return np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)


def group_ids(columns: Sequence[pa.Array | pa.ChunkedArray | np.ndarray]) -> np.ndarray:
    """One dense group id per row for the combination of ``columns``."""
    ids = np.zeros(len(columns[0]), dtype=np.int64)
    for column in columns:
        codes = dense_codes(column)
        width = int(codes.max()) + 1 if len(codes) else 1
        # Re-densify after each column so the combined code never overflows.
        ids = np.unique(ids * width + codes, return_inverse=True)[1].astype(np.int64)
    return ids


@dataclass(frozen=True, slots=True)
class Partial:
    """The aggregate of one group's rows in one window start."""

    row: int  # a row of the group: its key values can be read from the table there
    start: int
    agg: Agg


def window_partials(
    group: np.ndarray,
    ts: np.ndarray,
    values: np.ndarray,
    marks: np.ndarray,
    spec: Tumbling | Hopping,
    distinct: tuple[np.ndarray, np.ndarray] | None = None,
    quantiles: bool = False,
) -> list[Partial]:
    """Aggregate rows per (group, pane) for the panes still in an open window at ``marks``
    (a pane is one hop of a hopping window, or a whole tumbling window).

    Args:
        group: a dense group id per row (partition and group-by columns).
        ts: event time per row (epoch ms).
        values: the value per row.
        marks: the watermark of each row's partition (``NO_WATERMARK`` before any).
        spec: the window kind.
        distinct: 64-bit hashes of the distinct-count column and where it is not null.
        quantiles: whether to sketch the values' distribution.
    """
    step = spec.hop_ms if isinstance(spec, Hopping) else spec.size_ms
    pane = ts - ts % step
    row = np.flatnonzero(pane + spec.length_ms > marks)  # the pane is in an open window
    if not len(row):
        return []
    start = pane[row]
    gid = group_ids([group[row], start])
    return _aggregate(gid, row, start, values[row], distinct, quantiles)


def _aggregate(
    gid: np.ndarray,
    row: np.ndarray,
    start: np.ndarray,
    values: np.ndarray,
    distinct: tuple[np.ndarray, np.ndarray] | None,
    quantiles: bool,
) -> list[Partial]:
    n = int(gid.max()) + 1
    order = np.argsort(gid, kind="stable")
    bounds = np.flatnonzero(np.r_[True, np.diff(gid[order]) != 0])
    first = order[bounds]
    counts = np.bincount(gid, minlength=n)
    sums = np.bincount(gid, weights=values, minlength=n)
    mins = np.minimum.reduceat(values[order], bounds)
    maxs = np.maximum.reduceat(values[order], bounds)
    hlls = None
    if distinct is not None:
        hashes, valid = distinct[0][row], distinct[1][row]
        hlls = hll_by_group(gid[valid], hashes[valid], n)
    sketches = ddsketch_by_group(gid, values, n) if quantiles else None
    out = []
    for g in range(n):
        agg = Agg(int(counts[g]), float(sums[g]), float(mins[g]), float(maxs[g]))
        agg.distinct = None if hlls is None else hlls[g]
        agg.quantiles = None if sketches is None else sketches[g]
        out.append(Partial(int(row[first[g]]), int(start[first[g]]), agg))
    return out


def late_mask(ts: np.ndarray, spec: Tumbling | Hopping, marks: np.ndarray) -> np.ndarray:
    """True where every window of ``spec`` that holds the event has closed."""
    step = spec.hop_ms if isinstance(spec, Hopping) else spec.size_ms
    last_start = ts - ts % step
    return np.asarray(last_start + spec.length_ms <= marks)
