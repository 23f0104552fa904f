"""Body formats: every format good and bad, typing by schema, and constant-memory streaming."""

from __future__ import annotations

import csv
import io
import re
import tracemalloc

import fastavro
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import avro, formats
from core.formats import (
    FORMATS,
    BodyMalformed,
    RecordError,
    UnsupportedFormat,
    decode_body,
    format_of,
    iter_records,
    single_object_fingerprint,
)

EVENT = {"event_id": "e-1", "tenant": "acme", "type": "checkout", "ts": 1795931400}
EVENT_SCHEMA = {
    "type": "record",
    "name": "Checkout",
    "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "tenant", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "amount", "type": ["null", "double"]},
        {"name": "blob", "type": "bytes"},
    ],
}
CSV_SCHEMA = {
    "type": "record",
    "name": "Row",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "count", "type": "int"},
        {"name": "price", "type": "double"},
        {"name": "ratio", "type": ["null", "float"]},
        {"name": "paid", "type": "boolean"},
        {"name": "note", "type": "string"},
        {"name": "maybe", "type": ["null", "string"]},
        {"name": "stamp", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    ],
}


def decoded(fmt, body, **kwargs):
    result = decode_body(fmt, body, **kwargs)
    return result.records, result.errors


# ------------------------------------------------------------------------------ format_of


@pytest.mark.parametrize(
    ("content_type", "filename", "expected"),
    [
        ("application/json", None, "json"),
        ("application/json; charset=utf-8", None, "json"),
        ("Application/JSON", None, "json"),
        ("application/vnd.github+json", None, "json"),
        ("application/x-ndjson", None, "ndjson"),
        ("application/jsonl", None, "ndjson"),
        ("application/ndjson", None, "ndjson"),
        ("text/csv; header=present", None, "csv"),
        ("application/vnd.apache.avro+binary", None, "avro"),
        ("avro/binary", None, "avro"),
        ("application/vnd.apache.avro+container", None, "avro-container"),
        ("avro/container", None, "avro-container"),
        ("application/vnd.apache.parquet", None, "parquet"),
        ("application/octet-stream", "events.parquet", "parquet"),
        (None, "events.NDJSON", "ndjson"),
        (None, "events.jsonl", "ndjson"),
        (None, "events.json", "json"),
        (None, "export.csv", "csv"),
        ("application/octet-stream", "dump.avro", "avro-container"),
        ("text/plain", "data.csv", "csv"),
    ],
)
def test_format_of(content_type, filename, expected):
    assert format_of(content_type, filename) == expected


@pytest.mark.parametrize(
    ("content_type", "filename"),
    [("application/xml", None), (None, None), ("text/plain", "notes.txt"), ("", "x.json.gz")],
)
def test_unsupported_format_lists_what_is_accepted(content_type, filename):
    with pytest.raises(UnsupportedFormat) as info:
        format_of(content_type, filename)
    assert "application/x-ndjson" in str(info.value)
    assert ".parquet" in str(info.value)


def test_unknown_format_name_in_decode():
    with pytest.raises(UnsupportedFormat, match="xml"):
        decode_body("xml", b"<a/>")


# ----------------------------------------------------------------------------------- JSON


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"[]", []),
        (orjson.dumps([EVENT, EVENT]), [(0, EVENT), (1, EVENT)]),
        (orjson.dumps(EVENT), [(0, EVENT)]),
        (b"\xef\xbb\xbf" + orjson.dumps([EVENT]), [(0, EVENT)]),
        (b'  [1, "x", null]\n', [(0, 1), (1, "x"), (2, None)]),
    ],
)
def test_json_good(body, expected):
    assert decoded("json", body) == (expected, [])


@pytest.mark.parametrize(
    "body",
    [
        orjson.dumps([EVENT])[:-5],
        b"\x00\x01garbage",
        b"",
        b'{"value": NaN}',
        b'{"value": Infinity}',
        b'[{"value": -Infinity}]',
        '[{"name": "Zoë"}]'.encode("utf-16"),
        '[{"name": "Zoë"}]'.encode("latin-1"),
        b'[{"a": 1}] [{"b": 2}]',
    ],
)
def test_json_bad_body_is_malformed_with_the_reason(body):
    with pytest.raises(BodyMalformed, match="not a JSON document"):
        decode_body("json", body)


