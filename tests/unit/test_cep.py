from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from core.cep import (
    AbsenceRule,
    CepEngine,
    Match,
    Rule,
    RuleError,
    SequenceRule,
    ThresholdRule,
    load_rules,
    parse_duration,
    parse_rule,
)

SECOND = 1000
MINUTE = 60 * SECOND
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z: whole minutes from here start windows

Batch = tuple[list[dict[str, Any]], int]  # (events, watermark after them)


def ev(
    event_id: str,
    type_: str,
    ts: int,
    entity: str | None = "dev-1",
    tenant: str = "acme",
    value: float = 0.0,
    **extra: Any,
) -> dict[str, Any]:
    """An event ``ts`` ms after T0."""
    return {
        "event_id": event_id,
        "type": type_,
        "ts": T0 + ts,
        "entity": entity,
        "tenant": tenant,
        "value": value,
        "source": "api",
        **extra,
    }


def threshold(**over: Any) -> ThresholdRule:
    spec = {"id": "hot", "kind": "threshold", "type": "temp", "window": "1m", "agg": "count"}
    rule = parse_rule({**spec, "op": ">=", "value": 3, **over})
    assert isinstance(rule, ThresholdRule)
    return rule


def sequence(**over: Any) -> SequenceRule:
    spec = {"id": "seq", "kind": "sequence", "first": "login", "then": "wire", "within": "30s"}
    rule = parse_rule({**spec, **over})
    assert isinstance(rule, SequenceRule)
    return rule


def absence(**over: Any) -> AbsenceRule:
    rule = parse_rule({"id": "gone", "kind": "absence", "type": "beat", "within": "20s", **over})
    assert isinstance(rule, AbsenceRule)
    return rule


def feed(engine: CepEngine, events: Iterable[dict[str, Any]], watermark: int) -> list[Match]:
    """One micro-batch as the worker gives it: events, then the watermark (ms after T0)."""
    engine.on_events(events)
    return engine.on_watermark(T0 + watermark)


def run(rules: Sequence[Rule], batches: Iterable[Batch]) -> list[Match]:
    engine = CepEngine(rules)
    return [m for events, mark in batches for m in feed(engine, events, mark)]


def order(match: Match) -> tuple[int, str, str, str, tuple[str, ...]]:
    return (match.ts, match.rule_id, match.tenant, match.key, match.event_ids)


def ids(matches: Iterable[Match]) -> list[tuple[str, ...]]:
    return [m.event_ids for m in matches]


