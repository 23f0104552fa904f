"""Debezium change events, turned into versioned rows of a ClickHouse table.

A change event (Kafka Connect's JSON converter with schemas enabled) carries the row
before and after the change, the operation (``c`` create, ``u`` update, ``d`` delete,
``r`` snapshot read), and the position of the change in PostgreSQL's write-ahead log
(``source.lsn``). :func:`parse_change` makes one :class:`Change` of it: the table's
columns with their ClickHouse types (from the Debezium schema), the primary key (from
the record key's schema), the row, and the LSN as the row's version.

The ClickHouse table (``ReplacingMergeTree(_version, _deleted)`` ordered by the primary
key) keeps per key the row with the highest version, and a delete is a row with
``_deleted = 1``: so applying changes in any order, or twice, leaves the same table.
"""

from __future__ import annotations

import base64
import decimal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson

from core.exceptions import InvalidInputError

OPERATIONS = ("c", "u", "d", "r")
VERSION_COLUMN = "_version"
DELETED_COLUMN = "_deleted"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DAY = date(1970, 1, 1)

_PRIMITIVES = {
    "int8": "Int8",
    "int16": "Int16",
    "int32": "Int32",
    "int64": "Int64",
    "float32": "Float32",
    "float64": "Float64",
    "boolean": "Bool",
    "string": "String",
    "bytes": "String",
}
# Debezium's logical types (the schema's ``name``), as ClickHouse types.
_LOGICAL = {
    "io.debezium.time.Date": "Date32",
    "io.debezium.time.Timestamp": "DateTime64(3, 'UTC')",
    "io.debezium.time.MicroTimestamp": "DateTime64(6, 'UTC')",
    "io.debezium.time.NanoTimestamp": "DateTime64(6, 'UTC')",
    "io.debezium.time.ZonedTimestamp": "DateTime64(6, 'UTC')",
    "org.apache.kafka.connect.data.Date": "Date32",
    "org.apache.kafka.connect.data.Timestamp": "DateTime64(3, 'UTC')",
}


class CdcEventError(InvalidInputError):
    """A record of a change topic is not a Debezium change event this module can apply."""


@dataclass(frozen=True, slots=True)
class CdcColumn:
    """One column of a captured table: its name, ClickHouse type and Debezium schema."""

    name: str
    type: str
    source_type: str
    logical: str | None = None
    parameters: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Change:
    """One change of one row, ready to be stored as a versioned row."""

    schema: str
    table: str
    op: str
    key: tuple[str, ...]
    columns: tuple[CdcColumn, ...]
    row: dict[str, Any]
    version: int
    ts_ms: int

    @property
    def deleted(self) -> bool:
        return self.op == "d"

    @property
    def qualified(self) -> str:
        """``schema.table`` as in PostgreSQL."""
        return f"{self.schema}.{self.table}"

    def values(self) -> list[Any]:
        """The row in column order, then ``_version`` and ``_deleted``."""
        return [*(self.row[c.name] for c in self.columns), self.version, int(self.deleted)]


def clickhouse_table(schema: str, table: str) -> str:
    """Name of the ClickHouse table that mirrors ``schema.table``."""
    return f"cdc_{schema}_{table}"


def column_of(field: Mapping[str, Any], in_key: bool) -> CdcColumn:
    """The column of one field of Debezium's row schema.

    An optional field becomes ``Nullable``, except in the primary key (ClickHouse sorts
    by it, and PostgreSQL keys are never null anyway).
    """
    name = field.get("field")
    source_type = field.get("type")
    if not isinstance(name, str) or not isinstance(source_type, str):
        raise CdcEventError(f"a field of the row schema has no name or type: {field!r}")
    logical = field.get("name")
    params = field.get("parameters") or {}
    base = _clickhouse_type(source_type, logical, params)
    optional = bool(field.get("optional")) and not in_key
    return CdcColumn(
        name,
        f"Nullable({base})" if optional else base,
        source_type,
        logical if isinstance(logical, str) else None,
        tuple(sorted((str(k), str(v)) for k, v in params.items())),
    )


def _clickhouse_type(source_type: str, logical: Any, params: Mapping[str, Any]) -> str:
    if logical == "org.apache.kafka.connect.data.Decimal":
        scale = int(params.get("scale", 0))
        precision = int(params.get("connect.decimal.precision", 38))
        return f"Decimal({precision}, {scale})" if 0 < precision <= 76 else "String"
    if isinstance(logical, str) and logical in _LOGICAL:
        return _LOGICAL[logical]
    # Structs (e.g. a variable-scale decimal), arrays and maps are kept as JSON text.
    return _PRIMITIVES.get(source_type, "String")