@pytest.mark.parametrize("body", [b"42", b'"text"', b"null", b"true"])
def test_json_scalar_is_not_an_event_body(body):
    with pytest.raises(BodyMalformed, match="expected an array of events"):
        decode_body("json", body)


def test_json_document_over_the_limit_points_to_ndjson(monkeypatch):
    monkeypatch.setattr(formats, "MAX_DOCUMENT_BYTES", 100)
    with pytest.raises(BodyMalformed, match="NDJSON"):
        list(iter_records("json", io.BytesIO(orjson.dumps([EVENT] * 10))))


def test_max_records_says_the_limit_and_how_to_split():
    with pytest.raises(formats.TooManyRecords, match="more than 3 records, the limit is 3: split"):
        decode_body("json", orjson.dumps([EVENT] * 4), max_records=3)
    assert len(decode_body("json", orjson.dumps([EVENT] * 3), max_records=3).records) == 3


# --------------------------------------------------------------------------------- NDJSON


def test_ndjson_bad_line_is_a_record_error_and_others_decode():
    body = b'\xef\xbb\xbf{"a": 1}\r\n\n   \n{"a": 2,\n[3]\n{"v": NaN}'
    records, errors = decoded("ndjson", body)
    assert records == [(0, {"a": 1}), (2, [3])]
    assert [(e.index, e.raw) for e in errors] == [(1, b'{"a": 2,'), (3, b'{"v": NaN}')]
    assert errors[0].message.startswith("line 4 is not JSON: ")
    assert "one JSON value per line" in errors[0].message


def test_ndjson_invalid_utf8_line_is_a_record_error():
    records, errors = decoded("ndjson", b'{"a": "\xff"}\n{"a": "ok"}\n')
    assert records == [(1, {"a": "ok"})]
    assert errors[0].index == 0
    assert "UTF-8" in errors[0].message


def test_ndjson_overlong_line_is_skipped_and_raw_is_bounded():
    long_line = b'{"a": "' + b"x" * (formats.MAX_LINE_BYTES + 10) + b'"}\n'
    records, errors = decoded("ndjson", long_line + b'{"a": 2}\n')
    assert records == [(1, {"a": 2})]
    assert "longer than 1 MiB" in errors[0].message
    assert len(errors[0].raw) == formats.MAX_RAW_BYTES


def test_ndjson_bad_line_raw_is_bounded():
    _, errors = decoded("ndjson", b"{" + b"x" * 100_000 + b"\n")
    assert len(errors[0].raw) == formats.MAX_RAW_BYTES


