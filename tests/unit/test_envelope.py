from __future__ import annotations

import math
from typing import Any

import pytest

from core.envelope import (
    check_stored,
    name_problem,
    parse_event_time,
    partition_key,
    validate_events,
)

GOOD: dict[str, Any] = {
    "event_id": "e-1",
    "tenant": "acme",
    "type": "page_view",
    "ts": "2026-11-29T05:50:00Z",
}


def _validate(items: Any) -> tuple[list[dict[str, Any]], list[tuple[int | None, str]]]:
    envelopes, errors = validate_events(items, default_source="api", received_at_ms=123)
    return envelopes, [(e.index, e.field) for e in errors]


def test_good_event_is_normalised() -> None:
    envelopes, errors = _validate([{**GOOD, "value": 2.5, "attributes": {"k": 1}}])
    assert errors == []
    assert envelopes == [
        {
            "event_id": "e-1",
            "source": "api",
            "tenant": "acme",
            "type": "page_view",
            "ts": 1_795_931_400_000,
            "entity": "e-1",
            "value": 2.5,
            "attributes": {"k": 1},
            "received_at": 123,
        }
    ]


@pytest.mark.parametrize(
    ("change", "field", "message_part"),
    [
        ({"event_id": None}, "event_id", "got None"),
        ({"event_id": 17}, "event_id", "got 17"),
        ({"event_id": ""}, "event_id", "1 to 128"),
        ({"event_id": "x" * 129}, "event_id", "1 to 128"),
        ({"tenant": "a b"}, "tenant", "letters, digits"),
        ({"tenant": "x" * 65}, "tenant", "letters, digits"),
        ({"tenant": 5}, "tenant", "got number"),
        ({"type": "drop table;"}, "type", "letters, digits"),
        ({"source": ["s"]}, "source", "got array"),
        ({"ts": "yesterday"}, "ts", "RFC 3339"),
        ({"ts": "2026-11-29T05:50:00"}, "ts", "offset"),
        ({"ts": True}, "ts", "got boolean"),
        ({"ts": 1_795_931_400_000}, "ts", "not milliseconds"),
        ({"ts": float("nan")}, "ts", "finite"),
        ({"value": "12,5"}, "value", "'12,5'"),
        ({"value": True}, "value", "finite number"),
        ({"value": float("inf")}, "value", "finite number"),
        ({"entity": ""}, "entity", "1 to 256"),
        ({"attributes": [1]}, "attributes", "got array"),
        ({"amount": 3}, "amount", "put custom data under 'attributes'"),
    ],
)
def test_each_bad_field_is_named(change: dict[str, Any], field: str, message_part: str) -> None:
    envelopes, errors = validate_events(
        [{**GOOD, **change}], default_source="api", received_at_ms=0
    )
    assert envelopes == []
    assert [(e.index, e.field) for e in errors] == [(0, field)]
    assert message_part in errors[0].message


@pytest.mark.parametrize("missing", ["event_id", "tenant", "type", "ts"])
def test_missing_required_field(missing: str) -> None:
    event = {k: v for k, v in GOOD.items() if k != missing}
    envelopes, errors = _validate([event])
    assert envelopes == []
    assert errors == [(0, missing)]


def test_every_error_of_every_event_is_reported() -> None:
    envelopes, errors = _validate([GOOD, {"event_id": 1}, "nope", {**GOOD, "ts": "x"}])
    assert len(envelopes) == 1  # only the first is fine
    assert errors == [(1, "tenant"), (1, "type"), (1, "ts"), (1, "event_id"), (2, ""), (3, "ts")]


@pytest.mark.parametrize("body", [{"a": 1}, "text", 3, None])
def test_body_that_is_not_an_array(body: Any) -> None:
    envelopes, errors = validate_events(body, default_source="api", received_at_ms=0)
    assert envelopes == []
    assert len(errors) == 1
    assert errors[0].index is None
    assert "JSON array" in str(errors[0])


def test_error_message_says_where_and_what() -> None:
    _, errors = validate_events([{**GOOD, "value": "12,5"}], default_source="api", received_at_ms=0)
    assert str(errors[0]) == "event 0: field 'value' expected a finite number, got '12,5'"


@pytest.mark.parametrize(
    ("raw", "expected_ms"),
    [
        ("2026-11-29T05:50:00Z", 1_795_931_400_000),
        ("2026-11-29T06:50:00+01:00", 1_795_931_400_000),
        ("2026-11-29T05:50:00.250Z", 1_795_931_400_250),
        (1_795_931_400, 1_795_931_400_000),
        (1_795_931_400.5, 1_795_931_400_500),
    ],
)
def test_event_time_forms(raw: Any, expected_ms: int) -> None:
    assert parse_event_time(raw) == expected_ms


def test_partition_key_groups_an_entity() -> None:
    a, _ = _validate([{**GOOD, "entity": "dev-1"}, {**GOOD, "event_id": "e-2", "entity": "dev-1"}])
    assert partition_key(a[0]) == partition_key(a[1]) == b"acme:dev-1"


def test_name_problem() -> None:
    assert name_problem("tenant", "acme") is None
    assert name_problem("tenant", "acme' OR 1=1") is not None
    assert name_problem("type", None) == "expected string, got null"


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"event_id": "e", "tenant": "a", "type": "t", "ts": 1, "value": 1}, None),
        ({"tenant": "a", "type": "t", "ts": 1, "value": 1}, "'event_id'"),
        ({"event_id": 7, "tenant": "a", "type": "t", "ts": 1, "value": 1}, "'event_id'"),
        ([], "expected a JSON object"),
        ({"event_id": "e", "tenant": 1, "type": "t", "ts": 1, "value": 1}, "'tenant'"),
        ({"event_id": "e", "tenant": "a", "type": "t", "ts": "1", "value": 1}, "'ts'"),
        ({"event_id": "e", "tenant": "a", "type": "t", "ts": 1, "value": math.nan}, "'value'"),
        ({"event_id": "e", "tenant": "a", "type": "t", "ts": 1}, "'value'"),
    ],
)
def test_check_stored(record: Any, problem: str | None) -> None:
    found = check_stored(record)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found


ARRIVED = 1_795_931_400_000  # 2026-11-29T05:50:00Z


@pytest.mark.parametrize(
    ("ts", "refused"),
    [
        ("2026-11-29T05:55:00Z", False),  # exactly the allowed 300 s ahead
        ("2026-11-29T05:55:00.001Z", True),
        ("2099-01-01T00:00:00Z", True),
        (ARRIVED / 1000 + 3600, True),  # epoch seconds, an hour ahead
        ("2026-11-22T05:50:00Z", False),  # a week behind is not this check's business
    ],
)
def test_an_event_stamped_too_far_ahead_of_its_arrival_is_refused(ts: Any, refused: bool) -> None:
    envelopes, errors = validate_events(
        [{**GOOD, "ts": ts}, GOOD],
        default_source="api",
        received_at_ms=ARRIVED,
        max_future_ms=300_000,
    )
    assert len(envelopes) == (1 if refused else 2)
    if refused:
        (error,) = errors
        assert (error.index, error.field, error.reason) == (0, "ts", "future")
        assert "max_future_skew_seconds" in error.message
        assert "ahead of the time it arrived (2026-11-29T05:50:00.000Z)" in error.message


def test_without_a_bound_a_future_event_is_accepted() -> None:
    envelopes, errors = validate_events(
        [{**GOOD, "ts": "2099-01-01T00:00:00Z"}], default_source="api", received_at_ms=ARRIVED
    )
    assert (len(envelopes), errors) == (1, [])