# ------------------------------------------------------------------------------- rules


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("500ms", 500),
        ("30s", 30_000),
        ("5m", 300_000),
        ("2h", 7_200_000),
        ("1d", 86_400_000),
        ("0s", 0),
        (0, 0),
        (1500, 1500),
    ],
)
def test_durations(text: str | int, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize("bad", ["5 minutes", "5", "1.5s", "-1s", "5M", " 5m", -1, 1.5, True, None])
def test_bad_durations(bad: Any) -> None:
    with pytest.raises(ValueError, match="a duration such as 30s, 5m or 1h"):
        parse_duration(bad)


def test_defaults_and_durations_in_milliseconds() -> None:
    rule = threshold()
    assert (rule.key, rule.cooldown, rule.severity, rule.tenant) == ("entity", 0, "warning", None)
    assert (rule.window, rule.max_event_ids, rule.description) == (MINUTE, 100, None)
    assert sequence(cooldown="1m").cooldown == MINUTE
    assert absence(key="attributes.region").key == "attributes.region"


def test_rules_are_frozen_and_compare_by_spec() -> None:
    rule = sequence()
    with pytest.raises(ValidationError):
        rule.within = 5  # type: ignore[misc]
    assert rule == sequence()
    assert rule != sequence(within="31s")


def test_error_message_names_rule_field_expectation_and_input() -> None:
    spec = {"id": "hot-device", "kind": "sequence", "first": "a", "then": "b"}
    with pytest.raises(RuleError) as caught:
        parse_rule({**spec, "within": "5 minutes"})
    assert str(caught.value) == (
        "rule 'hot-device': field 'within' expected a duration such as 30s, 5m or 1h, "
        "got '5 minutes'"
    )
    assert isinstance(caught.value, ValueError)
    assert caught.value.rule_id == "hot-device"


GOOD: dict[str, dict[str, Any]] = {
    "threshold": {"type": "t", "window": "1m", "agg": "avg", "op": ">", "value": 30},
    "sequence": {"first": "a", "then": "b", "within": "30s"},
    "absence": {"type": "t", "within": "30s"},
}


@pytest.mark.parametrize(
    ("kind", "change", "field", "expected", "got"),
    [
        ("sequence", {"within": "5 minutes"}, "within", "a duration such as", "'5 minutes'"),
        ("sequence", {"within": "0s"}, "within", "a duration above zero", "'0s'"),
        ("sequence", {"within": None}, "within", "a duration such as", "null"),
        ("absence", {"within": -5}, "within", "a duration such as", "-5"),
        ("absence", {"cooldown": "soon"}, "cooldown", "a duration such as", "'soon'"),
        ("absence", {"within": ...}, "within", "a duration such as", "nothing"),
        ("sequence", {"then": ...}, "then", "an event type", "nothing"),
        ("sequence", {"first": "a b"}, "first", "an event type", "'a b'"),
        ("absence", {"type": 7}, "type", "an event type", "7"),
        ("threshold", {"window": "1 min"}, "window", "a duration such as", "'1 min'"),
        ("threshold", {"agg": "mean"}, "agg", "one of count, sum, avg, min, max", "'mean'"),
        ("threshold", {"op": "=="}, "op", "one of >, >=, <, <=", "'=='"),
        ("threshold", {"value": "30"}, "value", "a finite number", "'30'"),
        ("threshold", {"value": True}, "value", "a finite number", "true"),
        ("threshold", {"value": float("inf")}, "value", "a finite number", "Infinity"),
        ("threshold", {"max_event_ids": -1}, "max_event_ids", "an integer from 0", "-1"),
        ("threshold", {"max_event_ids": 1.0}, "max_event_ids", "an integer from 0", "1.0"),
        ("absence", {"severity": "high"}, "severity", "one of info, warning, critical", "'high'"),
        ("absence", {"tenant": "a/b"}, "tenant", "a tenant name", "'a/b'"),
        ("absence", {"key": "foo bar"}, "key", "an event field", "'foo bar'"),
        ("absence", {"key": "attributes."}, "key", "an event field", "'attributes.'"),
        ("absence", {"key": 3}, "key", "an event field", "3"),
        ("absence", {"description": ["x"]}, "description", "a string", '["x"]'),
        ("absence", {"windw": "5m"}, "windw", "no such field (absence rules take", "'5m'"),
        ("absence", {"kind": "absent"}, "kind", "one of threshold, sequence, absence", "'absent'"),
        ("absence", {"kind": ...}, "kind", "one of threshold, sequence, absence", "nothing"),
    ],
)
def test_bad_specs_are_explained(
    kind: str, change: dict[str, Any], field: str, expected: str, got: str
) -> None:
    spec = {"id": "r1", "kind": kind, **GOOD[kind], **change}
    spec = {name: value for name, value in spec.items() if value is not ...}
    with pytest.raises(RuleError) as caught:
        parse_rule(spec)
    assert str(caught.value).startswith(f"rule 'r1': field '{field}' expected {expected}")
    assert str(caught.value).endswith(f", got {got}")
    assert [problem[0] for problem in caught.value.problems] == [field]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (["not", "a", "rule"], "rule (no id): expected a mapping of rule fields, got "),
        ({"kind": "absence", **GOOD["absence"]}, "rule (no id): field 'id' expected 1 to 128"),
        ({"id": 5, "kind": "absence", **GOOD["absence"]}, "rule (no id): field 'id' expected"),
        ({"id": "x" * 129, "kind": "absence", **GOOD["absence"]}, "rule 'xxxxxxx"),
    ],
)
def test_specs_without_a_usable_id(spec: Any, message: str) -> None:
    with pytest.raises(RuleError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        parse_rule(spec)


def test_every_problem_of_a_spec_is_reported() -> None:
    with pytest.raises(RuleError) as caught:
        parse_rule({"id": "r1", "kind": "threshold", "type": "t", "window": "1h", "op": "!"})
    assert [p[0] for p in caught.value.problems] == ["agg", "op", "value"]
    assert str(caught.value).count("; field ") == 2


def test_load_rules_keeps_the_good_ones_and_rejects_duplicate_ids() -> None:
    specs = [
        {"id": "a", "kind": "absence", **GOOD["absence"]},
        {"id": "b", "kind": "absence", "type": "t", "within": "soon"},
        {"id": "c", "kind": "sequence", **GOOD["sequence"]},
        {"id": "d", "kind": "absence", **GOOD["absence"]},
        {"id": "d", "kind": "threshold", **GOOD["threshold"]},
    ]
    rules, errors = load_rules(specs)
    assert [r.id for r in rules] == ["a", "c"]
    assert [e.rule_id for e in errors] == ["b", "d", "d"]
    assert "field 'within'" in str(errors[0])
    assert str(errors[1]) == (
        "rule 'd': field 'id' expected an id no other rule has, got 'd', which 2 rules share"
    )


# ---------------------------------------------------------------------------- threshold


@pytest.mark.parametrize(
    ("agg", "op", "limit", "values", "fires"),
    [
        ("count", ">=", 3, [1, 1, 1], True),
        ("count", ">=", 3, [1, 1], False),
        ("count", ">", 3, [1, 1, 1], False),  # exactly the threshold
        ("count", "<=", 1, [5], True),
        ("sum", ">", 10, [4, 4, 3], True),
        ("sum", ">", 11, [4, 4, 3], False),  # exactly the threshold
        ("sum", ">=", 11, [4, 4, 3], True),
        ("avg", ">", 30, [31, 32], True),
        ("avg", ">", 31.5, [31, 32], False),
        ("avg", "<", 31.6, [31, 32], True),
        ("min", "<", 0, [3, -1, 5], True),
        ("min", "<", -1, [3, -1, 5], False),
        ("max", ">=", 5, [3, -1, 5], True),
        ("max", ">", 5, [3, -1, 5], False),
    ],
)
def test_threshold_aggregates(
    agg: str, op: str, limit: float, values: list[float], fires: bool
) -> None:
    rule = threshold(agg=agg, op=op, value=limit)
    events = [ev(f"e{i}", "temp", i * SECOND, value=v) for i, v in enumerate(values)]
    matches = run([rule], [(events, MINUTE)])
    assert len(matches) == int(fires)


def test_threshold_matches_once_the_watermark_reaches_the_window_end() -> None:
    engine = CepEngine([threshold(agg="avg", op=">", value=30, severity="critical")])
    events = [ev("a", "temp", 1, value=31), ev("b", "temp", 59_999, value=32)]
    events.append(ev("next-window", "temp", MINUTE, value=0))  # [1m, 2m): not in the first
    assert feed(engine, events, MINUTE - 1) == []
    [match] = feed(engine, [], MINUTE)
    assert (match.kind, match.rule_id, match.severity) == ("threshold", "hot", "critical")
    assert (match.tenant, match.key, match.ts, match.event_ids) == (
        "acme",
        "dev-1",
        T0 + MINUTE,
        ("a", "b"),
    )
    assert match.detail == {
        "agg": "avg",
        "value": 31.5,
        "op": ">",
        "threshold": 30.0,
        "window_start": T0,
        "window_end": T0 + MINUTE,
        "events": 2,
    }
    assert feed(engine, [], 2 * MINUTE) == []  # 0 in [1m, 2m) is not above 30
    assert len(engine) == 0


def test_threshold_event_ids_are_capped_but_all_are_counted() -> None:
    events = [ev(f"e{i}", "temp", i) for i in range(5)]
    [match] = run([threshold(max_event_ids=2)], [(events, MINUTE)])
    assert (match.event_ids, match.detail["events"]) == (("e0", "e1"), 5)


def test_threshold_does_not_evaluate_a_silent_key() -> None:
    rule = threshold(op="<", value=2)  # "fewer than 2" says nothing about a key with none
    matches = run([rule], [([ev("a", "temp", 1, entity="busy")], MINUTE), ([], 5 * MINUTE)])
    assert [m.key for m in matches] == ["busy"]


def test_threshold_cooldown_suppresses_then_allows() -> None:
    engine = CepEngine([threshold(value=1, cooldown="2m")])
    found = [
        m
        for i in range(5)
        for m in feed(engine, [ev(f"e{i}", "temp", i * MINUTE)], (i + 1) * MINUTE)
    ]
    # windows end at 1m, 2m, ... 5m: after 1m nothing before 3m, after 3m nothing before 5m
    assert [(m.ts - T0) // MINUTE for m in found] == [1, 3, 5]
    assert engine.stats.suppressed == 2


def test_threshold_tenant_filter_and_key_separation() -> None:
    rule = threshold(tenant="acme", value=2)
    events = [
        ev("a1", "temp", 1, entity="x"),
        ev("a2", "temp", 2, entity="y"),  # another key: x and y each have one
        ev("g1", "temp", 3, entity="x", tenant="globex"),  # another tenant: filtered out
        ev("a3", "temp", 4, entity="x"),
        ev("n1", "temp", 5, entity=None),  # no key: ignored
        ev("o1", "other", 6, entity="y"),  # another type
    ]
    [match] = run([rule], [(events, MINUTE)])
    assert (match.key, match.event_ids) == ("x", ("a1", "a3"))
    everyone = run([threshold(value=1)], [(events, MINUTE)])
    assert sorted((m.tenant, m.key) for m in everyone) == [
        ("acme", "x"),
        ("acme", "y"),
        ("globex", "x"),
    ]


def test_threshold_out_of_order_batch_gives_the_same_match() -> None:
    events = [ev(f"e{i}", "temp", ts, value=ts) for i, ts in enumerate([500, 10, 59_000, 20])]
    rule = threshold(agg="max", op=">", value=1000)
    [shuffled] = run([rule], [(events, MINUTE)])
    [ordered] = run([rule], [(sorted(events, key=lambda e: e["ts"]), MINUTE)])
    assert shuffled.detail == ordered.detail
    assert shuffled.alert_id == ordered.alert_id


# ---------------------------------------------------------------------------- sequence


def pairs(events: list[dict[str, Any]], rule: SequenceRule | None = None) -> list[tuple[str, ...]]:
    return ids(run([rule or sequence()], [(events, 10 * MINUTE)]))


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([ev("A", "login", 0), ev("B", "wire", 10 * SECOND)], [("A", "B")]),
        ([ev("B", "wire", 10 * SECOND), ev("A", "login", 0)], [("A", "B")]),  # out of order
        ([ev("A", "login", 0), ev("B", "wire", 30 * SECOND)], [("A", "B")]),  # exactly within
        ([ev("A", "login", 0), ev("B", "wire", 30 * SECOND + 1)], []),
        ([ev("B", "wire", 5), ev("A", "login", 5)], [("A", "B")]),  # same ms, B first
        ([ev("B", "wire", 4), ev("A", "login", 5)], []),  # B before A in event time
        ([ev("B", "wire", 5)], []),
        ([ev("A", "login", 5)], []),
        ([ev("A", "login", 0), ev("B1", "wire", 1), ev("B2", "wire", 2)], [("A", "B1")]),
        ([ev("A1", "login", 0), ev("A2", "login", 1), ev("B", "wire", 2)], [("A2", "B")]),
        ([ev("A1", "login", 0), ev("B", "wire", 2), ev("A2", "login", 1)], [("A2", "B")]),
        (
            [ev(f"A{i}", "login", 0) for i in range(3)] + [ev("B", "wire", 0)],
            [("A2", "B")],  # same ms: the latest arrival is the most recent A
        ),
    ],
)
def test_sequence_matches(events: list[dict[str, Any]], expected: list[tuple[str, ...]]) -> None:
    assert pairs(events) == expected