def test_ndjson_streams_a_large_file_in_constant_memory(tmp_path):
    line = orjson.dumps(dict(EVENT, attributes={"pad": "p" * 900})) + b"\n"
    path = tmp_path / "events.ndjson"
    count = (50 << 20) // len(line)
    with path.open("wb") as file:
        for _ in range(count // 1000):
            file.write(line * 1000)
    seen = 0
    tracemalloc.start()
    try:
        with path.open("rb") as stream:
            for item in iter_records("ndjson", stream):
                assert not isinstance(item, RecordError)
                seen += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == count // 1000 * 1000
    assert path.stat().st_size > 45 << 20
    assert peak < 4 << 20, f"peak {peak >> 10} KiB while streaming 50 MB"


# ------------------------------------------------------------------------------------ CSV


def test_csv_rows_become_objects_of_strings():
    body = b'\xef\xbb\xbfid,note\r\n1,"a, b"\r\n2,"line one\nline two"\r\n3,"say ""hi"""\r\n'
    records, errors = decoded("csv", body)
    assert errors == []
    assert records == [
        (0, {"id": "1", "note": "a, b"}),
        (1, {"id": "2", "note": "line one\nline two"}),
        (2, {"id": "3", "note": 'say "hi"'}),
    ]


def test_csv_blank_lines_are_skipped_and_not_counted():
    records, _ = decoded("csv", b"a\n1\n\n2\n")
    assert records == [(0, {"a": "1"}), (1, {"a": "2"})]


def test_csv_wrong_cell_count_is_a_record_error_with_the_row_bytes():
    records, errors = decoded("csv", b"a,b\n1,2\n1,2,3\n4\n5,6\n")
    assert [index for index, _ in records] == [0, 3]
    assert [(e.index, e.raw) for e in errors] == [(1, b"1,2,3\n"), (2, b"4\n")]
    assert errors[0].message == "row 1 has 3 cells, expected 2 (one per header column)"


def test_csv_typing_by_schema():
    body = (
        b"id,count,price,ratio,paid,note,maybe,stamp,extra\n"
        b"17,-3,12.5,,TRUE,007,,1795931400000,12\n"
        b"+18, 4 ,1e3,0.5,0,,x,0,\n"
    )
    records, errors = decoded("csv", body, csv_schema=CSV_SCHEMA)
    assert errors == []
    assert records[0] == (
        0,
        {
            "id": 17,
            "count": -3,
            "price": 12.5,
            "ratio": None,
            "paid": True,
            "note": "007",
            "maybe": None,
            "stamp": 1795931400000,
            "extra": "12",
        },
    )
    assert records[1][1]["id"] == 18
    assert records[1][1]["count"] == 4
    assert records[1][1]["price"] == 1000.0
    assert records[1][1]["paid"] is False
    assert records[1][1]["note"] == ""
    assert records[1][1]["maybe"] == "x"


@pytest.mark.parametrize(
    ("column", "cell", "expected"),
    [
        ("id", "12.5", "int"),
        ("id", "", "int"),
        ("id", "1_000", "int"),
        ("count", "seven", "int"),
        ("price", "12,5", "float"),
        ("price", "nan", "float"),
        ("price", "inf", "float"),
        ("paid", "yes", "boolean"),
        ("paid", "", "boolean"),
    ],
)
def test_csv_cell_that_does_not_convert_names_row_column_type_and_value(column, cell, expected):
    header = ["id", "count", "price", "paid"]
    row = {"id": "1", "count": "2", "price": "3.0", "paid": "true", column: cell}
    text = io.StringIO()
    csv.writer(text).writerows([header, ["1", "1", "1", "true"], [row[h] for h in header]])
    records, errors = decoded("csv", text.getvalue().encode(), csv_schema=CSV_SCHEMA)
    assert len(records) == 1
    assert errors[0].index == 1
    assert errors[0].message == f"row 1, column '{column}': expected {expected}, got {cell!r}"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "no header row"),
        (b"\n\n", "no header row"),
        (b",,\n1,2,3\n", "no header row"),
        (b"a,,b\n1,2,3\n", "empty column name"),
        (b"a,b,a\n1,2,3\n", r"\['a'\] more than once"),
        (b"a,\xff\n1,2\n", "not UTF-8"),
    ],
)
def test_csv_bad_header_is_malformed(body, match):
    with pytest.raises(BodyMalformed, match=match):
        decode_body("csv", body)


def test_csv_row_that_is_not_utf8_is_a_record_error():
    records, errors = decoded("csv", b"a\n\xe9t\xe9\nok\n")
    assert records == [(1, {"a": "ok"})]
    assert errors[0].raw == b"\xe9t\xe9\n"
    assert "UTF-8" in errors[0].message


def test_csv_ten_megabyte_cell_on_one_line_is_rejected():
    body = b"a,b\n1," + b"x" * (10 << 20) + b"\n"
    with pytest.raises(BodyMalformed, match="longer than 1 MiB"):
        decode_body("csv", body)


