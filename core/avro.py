"""Avro events in the Confluent wire format, and how an Avro record becomes an envelope.

Records on ``events.raw`` are either JSON envelopes (a JSON object, so the first byte
is ``{``) or Avro in the Confluent wire format, which is what confluent_kafka's
``AvroSerializer`` and every Confluent client write:

====== ======= ================================================================
bytes  what    notes
====== ======= ================================================================
0      magic   always ``0x00`` (:data:`MAGIC`); a JSON record never starts with it
1-4    id      the schema id in the registry, big-endian unsigned 32-bit
5-     body    the record in Avro binary encoding, without a schema or header
====== ======= ================================================================

:func:`is_framed` tells the two kinds apart; :func:`decode` turns a framed record into
an envelope with the schema its id names, found through a :class:`SchemaCache`.

Subjects. Schemas are registered per subject, and the subject of the events of one
source and type is ``"{source}.{type}"`` (:func:`subject_for`): events of type
``checkout`` from source ``web`` are described by subject ``web.checkout``. Source
and type names may contain dots themselves, so a subject is a name to look up, never
something to split back into its parts. A schema gets one id however often and under
however many subjects it is registered: the registry recognises it by its
:func:`fingerprint`.

Event schemas. A schema Rayline decodes with must be a record (:func:`parse_schema_text`
checks this and the rules below when a schema is registered and when it is loaded):

* ``ts``, when present, is a ``long`` of epoch milliseconds, plain or with
  ``"logicalType": "timestamp-millis"``: Rayline's event time is epoch milliseconds;
* ``attributes``, when present, is a map or a record (or either in a union with null);
* no record has two fields of one name (fastavro lets that pass);
* no array may have items that take no bytes (``null``, a record without fields, a
  ``fixed`` of size 0): a few bytes could then declare billions of items.

The envelope mapping. A decoded record becomes an envelope (see core.envelope):

* the fields ``event_id``, ``tenant``, ``type``, ``ts``, ``source``, ``entity`` and
  ``value`` go to the top level; a ``null`` there counts as absent;
* every other field goes into ``attributes``; a field named ``attributes`` that holds a
  map (or a record) is merged into them, and a named field wins over a map entry of
  the same name;
* as for JSON events, ``value`` defaults to 0, ``entity`` to ``event_id`` and
  ``attributes`` to ``{}``; ``source`` stays absent when the record has none.

For example, with a schema of the fields ``event_id``, ``tenant``, ``type``, ``ts``,
``value``, ``currency`` and an ``attributes`` map, the record::

    {"event_id": "e-1", "tenant": "acme", "type": "checkout", "ts": 1795931400000,
     "value": 12.5, "currency": "EUR", "attributes": {"channel": "app"}}

becomes the envelope::

    {"event_id": "e-1", "tenant": "acme", "type": "checkout", "ts": 1795931400000,
     "value": 12.5, "entity": "e-1", "attributes": {"channel": "app", "currency": "EUR"}}

Envelopes hold JSON values only, so that they can be serialised like JSON events.
Logical types come out as the Avro value underneath them (``timestamp-millis``: epoch
milliseconds, ``date``: days since 1970-01-01, ``uuid``: the string), except
``decimal``, which comes out as a decimal string (``"12.50"``) so that no digit is
lost, or as a float in ``value``; ``bytes`` and ``fixed`` come out as strings with
one character per byte (code points 0 to 255, as in Avro's JSON encoding).

The other way. :func:`validate` checks a JSON envelope against a schema, finding each
field of the schema where the mapping puts it (the seven envelope fields at the top
level, the others in ``attributes``) and reporting every problem with its path.
Schemas are open: attributes a schema does not name are allowed, and they are dropped
when the event is encoded, unless the schema has an ``attributes`` map, whose value
type they must then fit. :func:`encode` writes exactly the records that
:func:`validate` accepts: envelopes, flat Avro records (all fields at the top level),
and the Python values fastavro's writer takes (datetime, date, Decimal, bytes, ...).

Hostile input. A body longer than :data:`MAX_BODY_BYTES` is refused before it is read.
Bodies are read from an in-memory buffer, which never hands out more bytes than it
holds, so a length prefix that claims gigabytes fails at once instead of allocating
them. A schema that refers to itself is read with fastavro's pure-Python reader, whose
depth Python's recursion limit bounds: the compiled reader would recurse as deep as a
crafted body asks and overflow the C stack, killing the process.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from uuid import UUID

import fastavro
import orjson

# The compiled reader recurses on the C stack; the pure-Python one raises RecursionError.
from fastavro._read_py import schemaless_reader as _python_reader
from fastavro.schema import to_parsing_canonical_form

__all__ = [
    "ENVELOPE_FIELDS",
    "MAGIC",
    "MAX_BODY_BYTES",
    "AvroError",
    "SchemaCache",
    "decode",
    "encode",
    "fingerprint",
    "frame",
    "is_framed",
    "parse_schema_text",
    "split_frame",
    "subject_for",
    "validate",
]

MAGIC = 0
MAX_BODY_BYTES = 1 << 20
"""The largest Avro body :func:`decode` reads: 1 MiB, about Kafka's default record limit."""

