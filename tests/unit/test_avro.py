"""Avro in the Confluent wire format: framing, the schema cache, decode, validate, encode."""

from __future__ import annotations

import copy
import io
import json
import re
import tracemalloc
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import fastavro
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.avro import (
    MAX_BODY_BYTES,
    AvroError,
    SchemaCache,
    decode,
    encode,
    fingerprint,
    frame,
    is_framed,
    parse_schema_text,
    split_frame,
    subject_for,
    validate,
)
from core.envelope import check_stored

ITEM = {
    "type": "record",
    "name": "Item",
    "fields": [{"name": "sku", "type": "string"}, {"name": "qty", "type": "int"}],
}
EVENT_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Checkout",
    "namespace": "rayline.test",
    "doc": "A completed checkout.",
    "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "tenant", "type": "string"},
        {"name": "type", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "source", "type": ["null", "string"], "default": None},
        {"name": "entity", "type": "string"},
        {"name": "value", "type": "double"},
        {"name": "amount", "type": ["null", "double"], "default": None},
        {
            "name": "currency",
            "type": {"type": "enum", "name": "Currency", "symbols": ["EUR", "USD", "GBP"]},
        },
        {"name": "coupon", "type": ["null", "string"], "default": None},
        {"name": "items", "type": {"type": "array", "items": ITEM}, "default": []},
        {"name": "attributes", "type": {"type": "map", "values": "string"}, "default": {}},
    ],
}
SCHEMA_FIELDS = {field["name"] for field in EVENT_SCHEMA["fields"]}


def _decimal(precision: int, scale: int) -> dict[str, Any]:
    return {"type": "bytes", "logicalType": "decimal", "precision": precision, "scale": scale}


# Every Avro type with its own conversion: bytes, fixed, decimal, uuid, date, time, micros.
BINARY_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Payment",
    "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "tenant", "type": "string"},
        {"name": "type", "type": "string"},
        {"name": "ts", "type": "long"},
        {
            "name": "value",
            "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 3},
        },
        {
            "name": "price",
            "type": {"type": "bytes", "logicalType": "decimal", "precision": 6, "scale": 2},
        },
        {"name": "digest", "type": {"type": "fixed", "name": "Digest", "size": 4}},
        {"name": "blob", "type": ["null", "bytes"], "default": None},
        {"name": "payment_id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "at", "type": {"type": "int", "logicalType": "time-millis"}},
        {"name": "settled", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "ratio", "type": "float"},
        {"name": "kind", "type": ["null", "long", "string"], "default": None},
    ],
}
# A linked list: the schema refers to itself, so a body can nest as deep as it likes.
RECURSIVE_SCHEMA = {
    "type": "record",
    "name": "Node",
    "fields": [{"name": "next", "type": ["null", "Node"], "default": None}],
}
MINIMAL_SCHEMA = {
    "type": "record",
    "name": "Minimal",
    "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "tenant", "type": "string"},
        {"name": "type", "type": "string"},
        {"name": "ts", "type": "long"},
        {"name": "country", "type": "string"},
    ],
}
TS = 1_795_931_400_000  # 2026-11-29T05:50:00Z
ENVELOPE: dict[str, Any] = {
    "event_id": "e-1",
    "tenant": "acme",
    "type": "checkout",
    "ts": TS,
    "source": "web",
    "entity": "cart-9",
    "value": 12.5,
    "attributes": {
        "amount": 12.5,
        "currency": "EUR",
        "coupon": "SUMMER",
        "items": [{"sku": "A-1", "qty": 2}],
        "channel": "mobile",
    },
}
SCHEMAS = {1: EVENT_SCHEMA, 2: BINARY_SCHEMA, 3: RECURSIVE_SCHEMA, 4: MINIMAL_SCHEMA}
TEXTS = {schema_id: json.dumps(schema) for schema_id, schema in SCHEMAS.items()}


def _cache(texts: dict[int, str] | None = None, max_entries: int = 1000) -> SchemaCache:
    return SchemaCache((TEXTS if texts is None else texts).get, max_entries)


CACHE = _cache()  # module level: hypothesis tests may not use function-scoped fixtures
EVENT = CACHE.get(1)


DROP: Any = object()


