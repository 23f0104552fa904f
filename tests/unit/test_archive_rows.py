"""Records to archive rows and Parquet (no S3 here: the writer's I/O is integration-tested)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adapters.archive import KafkaRecord, parquet_bytes, to_row, to_table
from core.dead_letters import dead_letter_headers

T0 = 1_795_928_400_000  # 2026-11-29T05:00:00Z
HOUR = 3_600_000
GOOD = (
    b'{"event_id":"e1","source":"billing","tenant":"acme","type":"paid","ts":%d,'
    b'"entity":"e1","value":2,"attributes":{"k":1},"received_at":%d}'
)


def record(value: bytes | None, topic: str = "events.raw", **kw: object) -> KafkaRecord:
    base: dict[str, object] = {
        "topic": topic,
        "partition": 1,
        "offset": 7,
        "key": b"acme:e1",
        "value": value,
        "headers": [("schema", b"rayline.envelope/v1")],
        "timestamp_ms": T0 + 5 * HOUR,
    }
    base.update(kw)
    return KafkaRecord(**base)  # type: ignore[arg-type]


def test_an_envelope_becomes_columns_placed_by_event_time() -> None:
    value = GOOD % (T0 + 60_000, T0 + 61_000)
    row = to_row(record(value), "raw")
    assert row.directory.prefix("a") == "a/raw/source=billing/date=2026-11-29/hour=05/"
    c = row.columns
    assert (c["event_id"], c["source"], c["tenant"], c["type"]) == ("e1", "billing", "acme", "paid")
    assert (c["ts"], c["received_at"]) == (T0 + 60_000, T0 + 61_000)
    assert c["attributes"] == '{"k":1}'
    assert c["payload"] == value  # the record as it was: a replay loses nothing
    assert (c["topic"], c["partition"], c["offset"]) == ("events.raw", 1, 7)


@pytest.mark.parametrize(
    "value",
    [
        b"\xff\xfe not json",
        b"[1, 2]",
        None,
        b'{"source": "billing"}',  # no ts
        b'{"source": "", "ts": 1795928400000}',  # empty source
        b'{"source": "billing", "ts": "soon"}',
    ],
)
def test_unreadable_events_go_to_unknown_by_kafka_time_with_their_bytes(
    value: bytes | None,
) -> None:
    row = to_row(record(value), "raw")
    assert row.directory.source == "_unknown"
    assert row.directory.hour == 10  # the Kafka timestamp's hour
    assert row.columns["payload"] == value


def test_a_dead_letter_carries_reason_stage_origin_and_its_own_time() -> None:
    headers = dead_letter_headers("ingest", "field 'ts' missing", T0, source="a/b", index=3)
    row = to_row(record(b"{broken", topic="events.dlq", headers=headers), "dlq")
    assert row.directory.prefix("") == "dlq/source=a%2Fb/date=2026-11-29/hour=10/"
    c = row.columns
    assert (c["reason"], c["stage"]) == ("field 'ts' missing", "ingest")
    assert c["origin"] == '{"index":"3","source":"a/b"}'
    assert c["received_at"] == T0


def test_a_process_dead_letter_takes_its_source_from_the_envelope() -> None:
    headers = [("reason", b"late"), ("stage", b"process"), ("origin.offset", b"9")]
    value = GOOD % (T0, T0)
    row = to_row(record(value, topic="events.dlq", headers=headers), "dlq")
    assert row.directory.source == "billing"
    assert row.directory.hour == 10  # placed when dead-lettered, not by event time


def test_parquet_is_zstd_with_the_schema_and_row_groups() -> None:
    rows = [to_row(record(GOOD % (T0, T0), offset=i), "raw") for i in range(25)]
    rows.append(to_row(record(b"\x00", offset=25), "raw"))
    data = parquet_bytes(to_table(rows, "raw"), row_group_rows=10)
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata
    assert meta.num_rows == 26
    assert meta.num_row_groups == 3
    assert {meta.row_group(0).column(i).compression for i in range(meta.num_columns)} == {"ZSTD"}
    table = pq.read_table(pa.BufferReader(data))
    assert table.schema.field("ts").type == pa.timestamp("ms", tz="UTC")
    assert table["payload"][25].as_py() == b"\x00"
    assert table["ts"][25].as_py() is None