ENVELOPE_FIELDS = frozenset({"event_id", "tenant", "type", "ts", "source", "entity", "value"})
"""Fields that go to the top level of an envelope; every other one is an attribute."""

_HEADER = struct.Struct(">BI")
_MAX_SCHEMA_ID = 2**32 - 1
_FRAME_HELP = "the Confluent wire format needs a magic byte 0 and a 4-byte schema id"
_INT_RANGE = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
_FLOAT32_MAX = 3.4028234663852886e38
_NAMED = ("record", "enum", "fixed", "error")
_BINARY = ("bytes", "fixed")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class AvroError(ValueError):
    """An Avro record or schema cannot be used; the message says why and what to do."""


# --------------------------------------------------------------------------- wire format


def subject_for(source: str, type_: str) -> str:
    """The registry subject of the events of one source and type: ``"{source}.{type}"``.

    Raises:
        AvroError: when either name is empty.
    """
    if not source or not type_:
        raise AvroError(
            f"a subject needs a source and a type, got source {source!r} and type {type_!r}"
        )
    return f"{source}.{type_}"


def frame(schema_id: int, body: bytes) -> bytes:
    """The record in the Confluent wire format: magic byte, schema id, body.

    Raises:
        AvroError: when the id does not fit in an unsigned 32-bit integer.
    """
    if not 0 <= schema_id <= _MAX_SCHEMA_ID:
        raise AvroError(f"schema id {schema_id} is out of range: ids are 0 to {_MAX_SCHEMA_ID}")
    return _HEADER.pack(MAGIC, schema_id) + body


def split_frame(data: bytes) -> tuple[int, bytes]:
    """The schema id and the Avro body of a record in the Confluent wire format.

    Raises:
        AvroError: when the record is shorter than the header or its magic byte is wrong.
    """
    return _schema_id(data), bytes(data[_HEADER.size :])


def _schema_id(data: bytes) -> int:
    if len(data) < _HEADER.size:
        raise AvroError(f"record is {len(data)} bytes: {_FRAME_HELP} before the Avro body")
    magic, schema_id = _HEADER.unpack_from(data)
    if magic != MAGIC:
        hint = " (it looks like JSON: decode it as a JSON envelope)" if data[:1] == b"{" else ""
        raise AvroError(
            f"record starts with byte 0x{magic:02x}, not the magic byte 0x00{hint}: "
            f"{_FRAME_HELP}; produce it with a Confluent Avro serializer or core.avro.encode"
        )
    return int(schema_id)


def is_framed(data: bytes | None) -> bool:
    """Whether a record looks like Avro in the Confluent wire format (and not JSON)."""
    return data is not None and len(data) >= _HEADER.size and data[0:1] == b"\x00"