def _with(top: dict[str, Any] | None = None, **attributes: Any) -> dict[str, Any]:
    """ENVELOPE with top-level fields and attributes replaced; DROP removes one."""
    event = copy.deepcopy(ENVELOPE)
    for target, changes in ((event, top or {}), (event["attributes"], attributes)):
        for key, value in changes.items():
            if value is DROP:
                target.pop(key, None)
            else:
                target[key] = value
    return event


def _zigzag(n: int) -> bytes:
    """An Avro long: zig-zag, then 7 bits a byte, low bits first."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _body(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), record)
    return buffer.getvalue()


# ------------------------------------------------------------------------- wire format


@pytest.mark.parametrize("schema_id", [0, 1, 42, 2**31, 2**32 - 1])
@pytest.mark.parametrize("body", [b"", b"\x02", b"\x04e1\x00" * 3])
def test_frame_is_the_confluent_wire_format(schema_id: int, body: bytes) -> None:
    framed = frame(schema_id, body)
    assert framed == b"\x00" + schema_id.to_bytes(4, "big") + body
    assert split_frame(framed) == (schema_id, body)
    assert is_framed(framed)


@pytest.mark.parametrize("schema_id", [-1, 2**32])
def test_frame_refuses_ids_that_do_not_fit(schema_id: int) -> None:
    with pytest.raises(AvroError, match=f"schema id {schema_id} is out of range"):
        frame(schema_id, b"")


@pytest.mark.parametrize("length", range(5))
def test_split_frame_refuses_records_shorter_than_the_header(length: int) -> None:
    expected = (
        f"record is {length} bytes: the Confluent wire format needs a magic byte 0 and a "
        "4-byte schema id before the Avro body"
    )
    with pytest.raises(AvroError) as info:
        split_frame(b"\x00" * length)
    assert str(info.value) == expected
    with pytest.raises(AvroError, match=f"record is {length} bytes"):
        decode(b"\x00" * length, CACHE)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01\x00\x00\x00\x01\x02", "starts with byte 0x01, not the magic byte 0x00: "),
        (b"\xff" * 8, "starts with byte 0xff"),
        (b'{"event_id": "e-1"}', "looks like JSON: decode it as a JSON envelope"),
    ],
)
def test_split_frame_refuses_a_wrong_magic_byte(data: bytes, message: str) -> None:
    with pytest.raises(AvroError, match=message):
        split_frame(data)
    with pytest.raises(AvroError, match=message):
        decode(data, CACHE)


@pytest.mark.parametrize(
    ("data", "framed"),
    [
        (None, False),
        (b"", False),
        (b"\x00\x00\x00\x01", False),
        (b"\x00\x00\x00\x00\x01", True),
        (b'{"a": 1}', False),
        (b"\x01\x00\x00\x00\x01", False),
    ],
)
def test_is_framed(data: bytes | None, framed: bool) -> None:
    assert is_framed(data) is framed


def test_subject_is_source_dot_type() -> None:
    assert subject_for("web", "checkout") == "web.checkout"
    assert subject_for("shop.eu", "order:placed") == "shop.eu.order:placed"


@pytest.mark.parametrize(("source", "type_"), [("", "checkout"), ("web", "")])
def test_subject_needs_both_names(source: str, type_: str) -> None:
    with pytest.raises(AvroError, match="needs a source and a type"):
        subject_for(source, type_)


# --------------------------------------------------------------------------- round trips


def test_envelope_round_trip() -> None:
    event, schema_id = decode(encode(ENVELOPE, 1, EVENT), CACHE)
    assert schema_id == 1
    assert event == ENVELOPE
    assert check_stored(event) is None


def test_optional_fields_decode_as_absent_and_defaults_apply() -> None:
    sparse = _with({"source": DROP}, amount=DROP, coupon=DROP, items=DROP, channel=DROP)
    event, _ = decode(encode(sparse, 1, EVENT), CACHE)
    assert event == {
        **_with({"source": DROP}),
        "attributes": {"amount": None, "currency": "EUR", "coupon": None, "items": []},
    }


def test_a_flat_avro_record_encodes_like_its_envelope() -> None:
    flat = {key: value for key, value in ENVELOPE.items() if key != "attributes"}
    flat |= {k: v for k, v in ENVELOPE["attributes"].items() if k != "channel"}
    flat["attributes"] = {"channel": "mobile"}
    assert encode(flat, 1, EVENT) == encode(ENVELOPE, 1, EVENT)


def test_timestamp_millis_takes_an_aware_datetime_and_decodes_to_epoch_ms() -> None:
    moment = datetime(2026, 11, 29, 6, 50, tzinfo=timezone(timedelta(hours=1)))
    event, _ = decode(encode(_with({"ts": moment}), 1, EVENT), CACHE)
    assert event["ts"] == TS


def test_envelope_defaults_for_a_schema_without_entity_and_value() -> None:
    flat = {"event_id": "e-7", "tenant": "acme", "type": "signup", "ts": TS, "country": "DE"}
    event, schema_id = decode(encode(flat, 4, CACHE.get(4)), CACHE)
    assert schema_id == 4
    assert event == {
        "event_id": "e-7",
        "tenant": "acme",
        "type": "signup",
        "ts": TS,
        "attributes": {"country": "DE"},
        "value": 0,
        "entity": "e-7",
    }
    assert check_stored(event) is None


def test_a_named_field_wins_over_an_attributes_entry_of_the_same_name() -> None:
    record = {**ENVELOPE, **ENVELOPE["attributes"], "attributes": {"currency": "XX", "k": "v"}}
    data = frame(1, _body(EVENT_SCHEMA, record))
    event, _ = decode(data, CACHE)
    assert event["attributes"]["currency"] == "EUR"
    assert event["attributes"]["k"] == "v"


PAYMENT: dict[str, Any] = {
    "event_id": "p-1",
    "tenant": "acme",
    "type": "payment",
    "ts": TS,
    "value": Decimal("1234.567"),
    "attributes": {
        "price": Decimal("-12.50"),
        "digest": b"\x00\xff\x10A",
        "blob": b"\x80abc",
        "payment_id": UUID("123e4567-e89b-12d3-a456-426614174000"),
        "day": date(2026, 11, 29),
        "at": 3_600_000,
        "settled": datetime(2026, 11, 29, 5, 50, 0, 123456, tzinfo=UTC),
        "ratio": 0.5,
        "kind": 7,
    },
}


def test_binary_and_logical_types_decode_to_json_values() -> None:
    data = encode(PAYMENT, 2, CACHE.get(2))
    event, _ = decode(data, CACHE)
    assert event == {
        "event_id": "p-1",
        "tenant": "acme",
        "type": "payment",
        "ts": TS,
        "value": 1234.567,
        "attributes": {
            "price": "-12.50",
            "digest": "\x00\xff\x10A",
            "blob": "\x80abc",
            "payment_id": "123e4567-e89b-12d3-a456-426614174000",
            "day": 20786,
            "at": 3_600_000,
            "settled": TS * 1000 + 123_456,
            "ratio": 0.5,
            "kind": 7,
        },
        "entity": "p-1",
    }
    orjson.dumps(event)  # an envelope serialises like a JSON one
    # and what decode gives back validates and encodes to the very same bytes
    assert validate(event, CACHE.get(2)) == []
    assert encode(event, 2, CACHE.get(2)) == data


_NAMES = st.text(max_size=12)
_ITEMS = st.lists(
    st.fixed_dictionaries({"sku": _NAMES, "qty": st.integers(-(2**31), 2**31 - 1)}), max_size=3
)
_EXTRA = st.dictionaries(
    st.text(min_size=1, max_size=8).filter(lambda key: key not in SCHEMA_FIELDS), _NAMES, max_size=3
)
_ENVELOPES = st.fixed_dictionaries(
    {
        "event_id": _NAMES,
        "tenant": _NAMES,
        "type": _NAMES,
        "ts": st.integers(-(2**63), 2**63 - 1),
        "entity": _NAMES,
        "value": st.floats(allow_nan=False),
        "attributes": st.tuples(
            st.fixed_dictionaries(
                {"currency": st.sampled_from(["EUR", "USD", "GBP"]), "items": _ITEMS},
                optional={
                    "amount": st.none() | st.floats(allow_nan=False),
                    "coupon": st.none() | _NAMES,
                },
            ),
            _EXTRA,
        ).map(lambda pair: {**pair[1], **pair[0]}),
    },
    optional={"source": st.none() | _NAMES},
)


@given(_ENVELOPES)
def test_any_valid_envelope_round_trips(envelope: dict[str, Any]) -> None:
    assert validate(envelope, EVENT) == []
    event, _ = decode(encode(envelope, 1, EVENT), CACHE)
    expected = {key: value for key, value in envelope.items() if value is not None}
    expected["attributes"] = {"amount": None, "coupon": None, **envelope["attributes"]}
    assert event == expected


# ------------------------------------------------------------------------- bad records


def test_a_truncated_body_is_an_error_at_every_length() -> None:
    data = encode(ENVELOPE, 1, EVENT)
    for end in range(5, len(data)):
        with pytest.raises(AvroError, match="Avro body does not match schema 1: it ends"):
            decode(data[:end], CACHE)


@pytest.mark.parametrize("garbage", [b"\x00", b"\x02abc", b"{}"])
def test_trailing_bytes_are_an_error(garbage: bytes) -> None:
    with pytest.raises(AvroError, match=f"{len(garbage)} byte\\(s\\) left after the record"):
        decode(encode(ENVELOPE, 1, EVENT) + garbage, CACHE)


def test_a_body_written_with_another_schema_is_an_error() -> None:
    data = encode(ENVELOPE, 1, EVENT)
    with pytest.raises(AvroError, match="Avro body does not match schema 4"):
        decode(frame(4, data[5:]), CACHE)
    with pytest.raises(AvroError, match="Avro body does not match schema 1"):
        decode(frame(1, encode(PAYMENT, 2, CACHE.get(2))[5:]), CACHE)


def test_an_unknown_schema_id_says_how_to_register_it() -> None:
    cache = _cache({})
    expected = "unknown schema id 42: register it first (rayline schemas register ...)"
    with pytest.raises(AvroError) as info:
        cache.get(42)
    assert str(info.value) == expected
    with pytest.raises(AvroError) as info:
        decode(frame(42, b"\x02"), cache)
    assert str(info.value) == expected


def test_an_unusable_registered_schema_names_its_id() -> None:
    cache = _cache({7: '{"type": "record", "name": "R", "fields": [{"name": "a"}]}'})
    with pytest.raises(AvroError, match=r"^schema 7 cannot be used: invalid Avro schema: .*'type'"):
        decode(frame(7, b""), cache)


def test_lookup_failures_propagate_unchanged() -> None:
    def down(_schema_id: int) -> str | None:
        raise ConnectionError("PostgreSQL is down")

    with pytest.raises(ConnectionError, match="PostgreSQL is down"):
        decode(frame(1, b""), SchemaCache(down))


# ---------------------------------------------------------------------------- the cache


def _counting(texts: dict[int, str]) -> tuple[Callable[[int], str | None], list[int]]:
    calls: list[int] = []

    def lookup(schema_id: int) -> str | None:
        calls.append(schema_id)
        return texts.get(schema_id)

    return lookup, calls


def test_cache_is_a_bounded_lru() -> None:
    lookup, calls = _counting(TEXTS)
    cache = SchemaCache(lookup, max_entries=2)
    for schema_id in (1, 2, 1, 3):  # 3 evicts 2, the least recently used
        cache.get(schema_id)
    assert calls == [1, 2, 3]
    assert len(cache) == 2
    assert cache.get(1) is cache.get(1)
    assert calls == [1, 2, 3]
    cache.get(2)
    assert calls == [1, 2, 3, 2]
    assert len(cache) == 2


def test_cache_remembers_no_failure() -> None:
    texts: dict[int, str] = {}
    lookup, calls = _counting(texts)
    cache = SchemaCache(lookup)
    with pytest.raises(AvroError, match="unknown schema id 1"):
        cache.get(1)
    texts[1] = TEXTS[1]  # registered in the meantime
    assert cache.get(1)["name"] == "rayline.test.Checkout"
    assert calls == [1, 1]


def test_cache_needs_room_for_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SchemaCache(TEXTS.get, max_entries=0)


# ------------------------------------------------------------------------------ schemas


def _reordered(schema: Any) -> Any:
    """The same schema with every object's attributes in reverse order."""
    if isinstance(schema, list):
        return [_reordered(item) for item in schema]
    if isinstance(schema, dict):
        return {key: _reordered(schema[key]) for key in reversed(list(schema))}
    return schema


