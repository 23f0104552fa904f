"""Debezium change events → versioned rows, and the applier's batch and commit rules."""

from __future__ import annotations

import base64
import decimal
from datetime import UTC, date, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.cdc_applier import CdcApplier, topic_pattern
from adapters.exceptions import StoreUnavailable
from cluster.cli_cdc import connector_config, parse_table
from cluster.settings import load_settings
from core.cdc import CdcEventError, newest, parse_change
from core.exceptions import InvalidInputError

ROW_FIELDS = [
    {"type": "int64", "optional": False, "field": "id"},
    {"type": "string", "optional": False, "field": "name"},
    {"type": "string", "optional": True, "field": "email"},
    {
        "type": "bytes",
        "optional": True,
        "name": "org.apache.kafka.connect.data.Decimal",
        "parameters": {"scale": "2", "connect.decimal.precision": "10"},
        "field": "score",
    },
    {"type": "string", "optional": True, "name": "io.debezium.time.ZonedTimestamp", "field": "at"},
    {"type": "int64", "optional": True, "name": "io.debezium.time.MicroTimestamp", "field": "seen"},
    {"type": "int32", "optional": True, "name": "io.debezium.time.Date", "field": "born"},
    {"type": "boolean", "optional": True, "field": "active"},
    {"type": "string", "optional": True, "name": "io.debezium.data.Json", "field": "doc"},
]
KEY = {
    "schema": {"type": "struct", "fields": [{"type": "int64", "optional": False, "field": "id"}]},
    "payload": {"id": 1},
}


def event(op: str, before: Any, after: Any, lsn: int | None = 100) -> dict[str, Any]:
    row_schema = {"type": "struct", "optional": True, "fields": ROW_FIELDS}
    return {
        "schema": {
            "type": "struct",
            "fields": [{**row_schema, "field": "before"}, {**row_schema, "field": "after"}],
        },
        "payload": {
            "op": op,
            "before": before,
            "after": after,
            "ts_ms": 1_700_000_000_000,
            "source": {"schema": "public", "table": "customers", "lsn": lsn},
        },
    }


def row(**values: Any) -> dict[str, Any]:
    base = {"id": 1, "name": "Ada", "email": None, "score": None, "at": None}
    return {**base, "seen": None, "born": None, "active": None, "doc": None, **values}


def cents(value: int) -> str:
    return base64.b64encode(value.to_bytes(4, "big", signed=True)).decode()


def test_column_types_come_from_the_debezium_schema() -> None:
    change = parse_change(KEY, event("c", None, row()))
    assert change is not None
    assert [(c.name, c.type) for c in change.columns] == [
        ("id", "Int64"),
        ("name", "String"),
        ("email", "Nullable(String)"),
        ("score", "Nullable(Decimal(10, 2))"),
        ("at", "Nullable(DateTime64(6, 'UTC'))"),
        ("seen", "Nullable(DateTime64(6, 'UTC'))"),
        ("born", "Nullable(Date32)"),
        ("active", "Nullable(Bool)"),
        ("doc", "Nullable(String)"),
    ]
    assert change.key == ("id",)


@pytest.mark.parametrize(
    ("field", "wire", "expected"),
    [
        ("score", cents(-1250), decimal.Decimal("-12.50")),
        ("at", "2024-03-01T10:00:00.5+02:00", datetime(2024, 3, 1, 8, 0, 0, 500000, UTC)),
        ("seen", 1_700_000_000_123_456, datetime(2023, 11, 14, 22, 13, 20, 123456, UTC)),
        ("born", 19_000, date(2022, 1, 8)),
        ("active", True, True),
        ("doc", '{"a": 1}', '{"a": 1}'),
        ("email", None, None),
    ],
)
def test_values_are_converted_to_their_clickhouse_type(
    field: str, wire: Any, expected: Any
) -> None:
    change = parse_change(KEY, event("c", None, row(**{field: wire})))
    assert change is not None
    assert change.row[field] == expected


@pytest.mark.parametrize(
    ("op", "before", "after", "deleted", "name"),
    [
        ("r", None, row(name="snap"), 0, "snap"),
        ("c", None, row(name="new"), 0, "new"),
        ("u", row(name="old"), row(name="new"), 0, "new"),
        ("d", row(name="gone"), None, 1, "gone"),
    ],
)
def test_each_operation_gives_the_row_the_table_keeps(
    op: str, before: Any, after: Any, deleted: int, name: str
) -> None:
    change = parse_change(KEY, event(op, before, after, lsn=4242))
    assert change is not None
    assert change.row["name"] == name
    assert change.values()[-2:] == [4242, deleted]
    assert change.qualified == "public.customers"


def test_a_delete_with_only_the_key_fills_required_columns() -> None:
    change = parse_change(KEY, event("d", {"id": 1}, None))
    assert change is not None
    assert (change.row["id"], change.row["name"], change.row["email"]) == (1, "", None)


@pytest.mark.parametrize("value", [None])
def test_tombstones_are_skipped(value: Any) -> None:
    assert parse_change(KEY, value) is None


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        (None, event("c", None, row()), "no key"),
        (KEY, event("x", None, row()), "unknown operation"),
        (KEY, event("c", None, row(), lsn=None), "source.lsn"),
        (KEY, event("c", None, None), "without a 'after' row"),
        (KEY, {"payload": {}}, "with a schema"),
        (KEY, event("c", None, row(score="%%")), "column 'score'"),
    ],
)
def test_bad_events_say_what_is_wrong(key: Any, value: Any, problem: str) -> None:
    with pytest.raises(CdcEventError, match=problem):
        parse_change(key, value)