def test_sequence_of_one_type_pairs_events_up() -> None:
    rule = sequence(first="login", then="login", within="10s")
    events = [ev(f"L{i}", "login", ts) for i, ts in enumerate([0, 1, 2, 20_000, 25_000, 45_000])]
    assert pairs(events, rule) == [("L0", "L1"), ("L3", "L4")]  # L2 and L5 wait in vain
    same_ms = pairs([ev(f"L{i}", "login", 7) for i in range(4)], rule)
    assert same_ms == [("L0", "L1"), ("L2", "L3")]


def test_sequence_matches_once_the_watermark_passes_b() -> None:
    engine = CepEngine([sequence()])
    assert feed(engine, [ev("A", "login", 0), ev("B", "wire", 10 * SECOND)], 10 * SECOND) == []
    [match] = feed(engine, [], 10 * SECOND + 1)
    assert (match.kind, match.ts, match.event_ids) == ("sequence", T0 + 10 * SECOND, ("A", "B"))
    assert match.detail == {
        "first": "login",
        "then": "wire",
        "first_ts": T0,
        "then_ts": T0 + 10 * SECOND,
        "gap_ms": 10 * SECOND,
    }


def test_sequence_a_arriving_after_b_in_a_later_batch_still_matches() -> None:
    engine = CepEngine([sequence()])
    assert feed(engine, [ev("B", "wire", 20 * SECOND)], 2 * SECOND) == []
    assert ids(feed(engine, [ev("A", "login", 5 * SECOND)], MINUTE)) == [("A", "B")]