def _changed(change: Callable[[dict[str, Any]], None]) -> str:
    schema = copy.deepcopy(EVENT_SCHEMA)
    change(schema)
    return json.dumps(schema)


def _full_names(schema: dict[str, Any]) -> None:
    del schema["namespace"]
    schema["name"] = "rayline.test.Checkout"


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(EVENT_SCHEMA, indent=4),
        json.dumps(EVENT_SCHEMA, sort_keys=True, separators=(",", ":")),
        json.dumps(_reordered(EVENT_SCHEMA)),
        _changed(lambda s: s.update(doc="Other words.")),
        _changed(_full_names),
    ],
)
def test_fingerprint_ignores_how_a_schema_is_written(text: str) -> None:
    assert fingerprint(text) == fingerprint(TEXTS[1])


@pytest.mark.parametrize(
    "text",
    [
        _changed(lambda s: s["fields"].append({"name": "extra", "type": "int", "default": 0})),
        _changed(lambda s: s["fields"][6].update(type="float")),
        _changed(lambda s: s["fields"][3].update(type="long")),  # logical type dropped
        _changed(lambda s: s["fields"][4].update(default="web")),
        _changed(lambda s: s["fields"][4].update(type=["string", "null"])),
        _changed(lambda s: s.update(name="Other")),
        TEXTS[2],
    ],
)
def test_fingerprint_tells_different_schemas_apart(text: str) -> None:
    assert fingerprint(text) != fingerprint(TEXTS[1])