def test_csv_ten_megabyte_quoted_cell_across_lines_is_rejected():
    body = b'a,b\n1,"' + (b"x" * 1000 + b"\n") * 10_000 + b'"\n'
    with pytest.raises(BodyMalformed, match="field larger than field limit"):
        decode_body("csv", body)


def test_csv_streams_a_large_file_in_constant_memory(tmp_path):
    path = tmp_path / "rows.csv"
    with path.open("wb") as file:
        file.write(b"id,note\n")
        for _ in range(200):
            file.write(b'1,"a note, with a comma"\n' * 1000)
    tracemalloc.start()
    try:
        with path.open("rb") as stream:
            seen = sum(1 for _ in iter_records("csv", stream, csv_schema=CSV_SCHEMA))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == 200_000
    assert peak < 1 << 20, f"peak {peak >> 10} KiB while streaming CSV"


def test_csv_header_only_gives_no_records():
    assert decoded("csv", b"a,b\n") == ([], [])


# ----------------------------------------------------------------------------------- Avro


def framed(record, schema=EVENT_SCHEMA, schema_id=7):
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), record)
    return avro.frame(schema_id, buffer.getvalue())


AVRO_RECORD = {
    "event_id": "e-1",
    "tenant": "acme",
    "ts": 1795931400000,
    "amount": 12.5,
    "blob": b"\x00\xff",
}


def lookup(schema_id):
    return orjson.dumps(EVENT_SCHEMA).decode() if schema_id == 7 else None


def test_avro_datum_decodes_to_json_values():
    records, errors = decoded("avro", framed(AVRO_RECORD), avro_schema_for_id=lookup)
    assert errors == []
    assert records == [
        (
            0,
            {
                "event_id": "e-1",
                "tenant": "acme",
                "ts": "2026-11-29T05:50:00+00:00",
                "amount": 12.5,
                "blob": "\x00\xff",
            },
        ),
    ]
    orjson.dumps(records[0][1])  # every value is JSON


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (framed(AVRO_RECORD, schema_id=8), "unknown schema id 8; register it at /registry"),
        (b"\x00\x00", "record is 2 bytes"),
        (b'{"event_id": "e-1"}', "looks like JSON"),
        (framed(AVRO_RECORD)[:-4], "does not match schema id 7"),
        (framed(AVRO_RECORD) + b"\x00", "1 byte\\(s\\) after the record"),
        (avro.frame(7, b"\x80" * 100), "does not match schema id 7"),
    ],
)
def test_avro_bad_datum_is_a_record_error(body, match):
    records, errors = decoded("avro", body, avro_schema_for_id=lookup)
    assert records == []
    assert errors[0].index == 0
    assert errors[0].raw == body
    assert re.search(match, errors[0].message), errors[0].message


def test_avro_without_a_lookup_reports_the_unknown_id():
    _, errors = decoded("avro", framed(AVRO_RECORD))
    assert "unknown schema id 7" in errors[0].message


def test_avro_unusable_schema_is_a_record_error():
    _, errors = decoded("avro", framed(AVRO_RECORD), avro_schema_for_id=lambda _id: '"string"')
    assert "schema id 7 cannot be used" in errors[0].message


def single_object(record, schema=EVENT_SCHEMA):
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), record)
    key = single_object_fingerprint(orjson.dumps(schema).decode())
    return b"\xc3\x01" + key + buffer.getvalue()


def test_avro_single_object_encoding_is_looked_up_by_fingerprint():
    known = {single_object_fingerprint(orjson.dumps(EVENT_SCHEMA).decode()): EVENT_SCHEMA}
    asked = []

    def by_fingerprint(key):
        asked.append(key)
        return orjson.dumps(known[key]).decode() if key in known else None

    body = single_object(AVRO_RECORD)
    records, errors = decoded("avro", body, avro_schema_for_fingerprint=by_fingerprint)
    assert errors == []
    assert records[0][1]["event_id"] == "e-1"
    assert asked == [body[2:10]]
    _, errors = decoded("avro", body[:2] + b"\x00" * 8 + body[10:])
    assert "unknown schema fingerprint 0000000000000000; register it at /registry" in (
        errors[0].message
    )