def test_sequence_cooldown_suppresses_then_allows() -> None:
    engine = CepEngine([sequence(cooldown="1m")])
    found = []
    for i, start in enumerate([0, 30 * SECOND, 70 * SECOND]):
        batch = [ev(f"A{i}", "login", start), ev(f"B{i}", "wire", start + 5 * SECOND)]
        found += feed(engine, batch, start + 10 * SECOND)
    # B1 at 35 s < B0 at 5 s + 1 m; B2 at 75 s is not
    assert ids(found) == [("A0", "B0"), ("A2", "B2")]
    assert engine.stats.suppressed == 1


def test_sequence_tenant_filter_and_key_separation() -> None:
    events = [
        ev("A", "login", 0, entity="x"),
        ev("B-other-key", "wire", 1, entity="y"),
        ev("B-other-tenant", "wire", 2, entity="x", tenant="globex"),
        ev("B", "wire", 3, entity="x"),
    ]
    assert pairs(events, sequence(tenant="acme")) == [("A", "B")]
    assert pairs(events, sequence(tenant="globex")) == []


def test_sequence_state_stays_bounded() -> None:
    engine = CepEngine([sequence()])
    engine.on_events(ev(f"A{i}", "login", i % 1000, entity=f"k{i}") for i in range(100_000))
    assert len(engine) == 100_000  # buffered until the watermark passes them
    assert feed(engine, [], SECOND) == []
    assert len(engine) == 100_000  # now pending, waiting for a B
    assert feed(engine, [], 31 * SECOND) == []
    assert len(engine) == 0