def test_fingerprint_sees_decimal_scale() -> None:
    scale_3 = _changed(lambda s: s["fields"].append(copy.deepcopy(BINARY_SCHEMA["fields"][5])))
    schema = json.loads(scale_3)
    schema["fields"][-1]["type"]["scale"] = 3
    assert fingerprint(json.dumps(schema)) != fingerprint(scale_3)
    assert len(fingerprint(scale_3)) == 64


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "schema is not JSON"),
        (
            json.dumps({**MINIMAL_SCHEMA, "fields": [{"name": "a", "type": "strang"}]}),
            "invalid Avro schema: UnknownType: strang",
        ),
        ('{"type": "enum", "name": "E", "symbols": ["a", "a"]}', "must be unique"),
        ('"long"', "an event schema must be a record, got long"),
        ('{"type": "map", "values": "int"}', "an event schema must be a record, got map"),
        (
            json.dumps({**MINIMAL_SCHEMA, "fields": [{"name": "ts", "type": "string"}]}),
            "field 'ts' is string: Rayline's event time is epoch milliseconds",
        ),
        (
            json.dumps(
                {
                    **MINIMAL_SCHEMA,
                    "fields": [
                        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}}
                    ],
                }
            ),
            "field 'ts' is timestamp-micros",
        ),
        (
            json.dumps({**MINIMAL_SCHEMA, "fields": [{"name": "attributes", "type": "string"}]}),
            "field 'attributes' is string: its entries become the event's attributes",
        ),
        (
            json.dumps({**MINIMAL_SCHEMA, "fields": [{"name": "a", "type": "int"}] * 2}),
            "record Minimal has two fields of one name",
        ),
        (
            json.dumps(
                {
                    **MINIMAL_SCHEMA,
                    "fields": [{"name": "n", "type": {"type": "array", "items": "null"}}],
                }
            ),
            "array 'n' has items that take no bytes",
        ),
        (
            json.dumps(
                {
                    **MINIMAL_SCHEMA,
                    "fields": [
                        {
                            "name": "n",
                            "type": {
                                "type": "array",
                                "items": {"type": "record", "name": "Empty", "fields": []},
                            },
                        }
                    ],
                }
            ),
            "array 'n' has items that take no bytes",
        ),
    ],
)
def test_parse_schema_text_refuses_unusable_schemas(text: str, message: str) -> None:
    with pytest.raises(AvroError, match=re.escape(message)):
        parse_schema_text(text)
    with pytest.raises(AvroError, match=r"^schema 9 cannot be used: "):
        _cache({9: text}).get(9)


