"""Column-wise validation gives exactly what the per-event rules give.

``validate_events`` checks a batch column by column and sends only the events that
fail there through the per-event rules. These tests hold the two to the same
envelopes and the same errors (field, message, reason), over a table of edge cases at
every bound and over whatever hypothesis makes of mostly good events.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.envelope import (
    MAX_ABS_VALUE,
    MAX_ATTRIBUTE_DEPTH,
    MAX_TS_MS,
    MIN_TS_MS,
    FieldError,
    _validate_one,
    clean_rows,
    validate_events,
)

NOW_MS = 1_790_000_000_000
GOOD: dict[str, Any] = {
    "event_id": "e1",
    "tenant": "acme",
    "type": "click",
    "ts": NOW_MS / 1000,
    "entity": "dev-1",
    "value": 3,
    "attributes": {"page": "/", "n": 1, "ok": True, "none": None},
}


def one_by_one(
    items: list[Any], max_future_ms: int | None
) -> tuple[list[dict[str, Any]], list[FieldError]]:
    """The per-event rules alone: what validate_events gave before the column pass."""
    envelopes: list[dict[str, Any]] = []
    errors: list[FieldError] = []
    for index, raw in enumerate(items):
        envelope = _validate_one(raw, index, "api", NOW_MS, errors, max_future_ms)
        if envelope is not None:
            envelopes.append(envelope)
    return envelopes, errors


def assert_same(items: list[Any], max_future_ms: int | None = 300_000) -> None:
    got = validate_events(
        items, default_source="api", received_at_ms=NOW_MS, max_future_ms=max_future_ms
    )
    expected = one_by_one(items, max_future_ms)
    assert got[0] == expected[0]
    assert [type(v) for e in got[0] for v in e.values()] == [
        type(v) for e in expected[0] for v in e.values()
    ]
    assert got[1] == expected[1]


class Named(dict[str, Any]):
    """A dict subclass: not a plain JSON object, checked one by one."""


EDGES: list[Any] = [
    {},
    {"source": "billing"},
    {"source": "bad source"},
    {"source": None},
    {"entity": ""},
    {"entity": "x" * 256},
    {"entity": "x" * 257},
    {"entity": 5},
    {"event_id": "x" * 128},
    {"event_id": "x" * 129},
    {"event_id": ""},
    {"event_id": 7},
    {"tenant": "a b"},
    {"tenant": "x" * 64},
    {"tenant": "x" * 65},
    {"type": ["t"]},
    {"value": MAX_ABS_VALUE},
    {"value": -MAX_ABS_VALUE},
    {"value": 10**18},
    {"value": 10**18 + 1},
    {"value": 10**400},
    {"value": float("nan")},
    {"value": float("inf")},
    {"value": True},
    {"value": "12,5"},
    {"value": 2.5},
    {"ts": MIN_TS_MS / 1000},
    {"ts": MIN_TS_MS / 1000 - 0.001},
    {"ts": MAX_TS_MS / 1000},
    {"ts": MAX_TS_MS // 1000 - 1},
    {"ts": 1_790_000_000},
    {"ts": NOW_MS / 1000 + 300},
    {"ts": NOW_MS / 1000 + 300.001},
    {"ts": 10**400},
    {"ts": 1e306},
    {"ts": float("nan")},
    {"ts": False},
    {"ts": "2026-11-29T05:50:00Z"},
    {"ts": "2026-11-29T05:50:00.123456+02:00"},
    {"ts": "2026-11-29T05:50:00"},
    {"ts": "yesterday"},
    {"ts": None},
    {"attributes": None},
    {"attributes": []},
    {"attributes": {}},
    {"attributes": {"a": {"b": [1, {"c": 2}]}}},
    {"attributes": {1: "x"}},
    {"attributes": {"a": float("nan")}},
    {"attributes": Named(a=1)},
    {"x": 1},
]


@pytest.mark.parametrize("change", EDGES, ids=repr)
@pytest.mark.parametrize("max_future_ms", [None, 300_000])
def test_each_edge_case_alone_and_among_good_events(
    change: dict[str, Any], max_future_ms: int | None
) -> None:
    event = {**GOOD, **change}
    assert_same([event], max_future_ms)
    assert_same([GOOD, event, {**GOOD, "event_id": "e2"}], max_future_ms)


def test_missing_required_fields_non_objects_and_subclasses() -> None:
    partial = {k: v for k, v in GOOD.items() if k != "ts"}
    assert_same([GOOD, partial, None, [GOOD], "e", Named(GOOD), {**GOOD, "ts": 1.8e9}])


def test_deep_attributes_are_walked_to_the_same_answer() -> None:
    deep: Any = 1
    for _ in range(MAX_ATTRIBUTE_DEPTH + 1):
        deep = {"a": deep}
    assert_same([{**GOOD, "attributes": deep}, {**GOOD, "attributes": deep["a"]}])


def test_a_mixed_batch_keeps_every_good_event_and_names_every_bad_one() -> None:
    items = [{**GOOD, "event_id": f"e{i}"} for i in range(10)]
    items[3]["value"] = "x"
    items[7]["ts"] = "soon"
    envelopes, errors = validate_events(items, default_source="api", received_at_ms=NOW_MS)
    assert [e["event_id"] for e in envelopes] == [f"e{i}" for i in range(10) if i not in (3, 7)]
    assert [(e.index, e.field) for e in errors] == [(3, "value"), (7, "ts")]
    assert "expected a finite number" in errors[0].message


def test_a_clean_batch_is_marked_clean_with_its_times() -> None:
    clean, times = clean_rows([GOOD, {**GOOD, "ts": "2026-11-29T05:50:00Z"}], NOW_MS)
    assert clean == [True, True]
    assert times == [NOW_MS, 1_795_931_400_000]


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
near_good = st.fixed_dictionaries(
    {},
    optional={
        "event_id": st.text(max_size=3) | scalars,
        "tenant": st.sampled_from(["acme", "a b", "", "x" * 65]) | scalars,
        "type": st.sampled_from(["click", "x:y", "no/slash"]) | scalars,
        "ts": st.floats(min_value=9e8, max_value=4.2e9) | st.integers(0, 5 * 10**9) | scalars,
        "source": st.sampled_from(["api", "b-2", "b c"]) | scalars,
        "entity": st.text(max_size=3) | scalars,
        "value": st.floats(min_value=-2e18, max_value=2e18) | scalars,
        "attributes": st.dictionaries(st.text(max_size=3), scalars, max_size=3) | scalars,
        "extra": scalars,
    },
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(near_good | scalars, max_size=8))
def test_any_batch_gives_the_per_event_answer(items: list[Any]) -> None:
    assert_same(items)
    assert_same(items, None)