def test_events_behind_the_watermark_are_ignored_and_counted() -> None:
    engine = CepEngine([sequence(), threshold(value=1)])
    feed(engine, [ev("A", "login", 0)], 10 * SECOND)
    late = [ev("B", "wire", 9 * SECOND), ev("T", "temp", 9 * SECOND), ev("x", "other", 0)]
    assert feed(engine, late, MINUTE) == []
    assert engine.stats.late == 2  # an event no rule looks at is not counted


# ----------------------------------------------------------------------------- absence


def test_absence_fires_once_the_watermark_passes_the_deadline() -> None:
    engine = CepEngine([absence(severity="info")])
    assert feed(engine, [ev("h1", "beat", 0), ev("h2", "beat", 5 * SECOND)], 25 * SECOND) == []
    [match] = feed(engine, [], 25 * SECOND + 1)
    assert (match.kind, match.severity, match.ts) == ("absence", "info", T0 + 25 * SECOND)
    assert (match.event_ids, match.detail) == (
        ("h2",),
        {"type": "beat", "last_ts": T0 + 5 * SECOND},
    )
    assert len(engine) == 0  # forgotten until the next beat
    assert feed(engine, [], 10 * MINUTE) == []


@pytest.mark.parametrize(
    ("beats", "expected"),
    [
        ([0], [20]),
        ([0, 20], [40]),  # exactly within: still in time
        ([0, 21], [20, 41]),
        ([21, 0], [20, 41]),  # out of order within the batch
        ([0, 5, 10, 15], [35]),
        ([0, 100, 50], [20, 70, 120]),
    ],
)
def test_absence_deadlines(beats: list[int], expected: list[int]) -> None:
    events = [ev(f"h{i}", "beat", s * SECOND) for i, s in enumerate(beats)]
    matches = run([absence()], [(events, 10 * MINUTE)])
    assert [(m.ts - T0) // SECOND for m in matches] == expected


def test_absence_cooldown_suppresses_then_allows() -> None:
    engine = CepEngine([absence(cooldown="30s")])
    found = []
    for second in [0, 22, 45]:  # silences end at 20 s, 42 s (< 50 s) and 65 s
        found += feed(engine, [ev(f"h{second}", "beat", second * SECOND)], (second + 21) * SECOND)
    assert [(m.ts - T0) // SECOND for m in found] == [20, 65]


def test_absence_tenant_filter_and_key_separation() -> None:
    events = [
        ev("x1", "beat", 0, entity="x"),
        ev("y1", "beat", 0, entity="y"),
        ev("x2", "beat", 15 * SECOND, entity="x"),
        ev("g1", "beat", 0, entity="y", tenant="globex"),
    ]
    matches = run([absence(tenant="acme")], [(events, 10 * MINUTE)])
    assert [(m.key, m.ts - T0, m.event_ids) for m in matches] == [
        ("y", 20 * SECOND, ("y1",)),
        ("x", 35 * SECOND, ("x2",)),
    ]


# ------------------------------------------------------------------------------ engine


def test_types_and_key_fields_let_the_caller_prefilter() -> None:
    engine = CepEngine([threshold(), sequence(key="attributes.user"), absence(key="source")])
    assert engine.types == frozenset({"temp", "login", "wire", "beat"})
    assert engine.key_fields() == frozenset({"entity", "attributes.user", "source"})


def test_attribute_keys_and_non_string_key_values() -> None:
    rule = sequence(key="attributes.user")
    events = [
        ev("A", "login", 0, attributes={"user": 7}),
        ev("B-none", "wire", 1, attributes={"user": None}),
        ev("B-missing", "wire", 2),
        ev("B", "wire", 3, attributes={"user": 7}),
    ]
    [match] = run([rule], [(events, MINUTE)])
    assert (match.key, match.event_ids) == ("7", ("A", "B"))


def test_a_watermark_that_goes_back_changes_nothing() -> None:
    engine = CepEngine([absence()])
    feed(engine, [ev("h", "beat", 0)], 10 * SECOND)
    assert feed(engine, [], 5 * SECOND) == []
    assert engine.watermark == T0 + 10 * SECOND
    assert len(feed(engine, [], 21 * SECOND)) == 1


def test_matches_come_out_sorted() -> None:
    rules: list[Rule] = [
        absence(id="z"),
        absence(id="a"),
        sequence(first="beat", then="beat", within="1s"),
    ]
    events = [ev(f"{e}{s}", "beat", s * SECOND, entity=e) for e in "qp" for s in (0, 1, 30)]
    matches = run(rules, [(events, 10 * MINUTE)])
    keys = [(m.ts, m.rule_id, m.tenant, m.key) for m in matches]
    assert keys == sorted(keys)
    assert len(matches) == 2 * 2 * 2 + 2  # absences at 21 s and 50 s, pairs at (0 s, 1 s)


def test_set_rules_keeps_unchanged_state_and_drops_the_rest() -> None:
    engine = CepEngine([sequence(), absence(), threshold(value=1)])
    feed(engine, [ev("A", "login", 0), ev("h", "beat", 0), ev("t", "temp", 0)], SECOND)
    engine.set_rules([sequence(), absence(within="1m")])  # threshold removed, absence changed
    assert {r.id for r in engine.rules} == {"seq", "gone"}
    matches = feed(engine, [ev("B", "wire", 2 * SECOND)], 10 * MINUTE)
    assert ids(matches) == [("A", "B")]  # the pending A survived; the beat did not
    with pytest.raises(ValueError, match="repeat: seq"):
        engine.set_rules([sequence(), sequence(within="1m")])


def test_snapshot_is_json_and_restores() -> None:
    rules: list[Rule] = [sequence(), absence(), threshold(value=1, cooldown="5m")]
    engine = CepEngine(rules)
    feed(engine, [ev("A", "login", 0), ev("h", "beat", 0), ev("t", "temp", 0)], SECOND)
    feed(engine, [ev("B", "wire", 2 * SECOND)], MINUTE)  # sets the threshold's cooldown
    data = json.loads(json.dumps(engine.snapshot()))
    assert data == engine.snapshot()
    restored = CepEngine.restore(rules, data)
    assert (len(restored), restored.watermark) == (len(engine), engine.watermark)
    assert restored.snapshot() == data
    changed = CepEngine.restore([sequence(within="1m")], data)
    assert len(changed) == 0  # a changed spec starts empty
    with pytest.raises(ValueError, match="version 1"):
        CepEngine.restore(rules, {"version": 99})


def test_equal_times_keep_arrival_order_across_a_restore() -> None:
    engine = CepEngine([sequence()])
    feed(engine, [ev("other", "login", 9, entity="y"), ev("A1", "login", 5)], 0)
    restored = CepEngine.restore([sequence()], json.loads(json.dumps(engine.snapshot())))
    matches = feed(restored, [ev("A2", "login", 5), ev("B", "wire", 6)], MINUTE)
    assert ids(matches) == [("A2", "B")]  # A2 came after A1, so it is the most recent


def test_alert_ids_are_deterministic_and_distinct() -> None:
    rule = sequence(first="login", then="login", within="1s")
    events = [ev(f"L{i}", "login", 0) for i in range(4)]
    first, second = run([rule], [(events, MINUTE)]), run([rule], [(events, MINUTE)])
    assert [m.alert_id for m in first] == [m.alert_id for m in second]
    assert len({m.alert_id for m in first}) == 2  # same rule, key and ms: still two alerts
    assert all(len(m.alert_id) == 32 for m in first)
    assert json.loads(json.dumps(first[0].as_json()))["event_ids"] == ["L0", "L1"]


# --------------------------------------------------------------------------- properties

RULES: list[Rule] = [
    threshold(id="t-count", type="a", window="10s", value=2, cooldown="15s"),
    threshold(id="t-avg", type="b", window="7s", agg="avg", op=">", value=5, key="source"),
    sequence(id="s-ab", first="a", then="b", within="5s", cooldown="8s"),
    sequence(id="s-cc", first="c", then="c", within="4s", tenant="acme"),
    absence(id="x-c", type="c", within="6s", cooldown="10s"),
]
LATENESS = 3 * SECOND

TICK = 250  # coarse times, so that equal times (and their tie-breaks) are common
FLUSH = 10 * MINUTE  # a last watermark past everything
EventTuple = tuple[str, int, int, str, str, int, str]
event_tuples = st.tuples(
    st.sampled_from("abcd"),  # type
    st.integers(0, 8),  # ticks the stream's clock moves on before this event
    st.integers(0, 16),  # ticks this event lags that clock: beyond 12 it may be late
    st.sampled_from(["k1", "k2"]),  # entity
    st.sampled_from(["acme", "globex"]),  # tenant
    st.integers(0, 10),  # value
    st.sampled_from(["api", "batch"]),  # source
)


def make_events(tuples: list[EventTuple]) -> list[dict[str, Any]]:
    """Events of a stream that moves forward with some disorder, as a partition's does."""
    events, clock = [], 0
    for i, (type_, step, lag, key, tenant, value, source) in enumerate(tuples):
        clock += step * TICK
        ts = clock - lag * TICK
        events.append(ev(f"e{i}", type_, ts, entity=key, tenant=tenant, value=value, source=source))
    return events


def worker_batches(events: list[dict[str, Any]], cuts: list[int]) -> list[Batch]:
    """Batches cut at ``cuts``, each followed by max ts - lateness, as the worker does."""
    bounds = [0, *sorted({c % (len(events) + 1) for c in cuts}), len(events)]
    batches, high = [], 0
    for lo, hi in itertools.pairwise(bounds):
        chunk = events[lo:hi]
        high = max([high, *(e["ts"] - T0 for e in chunk)])
        batches.append((chunk, high - LATENESS))
    return [*batches, ([], FLUSH)]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(event_tuples, max_size=80),
    st.lists(st.integers(0, 100), max_size=8),
    st.integers(0, 100),
)
def test_restore_mid_stream_gives_the_same_matches(
    tuples: list[EventTuple], cuts: list[int], split: int
) -> None:
    batches = worker_batches(make_events(tuples), cuts)
    split %= len(batches) + 1
    whole = run(RULES, batches)
    engine = CepEngine(RULES)
    before = [m for events, mark in batches[:split] for m in feed(engine, events, mark)]
    restored = CepEngine.restore(RULES, json.loads(json.dumps(engine.snapshot())))
    after = [m for events, mark in batches[split:] for m in feed(restored, events, mark)]
    assert before + after == whole
    assert len(restored) == 0
    assert len({m.alert_id for m in whole}) == len(whole)


@settings(max_examples=150, deadline=None)
@given(st.lists(event_tuples, max_size=80), st.lists(st.integers(0, 100), max_size=8))
def test_matches_do_not_depend_on_batching_when_nothing_is_late(
    tuples: list[EventTuple], cuts: list[int]
) -> None:
    events = make_events(tuples)
    bounds = [0, *sorted({c % (len(events) + 1) for c in cuts}), len(events)]
    batches: list[Batch] = []
    for lo, hi in itertools.pairwise(bounds):
        # the highest watermark that leaves every later event on time
        rest = [e["ts"] - T0 for e in events[hi:]]
        batches.append((events[lo:hi], min(rest, default=FLUSH)))
    in_one = run(RULES, [(events, FLUSH)])
    # Calls cut the stream differently, so only the order of equal times may differ.
    assert sorted(run(RULES, batches), key=order) == in_one