def convert(column: CdcColumn, value: Any) -> Any:
    """A value as Debezium's JSON converter wrote it, as the column's ClickHouse type."""
    if value is None:
        return None
    logical = column.logical
    if logical in ("io.debezium.time.Date", "org.apache.kafka.connect.data.Date"):
        return _EPOCH_DAY + timedelta(days=int(value))
    if logical in ("io.debezium.time.Timestamp", "org.apache.kafka.connect.data.Timestamp"):
        return _EPOCH + timedelta(milliseconds=int(value))
    if logical == "io.debezium.time.MicroTimestamp":
        return _EPOCH + timedelta(microseconds=int(value))
    if logical == "io.debezium.time.NanoTimestamp":
        return _EPOCH + timedelta(microseconds=int(value) // 1000)
    if logical == "io.debezium.time.ZonedTimestamp":
        return datetime.fromisoformat(str(value)).astimezone(UTC)
    if logical == "org.apache.kafka.connect.data.Decimal":
        return _decimal(column, value)
    if column.source_type == "bytes":
        return base64.b64decode(value, validate=True)
    if column.source_type in ("struct", "array", "map"):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    if column.source_type == "string":
        return str(value)
    return value


def _decimal(column: CdcColumn, value: Any) -> Any:
    """Connect's Decimal: the unscaled value as big-endian two's complement, base64."""
    scale = int(dict(column.parameters).get("scale", "0"))
    unscaled = int.from_bytes(base64.b64decode(value, validate=True), "big", signed=True)
    number = decimal.Decimal(unscaled).scaleb(-scale)
    return str(number) if column.type.removeprefix("Nullable(").startswith("String") else number


def zero(column: CdcColumn) -> Any:
    """A stand-in for a value a delete did not carry (a column that is not nullable)."""
    base = column.type
    if base.startswith("Int") or base.startswith("UInt") or base.startswith("Float"):
        return 0
    if base.startswith("Decimal"):
        return decimal.Decimal(0)
    if base == "Bool":
        return False
    if base == "Date32":
        return _EPOCH_DAY
    if base.startswith("DateTime64"):
        return _EPOCH
    return ""


def _envelope(message: Any, what: str) -> tuple[Mapping[str, Any], Any]:
    """(schema, payload) of a JSON-converter message with schemas enabled."""
    if not isinstance(message, Mapping) or "schema" not in message or "payload" not in message:
        raise CdcEventError(
            f"the {what} is not Kafka Connect JSON with a schema (expected an object with "
            "'schema' and 'payload'; set key/value.converter.schemas.enable=true)"
        )
    schema = message["schema"]
    if not isinstance(schema, Mapping):
        raise CdcEventError(f"the {what} schema is {schema!r}, expected an object")
    return schema, message["payload"]


def _row_fields(value_schema: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    for field in value_schema.get("fields") or ():
        if field.get("field") in ("after", "before") and field.get("type") == "struct":
            return list(field.get("fields") or ())
    raise CdcEventError("the change event's schema has no 'before' or 'after' struct")


def parse_change(key: Any, value: Any) -> Change | None:
    """One Debezium change event (key and value decoded from JSON) as a :class:`Change`.

    Returns:
        None for what is not a row change: a tombstone (``value`` None, written after a
        delete for log compaction), a truncate or a logical decoding message.

    Raises:
        CdcEventError: the event lacks what a change needs (schemas, a primary key, an
            LSN, the row).
    """
    if value is None:
        return None
    value_schema, payload = _envelope(value, "value")
    if not isinstance(payload, Mapping):
        raise CdcEventError(f"the change event's payload is {payload!r}, expected an object")
    op = payload.get("op")
    if op not in OPERATIONS:
        if op in ("t", "m"):
            return None
        raise CdcEventError(f"unknown operation {op!r}; expected one of {', '.join(OPERATIONS)}")
    source = payload.get("source")
    if not isinstance(source, Mapping):
        raise CdcEventError("the change event has no 'source' block")
    lsn = source.get("lsn")
    if not isinstance(lsn, int) or lsn < 0:
        raise CdcEventError(f"source.lsn is {lsn!r}, expected a non-negative integer")
    key_names = _key_names(key)
    columns = tuple(column_of(f, f.get("field") in key_names) for f in _row_fields(value_schema))
    missing = [k for k in key_names if k not in {c.name for c in columns}]
    if missing:
        raise CdcEventError(f"key column(s) {missing} are not columns of the row")
    image = payload.get("before" if op == "d" else "after")
    if not isinstance(image, Mapping):
        which = "before" if op == "d" else "after"
        raise CdcEventError(f"operation {op!r} without a '{which}' row")
    row = _row(columns, image, fill=op == "d")
    ts_ms = payload.get("ts_ms") or source.get("ts_ms") or 0
    return Change(
        str(source.get("schema", "")),
        str(source.get("table", "")),
        op,
        key_names,
        columns,
        row,
        lsn,
        int(ts_ms),
    )


def _key_names(key: Any) -> tuple[str, ...]:
    if key is None:
        raise CdcEventError(
            "the change event has no key: the table has no primary key; give it one "
            "(ClickHouse keeps one row per primary key)"
        )
    key_schema, _payload = _envelope(key, "key")
    names = tuple(str(f.get("field")) for f in key_schema.get("fields") or ())
    if not names:
        raise CdcEventError("the key schema names no columns; the table needs a primary key")
    return names


def _row(columns: Sequence[CdcColumn], image: Mapping[str, Any], fill: bool) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for column in columns:
        try:
            converted = convert(column, image.get(column.name))
        except (ValueError, TypeError, OverflowError, decimal.InvalidOperation) as exc:
            raise CdcEventError(
                f"column {column.name!r}: value {image.get(column.name)!r} is not a valid "
                f"{column.logical or column.source_type}: {exc}"
            ) from exc
        if converted is None and fill and not column.type.startswith("Nullable"):
            # Without REPLICA IDENTITY FULL a delete carries only the key.
            converted = zero(column)
        row[column.name] = converted
    return row


def newest(changes: Sequence[Change]) -> dict[tuple[Any, ...], Change]:
    """The change with the highest version per primary key (what the table will hold)."""
    kept: dict[tuple[Any, ...], Change] = {}
    for change in changes:
        pk = tuple(change.row[k] for k in change.key)
        if pk not in kept or change.version >= kept[pk].version:
            kept[pk] = change
    return kept