@pytest.mark.parametrize("text", [*TEXTS.values(), json.dumps(_reordered(EVENT_SCHEMA))])
def test_parse_schema_text_accepts_event_schemas(text: str) -> None:
    assert parse_schema_text(text)["type"] == "record"


def test_optional_attributes_record_is_allowed() -> None:
    schema = {
        **MINIMAL_SCHEMA,
        "fields": [
            *MINIMAL_SCHEMA["fields"],
            {"name": "attributes", "type": ["null", ITEM], "default": None},
        ],
    }
    cache = _cache({5: json.dumps(schema)})
    flat = {"event_id": "e", "tenant": "t", "type": "x", "ts": 1, "country": "DE"}
    event, _ = decode(
        encode({**flat, "attributes": {"sku": "A", "qty": 1}}, 5, cache.get(5)), cache
    )
    assert event["attributes"] == {"sku": "A", "qty": 1, "country": "DE"}
    event, _ = decode(frame(5, _body(schema, {**flat, "attributes": None})), cache)
    assert event["attributes"] == {"country": "DE"}


# ----------------------------------------------------------------------------- validate


@pytest.mark.parametrize(
    ("event", "problems"),
    [
        (ENVELOPE, []),
        (_with(amount=None, coupon=None), []),
        (_with({"source": DROP}, amount=DROP, coupon=DROP, items=DROP, channel=DROP), []),
        (_with({"source": None}, amount=3), []),
        (_with({"ts": datetime(2026, 11, 29, tzinfo=UTC), "value": 7}), []),
        (_with({"received_at": 1, "unknown": object()}), []),
        (_with(amount="12,5"), ["field 'attributes.amount' expected double, got string '12,5'"]),
        (
            _with({"ts": True}),
            [
                "field 'ts' expected timestamp-millis (epoch milliseconds or datetime), "
                "got boolean true"
            ],
        ),
        (
            _with({"ts": "2026-11-29T05:50:00Z"}),
            [
                "field 'ts' expected timestamp-millis (epoch milliseconds or datetime), "
                "got string '2026-11-29T05:50:00Z'"
            ],
        ),
        (
            _with({"ts": datetime(2026, 11, 29)}),
            [
                "field 'ts' expected timestamp-millis (a datetime with a time zone), "
                "got datetime without one"
            ],
        ),
        (
            _with({"ts": 2**63}),
            [
                "field 'ts' expected timestamp-millis (epoch milliseconds or datetime), "
                "got number 9223372036854775808"
            ],
        ),
        (_with({"entity": DROP}), ["field 'entity' is required but missing"]),
        (_with({"event_id": None}), ["field 'event_id' expected string, got null"]),
        (_with({"source": 5}), ["field 'source' expected string, got number 5"]),
        (_with({"value": "x"}), ["field 'value' expected double, got string 'x'"]),
        (_with({"value": False}), ["field 'value' expected double, got boolean false"]),
        (
            _with(currency="JPY"),
            [
                "field 'attributes.currency' expected one of 'EUR', 'USD', 'GBP' "
                "(enum rayline.test.Currency), got string 'JPY'"
            ],
        ),
        (_with(currency=DROP), ["field 'attributes.currency' is required but missing"]),
        (_with(coupon=5), ["field 'attributes.coupon' expected string, got number 5"]),
        (_with(items="x"), ["field 'attributes.items' expected array, got string 'x'"]),
        (
            _with(items=[{"sku": "A", "qty": 1}, {"sku": 1}, "x"]),
            [
                "field 'attributes.items[1].sku' expected string, got number 1",
                "field 'attributes.items[1].qty' is required but missing",
                "field 'attributes.items[2]' expected record rayline.test.Item (an object), "
                "got string 'x'",
            ],
        ),
        (
            _with(items=[{"sku": "A", "qty": True}]),
            ["field 'attributes.items[0].qty' expected int, got boolean true"],
        ),
        (
            _with(items=[{"sku": "A", "qty": 2**31}]),
            [
                "field 'attributes.items[0].qty' expected int, got number 2147483648 "
                "(outside -2147483648 to 2147483647)"
            ],
        ),
        (
            _with(items=[{"sku": "A", "qty": 1.5}]),
            ["field 'attributes.items[0].qty' expected int, got number 1.5"],
        ),
        (_with(channel=5), ["field 'attributes.channel' expected string, got number 5"]),
        (
            {**ENVELOPE, "attributes": ["x"]},
            [
                "field 'attributes' expected object, got array",
                "field 'attributes.currency' is required but missing",
            ],
        ),
        (["not", "an", "event"], ["event expected object, got array"]),
        (
            {},
            [
                f"field '{name}' is required but missing"
                for name in ("event_id", "tenant", "type", "ts", "entity", "value")
            ]
            + ["field 'attributes.currency' is required but missing"],
        ),
    ],
)
def test_validate_reports_every_problem(event: Any, problems: list[str]) -> None:
    assert validate(event, EVENT) == problems


