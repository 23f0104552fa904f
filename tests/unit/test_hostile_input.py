"""Hostile input: every bad event is a named refusal, never an exception.

The envelope's bounds as a table, hypothesis over ``validate_events`` (whatever JSON
comes, the answer is envelopes that can be written or errors that name a field), and
the poison paths of the MQTT bridge, the CDC applier and a partition worker: a record
that can never be processed becomes one dead letter, and the rest go on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.cdc_applier import CdcApplier
from actors.mqtt_bridge import route
from adapters.mqtt import Inbound
from core.envelope import (
    MAX_ATTRIBUTE_DEPTH,
    MAX_EVENT_BYTES,
    FieldError,
    attributes_problem,
    check_stored,
    size_problem,
    validate_events,
)
from core.partition_state import PartitionState, RecordRef
from core.poison import PoisonHunt
from core.query_plan import time_param
from tests.unit.test_cdc import KEY, FakeConsumer, FakeMessage, FakeSink, event, row
from tests.unit.test_partition_state import CONFIG, T0, rec

NOW_MS = 1_790_000_000_000
GOOD = {"event_id": "e1", "tenant": "acme", "type": "click", "ts": NOW_MS / 1000}


def nested(depth: int, leaf: Any = 1) -> Any:
    """An object ``depth`` levels deep: {"a": {"a": ... leaf}}."""
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def deep_json(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def refusal(**change: Any) -> list[tuple[str, str]]:
    _envelopes, errors = validate_events(
        [{**GOOD, **change}], default_source="api", received_at_ms=NOW_MS
    )
    return [(e.field, e.message) for e in errors]


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"ts": 1e306}, "ts", "between 2000 and 2100"),  # was OverflowError: a 500
        ({"ts": -1e306}, "ts", "between 2000 and 2100"),
        ({"ts": 10**30}, "ts", "between 2000 and 2100"),
        ({"ts": 18_446_744_073_709_551_615}, "ts", "between 2000 and 2100"),
        ({"ts": math.inf}, "ts", "finite"),
        ({"ts": math.nan}, "ts", "finite"),
        ({"ts": "9999-12-31T23:59:59+00:00"}, "ts", "between 2000 and 2100"),
        ({"ts": "0001-01-01T00:00:00+14:00"}, "ts", "between 2000 and 2100"),
        ({"ts": "2026-13-01T00:00:00Z"}, "ts", "RFC 3339"),
        ({"ts": None}, "ts", "got null"),
        ({"value": 1e300}, "value", "within ±1e+18"),
        ({"value": -(10**19)}, "value", "within ±1e+18"),
        ({"value": 10**400}, "value", "within ±1e+18"),  # math.isfinite raises on it
        ({"value": math.inf}, "value", "finite"),
        ({"value": "12,5"}, "value", "finite number"),
        ({"value": True}, "value", "finite number"),
        ({"attributes": nested(MAX_ATTRIBUTE_DEPTH + 1)}, "attributes", "64 levels"),
        ({"attributes": nested(300)}, "attributes", "64 levels"),  # was JSONEncodeError
        ({"attributes": {"a": [[[[nested(70)]]]]}}, "attributes", "64 levels"),
        ({"attributes": {1: "x"}}, "attributes", "string keys"),
        ({"attributes": []}, "attributes", "expected object"),
        ({"tenant": "ac\x00me"}, "tenant", "letters, digits"),
        ({"type": "a" * 10_000}, "type", "letters, digits"),
        ({"event_id": "x" * 129}, "event_id", "1 to 128"),
        ({"entity": {"a": 1}}, "entity", "1 to 256"),
    ],
)
def test_each_bound_names_the_field_and_the_limit(change: Any, field: str, words: str) -> None:
    found = refusal(**change)
    assert [f for f, _m in found] == [field], found
    assert words in found[0][1]


@pytest.mark.parametrize(
    "change",
    [
        {"attributes": nested(MAX_ATTRIBUTE_DEPTH)},
        {"value": 1e18},
        {"value": -(10**18)},
        {"ts": "2099-12-31T23:59:59Z"},
        {"attributes": {"note": "NUL \x00 is data in ClickHouse"}},
    ],
)
def test_values_at_the_bounds_are_taken(change: Any) -> None:
    assert refusal(**change) == []
    envelopes, _ = validate_events([{**GOOD, **change}], default_source="api", received_at_ms=0)
    orjson.dumps(envelopes[0])  # what the edge writes to Kafka


def test_size_problem_names_the_limit() -> None:
    assert size_problem(MAX_EVENT_BYTES) is None
    problem = size_problem(MAX_EVENT_BYTES + 1)
    assert problem is not None
    assert f"{MAX_EVENT_BYTES:,} bytes" in problem


def test_attribute_depth_is_walked_without_recursion() -> None:
    # Deeper than Python's recursion limit: a recursive walk would raise RecursionError.
    assert attributes_problem(nested(5_000)) is not None


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)
fields = st.sampled_from(
    ["event_id", "tenant", "type", "ts", "source", "entity", "value", "attributes", "x"]
)
hostile_events = st.dictionaries(fields, json_values, max_size=9) | json_values


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile_events, max_size=5) | json_values)
def test_any_batch_gives_writable_envelopes_or_named_errors(items: Any) -> None:
    envelopes, errors = validate_events(
        items, default_source="api", received_at_ms=NOW_MS, max_future_ms=300_000
    )
    for envelope in envelopes:
        assert check_stored(orjson.loads(orjson.dumps(envelope))) is None
    for error in errors:
        assert error.message
        assert error.index is None or isinstance(items, list)
    if isinstance(items, list):
        assert len(envelopes) + len({e.index for e in errors}) == len(items)


@given(st.integers(min_value=1, max_value=1_200).map(deep_json) | st.binary(max_size=64))
def test_any_mqtt_payload_is_forwarded_or_dead_lettered(payload: bytes) -> None:
    message = Inbound("devices/pump-7/telemetry", payload, 1, 1, 1, NOW_MS)
    good, bad = route(message, {"pump-7": "acme"}, 256 * 1024)
    assert (good is None) != (bad is None)
    if bad is not None:
        assert bad[1] == payload
        assert dict(bad[2])["reason"]


def test_deep_mqtt_payload_is_dead_lettered_with_the_field() -> None:
    message = Inbound("devices/pump-7/telemetry", deep_json(300), 1, 1, 1, NOW_MS)
    good, bad = route(message, {"pump-7": "acme"}, 256 * 1024)
    assert good is None
    assert bad is not None
    reason = dict(bad[2])["reason"]
    assert isinstance(reason, bytes)
    assert b"field 'attributes' nest more than 64 levels" in reason


@pytest.mark.parametrize(
    ("poison", "reason"),
    [
        (b"not json", "not JSON"),
        (b'{"event_id":"x","tenant":"t","type":"c","ts":1e306,"value":1}', "'ts'"),
        (b'{"event_id":"x","tenant":"t","type":"c","ts":18446744073709551615,"value":1}', "'ts'"),
        (b'{"event_id":"x","tenant":"t","type":"c","ts":9000000000000000000,"value":1}', "'ts'"),
        (b'{"event_id":"x","tenant":"t","type":"c","ts":-1,"value":1}', "'ts'"),
        (b'{"event_id":"x","tenant":"t","type":"c","ts":1795931400000,"value":1e300}', "'value'"),
        (deep_json(1_100), "not JSON"),
        (b"", "not JSON"),
        (b'{"event_id":"x","tenant":"t","type":"c","ts":1795931400000,"source":5}', "'source'"),
        (b'{"event_id":"x","tenant":"t","type":"c","ts":1795931400000,"source":{}}', "'source'"),
        (b"null", "expected a JSON object"),
    ],
)
def test_a_poison_record_is_dead_lettered_once_and_the_partition_goes_on(
    poison: bytes, reason: str
) -> None:
    state = PartitionState(0, CONFIG)
    out = state.process([rec(0, T0 + 1000), RecordRef(1, None, poison), rec(2, T0 + 2000)])
    assert [(r.offset, reason in why) for r, why in out.rejected] == [(1, True)]
    assert out.processed == 2
    assert state.next_offset == 3


@pytest.mark.parametrize(
    ("bad_row", "column"),
    [
        (row(born="not a day"), "born"),  # int() refuses it: ValueError
        (row(born=10**12), "born"),  # past year 9999: OverflowError, was a crash
        (row(seen=10**18), "seen"),
        (row(score="@@not base64@@"), "score"),
    ],
)
def test_a_cdc_value_no_conversion_takes_is_dead_lettered_and_the_rest_applied(
    bad_row: dict[str, Any], column: str
) -> None:
    topic = "cdc.public.customers"
    consumer = FakeConsumer(
        [
            FakeMessage(topic, 0, KEY, event("c", None, row(name="a"), lsn=10)),
            FakeMessage(topic, 1, KEY, event("u", row(name="a"), bad_row, lsn=20)),
            FakeMessage(topic, 2, KEY, event("u", row(name="a"), row(name="c"), lsn=30)),
        ]
    )
    sink, dead = FakeSink(), []  # type: ignore[var-annotated]
    applier = CdcApplier(consumer, sink, dead_letters=dead.extend)  # type: ignore[arg-type]
    assert applier.poll_once() == 2
    assert [r[1] for r in sink.rows] == ["a", "c"]
    assert consumer.committed == [(topic, 0, 3)]
    assert len(dead) == 1
    headers = dict(dead[0][2])
    assert headers["origin.offset"] == b"1"
    assert f"column '{column}'".encode() in headers["reason"]
    assert applier.poll_once() == 0  # nothing comes again: no poison loop


def run_worker(offsets: list[int], poison: set[int], batch: int) -> tuple[list[int], list[int]]:
    """What a worker loop does with a PoisonHunt: consume from the committed offset,
    fold (a poison record raises), and start over from the commit after a failure."""
    hunt = PoisonHunt()
    committed, folded, dead = 0, [], []  # type: ignore[var-annotated]
    for _attempt in range(1_000):
        if committed >= len(offsets):
            return folded, dead
        refs = offsets[committed : committed + hunt.batch_size(batch)]
        known = [o for o in refs if hunt.reason(0, o) is not None]
        fold = [o for o in refs if o not in known]
        if any(o in poison for o in fold):
            hunt.failed([(0, o) for o in fold], ValueError("boom"))
            continue  # nothing committed: the same records come again
        folded += fold
        dead += known
        committed += len(refs)
        hunt.succeeded(batch)
    raise AssertionError("the worker looped")


@pytest.mark.parametrize("poison", [{0}, {7}, {99}, {3, 4}, {10, 50, 98}, set()])
def test_a_batch_that_fails_is_bisected_to_its_poison_records(poison: set[int]) -> None:
    offsets = list(range(100))
    folded, dead = run_worker(offsets, poison, batch=32)
    assert sorted(dead) == sorted(poison)  # each poison record dead-lettered once
    assert folded == [o for o in offsets if o not in poison]  # every other one folded once


def test_the_poison_reason_names_the_error_and_the_size_comes_back() -> None:
    hunt = PoisonHunt()
    hunt.failed([(0, 1), (0, 2)], ValueError("x"))
    assert hunt.batch_size(100) == 1
    hunt.failed([(0, 1)], OverflowError("too big"))
    assert hunt.reason(0, 1) == "the record cannot be processed: OverflowError: too big"
    for _ in range(8):
        hunt.succeeded(100)
    assert hunt.batch_size(100) == 100


@pytest.mark.parametrize("text", ["1e306", "-1e306", "inf", "nan", "9" * 400, "9999-12-31T00:00Z"])
def test_a_query_time_parameter_out_of_range_is_a_field_error(text: str) -> None:
    # "1e306" was an OverflowError in the query API: a 500.
    errors: list[FieldError] = []
    assert time_param({"from": text}, "from", 7, errors) == 7
    assert [e.field for e in errors] == ["from"]


def test_split_sets_known_poison_records_apart_with_their_reason() -> None:
    @dataclass(frozen=True)
    class Ref:
        offset: int

    hunt = PoisonHunt()
    hunt.failed([(1, 5)], ValueError("bad"))
    folded, poisoned = hunt.split({0: [Ref(5)], 1: [Ref(4), Ref(5), Ref(6)]})
    assert folded == {0: [Ref(5)], 1: [Ref(4), Ref(6)]}  # the partition is part of the key
    assert poisoned == {1: [(Ref(5), "the record cannot be processed: ValueError: bad")]}