# ------------------------------------------------------------------------------- schemas


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A schema ready to decode with: what :class:`SchemaCache` keeps per id."""

    parsed: Any  # fastavro's parsed schema, logical types and all
    raw: Any  # the same schema without logical types but decimal: reads plain values
    recursive: bool  # refers to itself: read with the pure-Python reader
    plain: bool  # no bytes, fixed or decimal anywhere: decoded values are JSON as they are
    extra: tuple[str, ...]  # fields that become attributes
    nullable: tuple[str, ...]  # envelope fields that may be null, which means absent
    nested: bool  # has an ``attributes`` field


def _load_json(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise AvroError(f"schema is not JSON: {exc}") from None


def _parse(schema: Any) -> Any:
    try:
        return fastavro.parse_schema(schema)
    except Exception as exc:  # fastavro raises many types on malformed schemas
        raise AvroError(f"invalid Avro schema: {type(exc).__name__}: {exc}") from None


def parse_schema_text(text: str) -> Any:
    """Parse a schema's JSON text into fastavro's form, checking Rayline's rules.

    Raises:
        AvroError: with fastavro's message when the schema is not valid Avro, and with
            the rule when it is not a usable event schema (see the module docstring).
    """
    return _compile(text).parsed


def _compile(text: str) -> _Compiled:
    schema = _load_json(text)
    parsed = _parse(schema)
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        kind = parsed.get("type") if isinstance(parsed, dict) else parsed
        raise AvroError(
            f"an event schema must be a record, got {_describe_schema(kind)}: "
            'wrap the fields in {"type": "record", "name": ..., "fields": [...]}'
        )
    named = parsed.get("__named_schemas", {})
    _check_envelope_fields(parsed)
    facts = _Facts()
    _survey(parsed, named, "", frozenset(), facts)
    if facts.problems:
        raise AvroError("; ".join(facts.problems))
    raw = _parse(_without_logical_types(schema))
    names = [field["name"] for field in parsed["fields"]]
    return _Compiled(
        parsed,
        raw,
        recursive=facts.recursive,
        plain=not facts.binary,
        extra=tuple(n for n in names if n not in ENVELOPE_FIELDS and n != "attributes"),
        nullable=tuple(
            field["name"]
            for field in parsed["fields"]
            if field["name"] in ENVELOPE_FIELDS and _may_be_null(field["type"], named)
        ),
        nested="attributes" in names,
    )


def _check_envelope_fields(parsed: Mapping[str, Any]) -> None:
    """Rayline's rules for the fields the envelope mapping treats specially."""
    for field in parsed["fields"]:
        name, kind = field["name"], field["type"]
        if name == "ts" and not _is_epoch_ms(kind):
            raise AvroError(
                f"field 'ts' is {_describe_schema(kind)}: Rayline's event time is epoch "
                'milliseconds; declare it as "long" or '
                '{"type": "long", "logicalType": "timestamp-millis"}'
            )
        if name == "attributes" and not _is_object(kind, parsed.get("__named_schemas", {})):
            raise AvroError(
                f"field 'attributes' is {_describe_schema(kind)}: its entries become the "
                "event's attributes, so it must be a map or a record (or either or null)"
            )


def _is_epoch_ms(kind: Any) -> bool:
    if kind == "long":
        return True
    return (
        isinstance(kind, dict)
        and kind.get("type") == "long"
        and kind.get("logicalType") in (None, "timestamp-millis")
    )


def _is_object(kind: Any, named: Mapping[str, Any]) -> bool:
    branches = kind if isinstance(kind, list) else [kind]
    kinds = [_kind(_resolve(branch, named)) for branch in branches]
    return any(k in ("map", "record") for k in kinds) and all(
        k in ("null", "map", "record") for k in kinds
    )


def _kind(schema: Any) -> Any:
    """The type name of a resolved schema: ``"long"``, ``"record"``, ..."""
    return schema["type"] if isinstance(schema, dict) else schema


class _Facts:
    """What :func:`_survey` finds out about a schema."""

    def __init__(self) -> None:
        self.recursive = False
        self.binary = False
        self.problems: list[str] = []


def _survey(
    schema: Any, named: Mapping[str, Any], path: str, stack: frozenset[str], facts: _Facts
) -> None:
    """Walk a parsed schema once, noting recursion, binary types and unsafe arrays."""
    if isinstance(schema, list):
        for branch in schema:
            _survey(branch, named, path, stack, facts)
        return
    if isinstance(schema, str):
        # fastavro spells out a named type once and refers to it by name afterwards
        facts.recursive |= schema in stack
        facts.binary |= schema == "bytes"
        return
    kind = schema["type"]
    if not isinstance(kind, str):
        _survey(kind, named, path, stack, facts)
        return
    facts.binary |= kind in ("bytes", "fixed") or schema.get("logicalType") == "decimal"
    if kind in _NAMED:
        stack = stack | {schema["name"]}
    names = [field["name"] for field in schema.get("fields", ())]
    if len(set(names)) < len(names):  # fastavro lets them pass; the writer would mix them up
        facts.problems.append(f"record {schema['name']} has two fields of one name: {names}")
    for field in schema.get("fields", ()):
        _survey(field["type"], named, _join(path, field["name"]), stack, facts)
    if kind == "array":
        if _zero_width(schema["items"], named, frozenset()):
            facts.problems.append(_EMPTY_ITEMS.format(path, _describe_schema(schema["items"])))
        _survey(schema["items"], named, path + "[]", stack, facts)
    elif kind == "map":
        _survey(schema["values"], named, path + ".*", stack, facts)