def test_validate_a_number_too_large_for_a_double() -> None:
    (problem,) = validate(_with({"value": 10**400}), EVENT)
    assert problem.startswith("field 'value' expected double, got number 1000")
    assert problem.endswith("(too large)")


PAYMENT_JSON: dict[str, Any] = {
    "event_id": "p-1",
    "tenant": "acme",
    "type": "payment",
    "ts": TS,
    "value": 12,
    "attributes": {
        "price": "12.5",
        "digest": "abcd",
        "payment_id": "123e4567-e89b-12d3-a456-426614174000",
        "day": 20786,
        "at": 0,
        "settled": 0,
        "ratio": 1,
    },
}


PRICE = "field 'attributes.price'"


def _payment(**attributes: Any) -> dict[str, Any]:
    event = copy.deepcopy(PAYMENT_JSON)
    event["attributes"].update(attributes)
    return event


@pytest.mark.parametrize(
    ("event", "problems"),
    [
        (PAYMENT_JSON, []),
        (_payment(blob="\x00\xff", kind="k"), []),
        (_payment(price=Decimal("9999.99"), day=date(2026, 1, 1)), []),
        (
            _payment(price="12.345"),
            [
                "field 'attributes.price' expected decimal(6, 2), got string '12.345' "
                "(more than 2 digits after the point)"
            ],
        ),
        (
            _payment(price=10000),
            [f"{PRICE} expected decimal(6, 2), got number 10000 (more than 6 digits)"],
        ),
        (
            _payment(price="abc"),
            ["field 'attributes.price' expected decimal(6, 2), got string 'abc'"],
        ),
        (
            _payment(price="NaN"),
            ["field 'attributes.price' expected decimal(6, 2), got string 'NaN'"],
        ),
        (
            _payment(digest="abc"),
            ["field 'attributes.digest' expected fixed Digest of 4 bytes, got string 'abc'"],
        ),
        (
            _payment(blob="€"),
            [
                "field 'attributes.blob' expected bytes (or a string of code points 0 to 255), "
                "got string '€'"
            ],
        ),
        (
            _payment(payment_id="nope"),
            [
                "field 'attributes.payment_id' expected uuid "
                "(such as '123e4567-e89b-12d3-a456-426614174000'), got string 'nope'"
            ],
        ),
        (
            _payment(day="2026-11-29"),
            [
                "field 'attributes.day' expected date (days since 1970-01-01 or date), "
                "got string '2026-11-29'"
            ],
        ),
        (
            _payment(ratio=1e39),
            ["field 'attributes.ratio' expected float, got number 1e+39 (too large for 32 bits)"],
        ),
        (
            _payment(kind=1.5),
            ["field 'attributes.kind' expected null or long or string, got number 1.5"],
        ),
    ],
)
def test_validate_binary_and_logical_types(event: dict[str, Any], problems: list[str]) -> None:
    assert validate(event, CACHE.get(2)) == problems


