"""The sessions job's pure part: cutting event rows into sessions (the Ray Data twin of
the PySpark job; tests/integration/test_sessions.py holds the two equal on a stack)."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from data_jobs.replay import EVENT_SCHEMA
from data_jobs.sessions import SESSION_SCHEMA, in_order, sessionise

MIN = 60_000


def rows(*events: tuple[str, str, int, float], event_ids: list[str] | None = None) -> pa.Table:
    """Event rows of (tenant, entity, ts, value), one source and type."""
    ids = event_ids or [f"e{i}" for i in range(len(events))]
    return pa.table(
        {
            "tenant": [e[0] for e in events],
            "type": ["view"] * len(events),
            "minute": [e[2] - e[2] % MIN for e in events],
            "ts": [e[2] for e in events],
            "source": ["web"] * len(events),
            "event_id": ids,
            "entity": [e[1] for e in events],
            "value": [e[3] for e in events],
        },
        schema=EVENT_SCHEMA,
    )


def as_tuples(table: pa.Table) -> list[tuple[object, ...]]:
    return [tuple(row.values()) for row in in_order(table).to_pylist()]


def test_a_quiet_gap_longer_than_the_limit_starts_a_new_session() -> None:
    found = sessionise(
        rows(
            ("acme", "u1", 0, 1.0),
            ("acme", "u1", 5 * MIN, 2.0),
            ("acme", "u1", 10 * MIN, 3.0),  # exactly the gap: the same session
            ("acme", "u1", 20 * MIN + 1, 4.0),  # a millisecond more: a new one
        ),
        10 * MIN,
    )
    assert as_tuples(found) == [
        ("acme", "u1", 0, 10 * MIN, 3, 6.0),
        ("acme", "u1", 20 * MIN + 1, 20 * MIN + 1, 1, 4.0),
    ]


def test_entities_and_tenants_have_sessions_of_their_own_and_no_entity_has_none() -> None:
    found = sessionise(
        rows(
            ("acme", "u1", 0, 1.0),
            ("acme", "u2", MIN, 1.0),
            ("beta", "u1", 2 * MIN, 1.0),  # the same entity name in another tenant
            ("acme", "", 3 * MIN, 9.0),  # no entity: in no session
            ("acme", "u1", 4 * MIN, 1.0),
        ),
        30 * MIN,
    )
    assert as_tuples(found) == [
        ("acme", "u1", 0, 4 * MIN, 2, 2.0),
        ("acme", "u2", MIN, MIN, 1, 1.0),
        ("beta", "u1", 2 * MIN, 2 * MIN, 1, 1.0),
    ]


def test_copies_of_one_event_count_once_with_their_smallest_value() -> None:
    found = sessionise(
        rows(
            ("acme", "u1", 0, 5.0),
            ("acme", "u1", 0, 3.0),  # a copy (same key) with another value
            ("acme", "u1", MIN, 1.0),
            ("acme", "u1", MIN, 1.0),  # same time, other event id: another event
            event_ids=["a", "a", "b", "c"],
        ),
        30 * MIN,
    )
    assert as_tuples(found) == [("acme", "u1", 0, MIN, 3, 5.0)]


def test_no_rows_give_no_sessions_in_the_schema() -> None:
    assert sessionise(EVENT_SCHEMA.empty_table(), MIN).schema == SESSION_SCHEMA
    only_anonymous = rows(("acme", "", 0, 1.0))
    assert sessionise(only_anonymous, MIN).num_rows == 0


@pytest.mark.parametrize("seed", range(5))
def test_sessions_match_a_direct_reading_of_the_definition(seed: int) -> None:
    rng = random.Random(seed)
    events = []
    for entity in ("u1", "u2", "u3"):
        ts = rng.randrange(10 * MIN)
        for _ in range(rng.randrange(1, 40)):
            ts += rng.choice([0, MIN, 5 * MIN, 29 * MIN, 31 * MIN, 3 * 60 * MIN])
            events.append(("acme", entity, ts, float(rng.randrange(100))))
    rng.shuffle(events)
    expected: list[tuple[object, ...]] = []
    for entity in ("u1", "u2", "u3"):
        times = sorted((e[2], e[3]) for e in events if e[1] == entity)
        current: list[tuple[int, float]] = []
        for ts, value in times:
            if current and ts - current[-1][0] > 30 * MIN:
                expected.append(session_of("acme", entity, current))
                current = []
            current.append((ts, value))
        expected.append(session_of("acme", entity, current))
    assert as_tuples(sessionise(rows(*events), 30 * MIN)) == expected


def session_of(tenant: str, entity: str, events: list[tuple[int, float]]) -> tuple[object, ...]:
    return (tenant, entity, events[0][0], events[-1][0], len(events), sum(v for _, v in events))