_EMPTY_ITEMS = (
    "array '{}' has items that take no bytes ({}): a few bytes could declare billions "
    "of them; give the items a type with content"
)


def _zero_width(schema: Any, named: Mapping[str, Any], seen: frozenset[str]) -> bool:
    """Whether values of this type are encoded in zero bytes."""
    if isinstance(schema, list):
        return False  # a union always writes its branch index
    if isinstance(schema, str):
        if schema == "null":
            return True
        if schema in seen or schema not in named:
            return False
        return _zero_width(named[schema], named, seen | {schema})
    kind = schema["type"]
    if kind == "record":
        inner = seen | {schema["name"]}
        return all(_zero_width(f["type"], named, inner) for f in schema["fields"])
    if kind == "fixed":
        return bool(schema["size"] == 0)
    return bool(kind == "null")


def _without_logical_types(schema: Any) -> Any:
    """The schema with every logical type but decimal removed (same binary encoding).

    Reading with it yields the plain values underneath (epoch ms for timestamp-millis),
    which is what an envelope holds, and it spares building a datetime per record.
    """
    if isinstance(schema, list):
        return [_without_logical_types(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    return {
        key: _without_logical_types(value)
        if key in ("type", "items", "values", "fields")
        else value
        for key, value in schema.items()
        if key != "logicalType" or value == "decimal"
    }


def fingerprint(text: str) -> str:
    """The registry's identity of a schema: the same schema written differently matches.

    It is the SHA-256 (hex) of Avro's Parsing Canonical Form, which ignores whitespace,
    attribute order, namespaces spelt apart and documentation, followed by the
    attributes the canonical form drops but that change what the data means (logical
    types, decimal precision and scale, field defaults): a schema that differs only in
    those is a different schema, not a duplicate.

    Raises:
        AvroError: when the text is not a valid Avro schema.
    """
    schema = _load_json(text)
    parsed = _parse(schema)
    extras: list[Any] = []
    _meaningful_extras(parsed, "", extras)
    canonical = to_parsing_canonical_form(schema)
    digest = hashlib.sha256(canonical.encode())
    digest.update(b"\n" + orjson.dumps(extras, option=orjson.OPT_SORT_KEYS))
    return digest.hexdigest()


def _meaningful_extras(schema: Any, path: str, out: list[Any]) -> None:
    if isinstance(schema, list):
        for index, branch in enumerate(schema):
            _meaningful_extras(branch, f"{path}|{index}", out)
        return
    if not isinstance(schema, dict):
        return
    out.extend(
        [path, key, schema[key]] for key in ("logicalType", "precision", "scale") if key in schema
    )
    if isinstance(schema["type"], (dict, list)):
        _meaningful_extras(schema["type"], path, out)
    for field in schema.get("fields", ()):
        field_path = _join(path, field["name"])
        if "default" in field:
            out.append([field_path, "default", field["default"]])
        _meaningful_extras(field["type"], field_path, out)
    for key in ("items", "values"):
        if key in schema:
            _meaningful_extras(schema[key], f"{path}.{key}", out)


class SchemaCache:
    """Parsed schemas by id, filled through a lookup function.

    The registry lives in PostgreSQL; the worker passes a function that fetches one
    schema's JSON text by id. Errors of the lookup itself (the database is down)
    propagate unchanged: they are no fault of the record. The cache keeps the
    ``max_entries`` schemas used last. It is not thread-safe: use one per thread.
    """

    def __init__(self, lookup: Callable[[int], str | None], max_entries: int = 1000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._lookup = lookup
        self._max_entries = max_entries
        self._entries: OrderedDict[int, _Compiled] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, schema_id: int) -> Any:
        """The parsed schema (:func:`fastavro.parse_schema`) of ``schema_id``.

        Raises:
            AvroError: when the registry has no such schema or it is not usable.
        """
        return self.compiled(schema_id).parsed

    def compiled(self, schema_id: int) -> _Compiled:
        """The schema of ``schema_id`` ready for :func:`decode`."""
        entry = self._entries.get(schema_id)
        if entry is not None:
            self._entries.move_to_end(schema_id)
            return entry
        text = self._lookup(schema_id)
        if text is None:
            raise AvroError(
                f"unknown schema id {schema_id}: register it first (rayline schemas register ...)"
            )
        try:
            entry = _compile(text)
        except AvroError as exc:
            raise AvroError(f"schema {schema_id} cannot be used: {exc}") from None
        self._entries[schema_id] = entry
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return entry


# ------------------------------------------------------------------------------ decoding


def decode(data: bytes, cache: SchemaCache) -> tuple[dict[str, Any], int]:
    """The envelope in a record of the Confluent wire format, and its schema id.

    Raises:
        AvroError: when the frame is malformed, the schema unknown, the body larger
            than :data:`MAX_BODY_BYTES`, or the body not a record of its schema.
    """
    schema_id = _schema_id(data)
    size = len(data) - _HEADER.size
    if size > MAX_BODY_BYTES:
        raise AvroError(
            f"Avro body is {size} bytes, over the {MAX_BODY_BYTES >> 20} MiB limit: "
            "keep events small and put large payloads in object storage"
        )
    compiled = cache.compiled(schema_id)
    record = _read(data, compiled, schema_id)
    return _to_envelope(record, compiled), schema_id


def _read(data: bytes, compiled: _Compiled, schema_id: int) -> Any:
    # An in-memory buffer hands out at most the bytes it holds, so a length prefix that
    # claims gigabytes makes fastavro fail on the short read instead of allocating them.
    buffer = io.BytesIO(data)
    buffer.seek(_HEADER.size)
    reader = _python_reader if compiled.recursive else fastavro.schemaless_reader
    try:
        record = reader(buffer, compiled.raw, None)
    except Exception as exc:  # a crafted body makes fastavro raise nearly anything
        raise AvroError(
            f"Avro body does not match schema {schema_id}: {_reason(exc)}; check that the "
            f"producer wrote it with schema {schema_id} and that it was not cut short"
        ) from exc
    left = len(data) - buffer.tell()
    if left:
        raise AvroError(
            f"Avro body does not match schema {schema_id}: {left} byte(s) left after the "
            "record; the producer wrote it with another schema or appended data"
        )
    return record


def _reason(exc: Exception) -> str:
    if isinstance(exc, EOFError):
        return f"it ends before the record does ({exc or 'no more bytes'})"
    if isinstance(exc, IndexError):  # the compiled reader indexes past the end of its bytes
        return f"it ends early or names a union branch or enum symbol that is not there ({exc})"
    if isinstance(exc, RecursionError):
        return "it nests deeper than Python's recursion limit"
    return f"{type(exc).__name__}: {exc}"


def _to_envelope(record: dict[str, Any], compiled: _Compiled) -> dict[str, Any]:
    """The envelope mapping, done in place: fastavro's dicts are fresh and ours alone."""
    if not compiled.plain:
        if isinstance(record.get("value"), Decimal):
            record["value"] = float(record["value"])
        record = _jsonable(record)
    nested = record.pop("attributes", None) if compiled.nested else None
    attributes = {} if nested is None else nested
    for name in compiled.extra:
        attributes[name] = record.pop(name)  # a named field wins over a map entry
    for name in compiled.nullable:
        if record[name] is None:
            del record[name]
    record["attributes"] = attributes
    if "value" not in record:
        record["value"] = 0
    if "entity" not in record and "event_id" in record:
        record["entity"] = record["event_id"]
    return record


def _jsonable(value: Any) -> Any:
    """Decoded Avro values as JSON values: bytes as latin-1 text, Decimal as a string."""
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, Decimal):
        return format(value, "f")
    return value


# ------------------------------------------------------------------- validation, encoding


def encode(record: Mapping[str, Any], schema_id: int, parsed: Any) -> bytes:
    """``record`` written with ``parsed`` and framed with ``schema_id``.

    Args:
        record: an envelope or a flat Avro record, found field by field as
            :func:`validate` finds them.
        schema_id: the id the registry gave ``parsed``.
        parsed: the parsed schema (:meth:`SchemaCache.get`, :func:`parse_schema_text`).

    Raises:
        AvroError: listing every problem :func:`validate` finds. fastavro's own writer
            would write a bool as an int or truncate 1.5 to 1 without a word.
    """
    problems: list[str] = []
    flat = _flatten(record, parsed, problems)
    if problems:
        raise AvroError(f"record does not match schema {schema_id}: " + "; ".join(problems))
    buffer = io.BytesIO()
    try:
        fastavro.schemaless_writer(buffer, parsed, flat)
    except Exception as exc:  # what validate cannot see, such as a lone surrogate
        raise AvroError(f"record cannot be written with schema {schema_id}: {exc}") from exc
    return frame(schema_id, buffer.getvalue())


def validate(record: Mapping[str, Any], parsed: Any) -> list[str]:
    """Every problem of a JSON envelope against a record schema; empty when it fits.

    The envelope is the one stored on the topic (``ts`` in epoch milliseconds); keys
    that are not fields of the schema, such as ``received_at``, are not looked at.

    Each problem names the field's path, what the schema expects and what came, as in
    ``field 'attributes.amount' expected double, got string '12,5'``. A field that has
    no default and cannot be null is required.

    Raises:
        AvroError: when ``parsed`` is not a record schema.
    """
    problems: list[str] = []
    _flatten(record, parsed, problems)
    return problems


def _flatten(record: Any, parsed: Any, problems: list[str]) -> dict[str, Any]:
    """The Avro record for fastavro's writer, gathered by the envelope mapping."""
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        raise AvroError("validate and encode need a record schema, as parse_schema_text gives")
    if not isinstance(record, Mapping):
        problems.append(f"event expected object, got {_got(record)}")
        return {}
    named = parsed.get("__named_schemas", {})
    attributes = record.get("attributes", {})
    if not isinstance(attributes, Mapping):
        problems.append(f"field 'attributes' expected object, got {_got(attributes)}")
        attributes = {}
    names = {field["name"] for field in parsed["fields"]}
    flat: dict[str, Any] = {}
    for field in parsed["fields"]:
        found, value, path = _locate(record, attributes, field["name"], names)
        if found:
            flat[field["name"]] = _check(value, field["type"], path, named, problems)
        elif _required(field, named):
            problems.append(f"field '{path}' is required but missing")
    return flat


def _locate(
    record: Mapping[str, Any], attributes: Mapping[str, Any], name: str, names: set[str]
) -> tuple[bool, Any, str]:
    """(found, value, path) of one schema field in an envelope or a flat record."""
    if name in ENVELOPE_FIELDS:
        return name in record, record.get(name), name
    if name == "attributes":
        rest = {key: value for key, value in attributes.items() if key not in names}
        return True, rest, name
    if name in record:
        return True, record[name], name
    return name in attributes, attributes.get(name), f"attributes.{name}"


def _required(field: Mapping[str, Any], named: Mapping[str, Any]) -> bool:
    return "default" not in field and not _may_be_null(field["type"], named)


def _may_be_null(kind: Any, named: Mapping[str, Any]) -> bool:
    branches = kind if isinstance(kind, list) else [kind]
    return any(_is_null(branch, named) for branch in branches)


def _is_null(schema: Any, named: Mapping[str, Any]) -> bool:
    return _resolve(schema, named) in ("null", {"type": "null"})


def _resolve(schema: Any, named: Mapping[str, Any]) -> Any:
    while isinstance(schema, str) and schema in named:
        schema = named[schema]
    while isinstance(schema, dict) and not isinstance(schema["type"], str):
        schema = schema["type"]  # {"type": {"type": ...}} says no more than its inside
    return schema


_Checker = Callable[[Any, Any, str, Mapping[str, Any], list[str]], Any]


def _check(
    value: Any, schema: Any, path: str, named: Mapping[str, Any], problems: list[str]
) -> Any:
    """Append the problems of ``value`` against ``schema``; return it ready for writing."""
    schema = _resolve(schema, named)
    if isinstance(schema, list):
        return _check_union(value, schema, path, named, problems)
    if isinstance(schema, str):
        kind, logical = schema, None
    else:
        kind, logical = schema["type"], schema.get("logicalType")
    # fastavro ignores a logical type on the wrong base type, and so does this check
    checker = _LOGICAL_CHECKERS.get((logical, kind)) or _CHECKERS.get(kind)
    if checker is None:  # a named type fastavro resolved but we did not: trust the writer
        return value
    return checker(value, schema, path, named, problems)


def _problem(problems: list[str], path: str, expected: str, value: Any, why: str = "") -> None:
    problems.append(f"field '{path}' expected {expected}, got {_got(value)}{why}")


def _got(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        text = repr(value)
        return "string " + (text if len(text) <= 60 else text[:57] + "...")
    if isinstance(value, (bytes, bytearray)):
        return f"bytes of length {len(value)}"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _describe_schema(schema: Any) -> str:
    """How a problem message names a type: ``double``, ``enum Currency``, ..."""
    if isinstance(schema, list):
        return " or ".join(_describe_schema(branch) for branch in schema)
    if isinstance(schema, str):
        return schema
    kind = schema.get("type")
    if schema.get("logicalType") == "decimal":
        return f"decimal({schema.get('precision')}, {schema.get('scale', 0)})"
    if schema.get("logicalType"):
        return str(schema["logicalType"])
    if kind in _NAMED:
        return f"{kind} {schema.get('name')}"
    return _describe_schema(kind) if isinstance(kind, (dict, list)) else str(kind)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_null(value: Any, schema: Any, path: str, named: Any, problems: list[str]) -> Any:
    if value is not None:
        _problem(problems, path, "null", value)
    return value


def _check_boolean(value: Any, schema: Any, path: str, named: Any, problems: list[str]) -> Any:
    if not isinstance(value, bool):
        _problem(problems, path, "boolean", value)
    return value


def _check_integer(value: Any, schema: Any, path: str, named: Any, problems: list[str]) -> Any:
    kind = schema if isinstance(schema, str) else schema["type"]
    low, high = _INT_RANGE[kind]
    if not _is_integer(value):
        _problem(problems, path, kind, value)
    elif not low <= value <= high:
        _problem(problems, path, kind, value, f" (outside {low} to {high})")
    return value


def _check_float(value: Any, schema: Any, path: str, named: Any, problems: list[str]) -> Any:
    kind = schema if isinstance(schema, str) else schema["type"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _problem(problems, path, kind, value)
        return value
    try:
        number = float(value)
    except OverflowError:
        _problem(problems, path, kind, value, " (too large)")
        return value
    if kind == "float" and abs(number) > _FLOAT32_MAX and abs(number) != float("inf"):
        _problem(problems, path, kind, value, " (too large for 32 bits)")
    return value


def _check_string(value: Any, schema: Any, path: str, named: Any, problems: list[str]) -> Any:
    if not isinstance(value, str):
        _problem(problems, path, "string", value)
    return value


def _as_bytes(value: Any) -> bytes | None:
    """Bytes as given, or a string of code points 0 to 255 (decode's form); else None."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return value.encode("latin-1")
        except UnicodeEncodeError:
            return None
    return None


def _check_bytes(value: Any, schema: Any, path: str, named: Any, problems: list[str]) -> Any:
    data = _as_bytes(value)
    if data is None:
        _problem(problems, path, "bytes (or a string of code points 0 to 255)", value)
        return value
    return data


def _check_fixed(value: Any, schema: Any, path: str, named: Any, problems: list[str]) -> Any:
    data = _as_bytes(value)
    if data is None or len(data) != schema["size"]:
        _problem(problems, path, f"fixed {schema['name']} of {schema['size']} bytes", value)
        return value
    return data


def _check_enum(value: Any, schema: Any, path: str, named: Any, problems: list[str]) -> Any:
    symbols = schema["symbols"]
    if not isinstance(value, str) or value not in symbols:
        listed = ", ".join(repr(s) for s in symbols[:10]) + (", ..." if len(symbols) > 10 else "")
        _problem(problems, path, f"one of {listed} (enum {schema['name']})", value)
    return value


def _check_array(value: Any, schema: Any, path: str, named: Any, problems: list[str]) -> Any:
    if not isinstance(value, (list, tuple)):
        _problem(problems, path, "array", value)
        return value
    items = schema["items"]
    return [_check(item, items, f"{path}[{i}]", named, problems) for i, item in enumerate(value)]


def _check_map(value: Any, schema: Any, path: str, named: Any, problems: list[str]) -> Any:
    if not isinstance(value, Mapping):
        _problem(problems, path, "map (an object)", value)
        return value
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            _problem(problems, path, "map with string keys", key, " as a key")
            continue
        out[key] = _check(item, schema["values"], _join(path, key), named, problems)
    return out


def _check_record(value: Any, schema: Any, path: str, named: Any, problems: list[str]) -> Any:
    if not isinstance(value, Mapping):
        _problem(problems, path, f"record {schema['name']} (an object)", value)
        return value
    out = {}
    for field in schema["fields"]:
        field_path = _join(path, field["name"])
        if field["name"] in value:
            out[field["name"]] = _check(
                value[field["name"]], field["type"], field_path, named, problems
            )
        elif _required(field, named):
            problems.append(f"field '{field_path}' is required but missing")
    return out


def _check_union(
    value: Any, branches: list[Any], path: str, named: Mapping[str, Any], problems: list[str]
) -> Any:
    # a string tries "string" before "bytes" and "fixed", which take latin-1 strings too
    for branch in sorted(branches, key=lambda b: _kind(_resolve(b, named)) in _BINARY):
        found: list[str] = []
        converted = _check(value, branch, path, named, found)
        if not found:
            return converted
    others = [b for b in branches if not _is_null(b, named)]
    shaped = [b for b in others if _same_shape(value, _resolve(b, named))]
    target = others[0] if len(others) == 1 else shaped[0] if len(shaped) == 1 else None
    if value is not None and target is not None:
        return _check(value, target, path, named, problems)  # the one branch meant
    described = [_describe_schema(_resolve(b, named)) for b in branches]
    _problem(problems, path, " or ".join(described), value)
    return value


def _same_shape(value: Any, schema: Any) -> bool:
    kind = schema if isinstance(schema, str) else schema.get("type")
    if isinstance(value, Mapping):
        return kind in ("record", "map")
    if isinstance(value, (list, tuple)):
        return kind == "array"
    return False


def _check_timestamp(value: Any, schema: Any, path: str, named: Any, problems: list[str]) -> Any:
    logical = schema["logicalType"]
    if isinstance(value, datetime):
        return _epoch(value, logical, path, problems)
    low, high = _INT_RANGE["long"]
    if not _is_integer(value) or not low <= value <= high:
        _problem(problems, path, f"{logical} (epoch {_UNIT[logical]} or datetime)", value)
    return value


def _epoch(value: datetime, logical: str, path: str, problems: list[str]) -> Any:
    """A datetime as the long the schema stores; fastavro would read a naive one as local."""
    if logical.startswith("local-"):
        value = value.replace(tzinfo=UTC)  # a wall-clock time, wherever it was
    elif value.tzinfo is None:
        _problem(problems, path, f"{logical} (a datetime with a time zone)", value, " without one")
        return value
    unit = (
        timedelta(milliseconds=1) if _UNIT[logical] == "milliseconds" else timedelta(microseconds=1)
    )
    return (value - _EPOCH) // unit


_UNIT = {
    "timestamp-millis": "milliseconds",
    "timestamp-micros": "microseconds",
    "local-timestamp-millis": "milliseconds",
    "local-timestamp-micros": "microseconds",
}


def _check_date(value: Any, schema: Any, path: str, named: Any, problems: list[str]) -> Any:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    low, high = _INT_RANGE["int"]
    if not _is_integer(value) or not low <= value <= high:
        _problem(problems, path, "date (days since 1970-01-01 or date)", value)
    return value


def _check_time(value: Any, schema: Any, path: str, named: Any, problems: list[str]) -> Any:
    if isinstance(value, time):
        return value
    low, high = _INT_RANGE[schema["type"]]
    if not _is_integer(value) or not low <= value <= high:
        _problem(problems, path, f"{schema['logicalType']} (a time of day)", value)
    return value


def _check_uuid(value: Any, schema: Any, path: str, named: Any, problems: list[str]) -> Any:
    if isinstance(value, UUID):
        return value
    try:
        UUID(value)
    except (TypeError, ValueError, AttributeError):
        _problem(problems, path, "uuid (such as '123e4567-e89b-12d3-a456-426614174000')", value)
    return value


def _check_decimal(value: Any, schema: Any, path: str, named: Any, problems: list[str]) -> Any:
    expected = _describe_schema(schema)
    number = _as_decimal(value)
    if number is None or not number.is_finite():
        _problem(problems, path, expected, value)
        return value
    scale, precision = schema.get("scale", 0), schema["precision"]
    _sign, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)  # finite decimals have an int exponent
    if -exponent > scale:
        _problem(problems, path, expected, value, f" (more than {scale} digits after the point)")
    # the unscaled value has the coefficient's digits, shifted by exponent + scale
    elif digits != (0,) and len(digits) + exponent + scale > precision:
        _problem(problems, path, expected, value, f" (more than {precision} digits)")
    return number


def _as_decimal(value: Any) -> Decimal | None:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return Decimal(repr(value) if isinstance(value, float) else value)
    except InvalidOperation:
        return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


_CHECKERS: dict[str, _Checker] = {
    "null": _check_null,
    "boolean": _check_boolean,
    "int": _check_integer,
    "long": _check_integer,
    "float": _check_float,
    "double": _check_float,
    "string": _check_string,
    "bytes": _check_bytes,
    "fixed": _check_fixed,
    "enum": _check_enum,
    "array": _check_array,
    "map": _check_map,
    "record": _check_record,
    "error": _check_record,
}
_LOGICAL_CHECKERS: dict[tuple[Any, str], _Checker] = {
    **{(name, "long"): _check_timestamp for name in _UNIT},
    ("date", "int"): _check_date,
    ("time-millis", "int"): _check_time,
    ("time-micros", "long"): _check_time,
    ("uuid", "string"): _check_uuid,
    ("decimal", "bytes"): _check_decimal,
    ("decimal", "fixed"): _check_decimal,
}