def test_single_object_fingerprint_ignores_formatting_and_docs():
    compact = orjson.dumps(EVENT_SCHEMA).decode()
    documented = orjson.dumps(dict(EVENT_SCHEMA, doc="checkout events"), option=orjson.OPT_INDENT_2)
    assert single_object_fingerprint(compact) == single_object_fingerprint(documented.decode())
    assert len(single_object_fingerprint(compact)) == 8
    assert single_object_fingerprint('"int"') != single_object_fingerprint('"long"')
    with pytest.raises(avro.AvroError):
        single_object_fingerprint("{not json")


def container(records, schema=EVENT_SCHEMA, **kwargs):
    buffer = io.BytesIO()
    fastavro.writer(buffer, fastavro.parse_schema(schema), records, **kwargs)
    return buffer.getvalue()


def test_avro_container_gives_each_record():
    rows = [dict(AVRO_RECORD, event_id=f"e-{i}") for i in range(5)]
    records, errors = decoded("avro-container", container(rows, codec="deflate"))
    assert errors == []
    assert [record["event_id"] for _, record in records] == [f"e-{i}" for i in range(5)]
    assert records[0][1]["ts"] == "2026-11-29T05:50:00+00:00"


@pytest.mark.parametrize("body", [b"", b"Obj", b"garbage!" * 10, b"Obj\x01\x99\x99\x99"])
def test_avro_container_bad_header_is_malformed(body):
    with pytest.raises(BodyMalformed, match="not an Avro object container file"):
        decode_body("avro-container", body)


def test_avro_container_damaged_after_good_blocks_keeps_the_good_records():
    rows = [dict(AVRO_RECORD, event_id=f"e-{i}", blob=b"x" * 100) for i in range(300)]
    data = container(rows, sync_interval=2000)
    records, errors = decoded("avro-container", data[:-50])
    assert 0 < len(records) < 300
    assert [index for index, _ in records] == list(range(len(records)))
    assert len(errors) == 1
    assert errors[0].index == len(records)
    assert f"records from {len(records)} on could not be read" in errors[0].message


def test_avro_container_with_a_recursive_schema_decodes():
    schema = {
        "type": "record",
        "name": "Node",
        "fields": [{"name": "v", "type": "long"}, {"name": "next", "type": ["null", "Node"]}],
    }
    records, _ = decoded(
        "avro-container", container([{"v": 1, "next": {"v": 2, "next": None}}], schema)
    )
    assert records == [(0, {"v": 1, "next": {"v": 2, "next": None}})]


# -------------------------------------------------------------------------------- Parquet


def parquet_bytes(rows):
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer, row_group_size=100)
    return buffer.getvalue()


def test_parquet_streams_rows_from_a_file(tmp_path):
    rows = [{"event_id": f"e-{i}", "value": i * 1.5, "tags": ["a", "b"]} for i in range(250)]
    path = tmp_path / "events.parquet"
    path.write_bytes(parquet_bytes(rows))
    with path.open("rb") as stream:
        items = list(iter_records("parquet", stream))
    assert items == list(enumerate(rows))


def test_parquet_body_decodes_and_garbage_is_malformed():
    assert decoded("parquet", parquet_bytes([EVENT])) == ([(0, EVENT)], [])
    with pytest.raises(BodyMalformed, match="not a Parquet file"):
        decode_body("parquet", b"PAR1 not really")


@pytest.mark.parametrize("fmt", ["json", "csv", "avro-container", "parquet"])
def test_empty_body_is_malformed_where_the_format_needs_content(fmt):
    with pytest.raises(BodyMalformed):
        decode_body(fmt, b"")


def test_empty_body_of_lines_or_one_datum():
    assert decoded("ndjson", b"") == ([], [])
    _, errors = decoded("avro", b"", avro_schema_for_id=lookup)
    assert "record is 0 bytes" in errors[0].message
    assert set(FORMATS) == {"json", "ndjson", "csv", "avro", "avro-container", "parquet"}