def test_validate_allows_attributes_the_schema_does_not_name() -> None:
    event = {"event_id": "e", "tenant": "t", "type": "x", "ts": 1, "attributes": {"country": "DE"}}
    extra = {**event, "attributes": {"country": "DE", "anything": [1, {"x": None}]}}
    assert validate(extra, CACHE.get(4)) == []
    assert encode(extra, 4, CACHE.get(4)) == encode(event, 4, CACHE.get(4))


def test_validate_needs_a_record_schema() -> None:
    with pytest.raises(AvroError, match="need a record schema"):
        validate(ENVELOPE, fastavro.parse_schema("long"))


def test_encode_refuses_what_validate_refuses() -> None:
    bad = _with(amount="12,5", items=[{"sku": "A", "qty": True}])
    with pytest.raises(AvroError) as info:
        encode(bad, 1, EVENT)
    assert str(info.value) == (
        "record does not match schema 1: "
        "field 'attributes.amount' expected double, got string '12,5'; "
        "field 'attributes.items[0].qty' expected int, got boolean true"
    )


def test_encode_reports_what_only_the_writer_sees() -> None:
    with pytest.raises(AvroError, match="record cannot be written with schema 1"):
        encode(_with({"event_id": "\ud800"}), 1, EVENT)


# ------------------------------------------------------------------------ hostile input