@given(st.lists(st.tuples(st.integers(1, 3), st.integers(0, 10**9)), min_size=1, max_size=30))
def test_the_highest_lsn_wins_whatever_the_arrival_order(changes: list[tuple[int, int]]) -> None:
    parsed = []
    for pk, lsn in changes:
        key = {**KEY, "payload": {"id": pk}}
        change = parse_change(key, event("u", None, row(id=pk, name=str(lsn)), lsn=lsn))
        assert change is not None
        parsed.append(change)
    kept = newest(parsed)
    for (pk,), change in kept.items():
        assert change.version == max(lsn for p, lsn in changes if p == pk)
    assert newest(list(reversed(parsed))).keys() == kept.keys()


# The applier, against fakes of the consumer, the sink and the positions --------------


class FakeMessage:
    def __init__(self, topic: str, offset: int, key: Any, value: Any) -> None:
        self._topic, self._offset = topic, offset
        self._key = None if key is None else orjson.dumps(key)
        self._value = value if isinstance(value, bytes | None) else orjson.dumps(value)

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def error(self) -> None:
        return None


class FakeConsumer:
    def __init__(self, messages: list[FakeMessage]) -> None:
        self.messages = messages
        self.position = 0
        self.committed: list[tuple[str, int, int]] = []

    def consume(self, num: int, timeout: float) -> list[FakeMessage]:
        batch = self.messages[self.position : self.position + num]
        self.position += len(batch)
        return batch

    def commit(self, offsets: list[Any], asynchronous: bool) -> None:
        self.committed += [(o.topic, o.partition, o.offset) for o in offsets]

    def seek(self, tp: Any) -> None:
        self.position = tp.offset


class FakeSink:
    def __init__(self) -> None:
        self.tables: dict[str, tuple[Any, Any]] = {}
        self.rows: list[list[Any]] = []
        self.fail = False

    def ensure_cdc_table(self, table: str, columns: Any, key: Any) -> None:
        self.tables[table] = (list(columns), list(key))

    def insert_cdc_rows(self, table: str, columns: Any, rows: Any) -> int:
        if self.fail:
            raise StoreUnavailable("ClickHouse is down")
        self.rows += [list(r) for r in rows]
        return len(rows)


class FakePositions:
    def __init__(self) -> None:
        self.published: dict[str, int] = {}

    def publish(self, positions: dict[str, int]) -> None:
        self.published.update(positions)


def messages() -> list[FakeMessage]:
    topic = "cdc.public.customers"
    return [
        FakeMessage(topic, 0, KEY, event("c", None, row(name="a"), lsn=10)),
        FakeMessage(topic, 1, KEY, event("u", row(name="a"), row(name="b"), lsn=20)),
        FakeMessage(topic, 2, KEY, event("d", row(name="b"), None, lsn=30)),
        FakeMessage(topic, 3, KEY, None),  # the tombstone after the delete
        FakeMessage(topic, 4, KEY, b"not json"),
    ]


def test_applier_writes_commits_and_publishes_the_last_lsn() -> None:
    consumer, sink, positions = FakeConsumer(messages()), FakeSink(), FakePositions()
    dead: list[Any] = []
    applier = CdcApplier(
        consumer,  # type: ignore[arg-type]
        sink,
        positions=positions,
        dead_letters=dead.extend,
        clock=lambda: 1.0,
    )
    assert applier.poll_once() == 3
    columns, key = sink.tables["cdc_public_customers"]
    assert (columns[0], key) == (("id", "Int64"), ["id"])
    assert [(r[1], r[-2], r[-1]) for r in sink.rows] == [("a", 10, 0), ("b", 20, 0), ("b", 30, 1)]
    assert consumer.committed == [("cdc.public.customers", 0, 5)]
    assert positions.published == {"public.customers": 30}
    assert len(dead) == 1
    headers = dict(dead[0][2])
    assert headers["stage"] == b"cdc"
    assert headers["origin.offset"] == b"4"


def test_a_failed_write_commits_nothing_and_reads_the_batch_again() -> None:
    consumer, sink = FakeConsumer(messages()), FakeSink()
    applier = CdcApplier(consumer, sink, dead_letters=lambda _d: None)  # type: ignore[arg-type]
    sink.fail = True
    with pytest.raises(StoreUnavailable):
        applier.poll_once()
    assert (consumer.committed, consumer.position, sink.rows) == ([], 0, [])
    sink.fail = False
    assert applier.poll_once() == 3
    assert consumer.committed == [("cdc.public.customers", 0, 5)]


def test_topic_pattern_leaves_heartbeats_out() -> None:
    import re

    pattern = re.compile(topic_pattern("cdc"))
    assert pattern.match("cdc.public.customers")
    assert not pattern.match("__debezium-heartbeat.cdc")
    assert not pattern.match("cdcx.public.customers")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("public.customers", ("public", "customers")), ("orders", ("public", "orders"))],
)
def test_table_names_parse(text: str, expected: tuple[str, str]) -> None:
    assert parse_table(text) == expected


@pytest.mark.parametrize("text", ["a.b.c", "public.", "x;drop", ""])
def test_bad_table_names_are_refused(text: str) -> None:
    with pytest.raises(InvalidInputError, match=r"SCHEMA\.TABLE"):
        parse_table(text)


def test_connector_config_lists_every_table_for_pgoutput() -> None:
    config = connector_config(load_settings(), [("public", "a_b"), ("sales", "orders")])
    assert config["table.include.list"] == "public\\.a_b,sales\\.orders"
    assert config["plugin.name"] == "pgoutput"
    assert config["publication.autocreate.mode"] == "filtered"
    assert config["snapshot.mode"] == "initial"