@pytest.mark.parametrize(
    ("schema", "body"),
    [
        ({"type": "string"}, _zigzag(2**31) + b"abc"),
        ({"type": "string"}, _zigzag(2**62) + b"x"),
        ({"type": "bytes"}, _zigzag(2**40)),
        ({"type": "bytes"}, _zigzag(-5) + b"abc"),
        ({"type": "array", "items": "long"}, _zigzag(2**40) + b"\x02" * 100),
        ({"type": "map", "values": "string"}, _zigzag(2**40) + b"\x02a\x02b" * 100),
        ({"type": "array", "items": "long"}, _zigzag(-(2**40)) + _zigzag(2**40) + b"\x02"),
    ],
)
def test_a_huge_declared_length_fails_without_allocating_it(
    schema: dict[str, Any], body: bytes
) -> None:
    text = json.dumps({**MINIMAL_SCHEMA, "fields": [{"name": "f", "type": schema}]})
    cache = _cache({8: text})
    cache.get(8)
    tracemalloc.start()
    try:
        with pytest.raises(AvroError, match="Avro body does not match schema 8"):
            decode(frame(8, body), cache)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_body_over_the_limit_is_refused_unread() -> None:
    lookup, calls = _counting(TEXTS)
    with pytest.raises(AvroError, match=r"Avro body is 1048577 bytes, over the 1 MiB limit"):
        decode(frame(1, b"\x00" * (MAX_BODY_BYTES + 1)), SchemaCache(lookup))
    assert calls == []


def test_deep_nesting_in_a_recursive_schema_is_an_error_not_a_crash() -> None:
    # fastavro's compiled reader would recurse once per level on the C stack and crash
    # the process; a megabyte of union indexes would ask for half a million levels.
    with pytest.raises(AvroError, match="nests deeper than Python's recursion limit"):
        decode(frame(3, b"\x02" * (MAX_BODY_BYTES - 1) + b"\x00"), CACHE)
    event, _ = decode(frame(3, b"\x02\x02\x00"), CACHE)
    assert event["attributes"] == {"next": {"next": {"next": None}}}


_ANY_RECORD = st.one_of(
    st.binary(max_size=64),
    st.builds(frame, st.sampled_from(sorted(SCHEMAS)), st.binary(max_size=300)),
    st.builds(
        lambda data, cut, tail: data[:cut] + tail,
        st.sampled_from([encode(ENVELOPE, 1, EVENT), encode(PAYMENT, 2, CACHE.get(2))]),
        st.integers(0, 200),
        st.binary(max_size=20),
    ),
)


@settings(max_examples=500)
@given(_ANY_RECORD)
def test_random_bytes_raise_nothing_but_avro_error(data: bytes) -> None:
    try:
        event, _ = decode(data, CACHE)
    except AvroError:
        return
    orjson.dumps(event)  # whatever decodes is a JSON-ready envelope


@given(st.binary(max_size=16))
def test_split_frame_raises_nothing_but_avro_error(data: bytes) -> None:
    try:
        schema_id, body = split_frame(data)
    except AvroError:
        assert not is_framed(data)
    else:
        assert is_framed(data)
        assert frame(schema_id, body) == data
