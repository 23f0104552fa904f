from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.alert_rules import (
    METRICS,
    OPS,
    SEVERITIES,
    AlertRule,
    RuleEvaluator,
    parse_alert_rule,
    percent_change,
)
from core.exceptions import ConfigurationError, InvalidInputError
from core.incidents import IncidentBook, Signal

MINUTE = 60_000
NOON = int(datetime(2024, 1, 1, 12, tzinfo=UTC).timestamp() * 1000)
BERLIN = "site=berlin"


@dataclass(frozen=True)
class Win:
    """A finalised closed window, as the alerting service hands it to the evaluator."""

    start: int = NOON
    end: int = NOON + MINUTE
    count: int = 1
    sum: float = 0.0
    min: float = 0.0
    max: float = 0.0
    tenant: str = "acme"
    type: str = "temperature"
    window: str = "1m"
    group_key: str = BERLIN
    distinct: float | None = None
    quantiles: Mapping[str, float] | None = None


def win(minute: int, avg: float, **fields: Any) -> Win:
    """The ``minute``-th one-minute window after noon, with this average over 2 events."""
    start = NOON + minute * MINUTE
    return Win(start=start, end=start + MINUTE, count=2, sum=2 * avg, min=avg, max=avg, **fields)


def spec(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "hot-berlin",
        "tenant": "acme",
        "type": "temperature",
        "window": "1m",
        "metric": "avg",
        "condition": {"kind": "threshold", "op": ">", "value": 30},
    }
    return {**base, **changes}


def rule(**changes: Any) -> AlertRule:
    return parse_alert_rule(spec(**changes))


def states(evaluator: RuleEvaluator, values: list[float], first: int = 0) -> list[bool | None]:
    """Per window: True firing, False not firing, None no signal (one rule assumed)."""
    out: list[bool | None] = []
    for minute, value in enumerate(values, start=first):
        signals = evaluator.on_window(win(minute, value))
        assert len(signals) <= 1
        out.append(signals[0].firing if signals else None)
    return out


# --- threshold -------------------------------------------------------------------------

THRESHOLD_TABLE = [
    # op, fires at 30, just above (30.01), just below (29.99)
    (">", False, True, False),
    (">=", True, True, False),
    ("<", False, False, True),
    ("<=", True, False, True),
    ("==", True, False, False),
    ("!=", False, True, True),
]


@pytest.mark.parametrize(("op", "at", "above", "below"), THRESHOLD_TABLE)
def test_threshold_ops_at_and_around_the_boundary(
    op: str, at: bool, above: bool, below: bool
) -> None:
    condition = {"kind": "threshold", "op": op, "value": 30}
    for value, expected in ((30.0, at), (30.01, above), (29.99, below)):
        evaluator = RuleEvaluator([rule(condition=condition)])
        (signal,) = evaluator.on_window(win(0, value))
        assert signal.firing is expected, (op, value)


def test_table_covers_every_op() -> None:
    assert {row[0] for row in THRESHOLD_TABLE} == set(OPS)


def test_signal_says_what_breached_in_words_and_details() -> None:
    evaluator = RuleEvaluator([rule(severity="critical")])
    (signal,) = evaluator.on_window(win(0, 31.5))
    assert signal == Signal(
        tenant="acme",
        rule_id="hot-berlin",
        group_key=BERLIN,
        firing=True,
        at_ms=NOON + MINUTE,
        summary="avg 31.5 > 30 for temperature (site=berlin), window 12:00–12:01 UTC",
        details={
            "severity": "critical",
            "metric": "avg",
            "value": 31.5,
            "condition": "threshold",
            "expected": 30.0,
            "window_start": NOON,
            "window_end": NOON + MINUTE,
        },
    )
    (back,) = evaluator.on_window(win(1, 29))
    assert not back.firing
    assert back.summary.startswith("avg 29 not > 30 for temperature")


def test_rule_summary_prefixes_the_generated_text_and_groups_read_as_a_list() -> None:
    evaluator = RuleEvaluator([rule(summary="Berlin is hot")])
    (signal,) = evaluator.on_window(win(0, 31, group_key="site=berlin\x1ffloor=2"))
    assert signal.summary == (
        "Berlin is hot: avg 31 > 30 for temperature (site=berlin, floor=2), window 12:00–12:01 UTC"
    )


@pytest.mark.parametrize(
    ("metric", "window", "value"),
    [
        ("count", Win(count=7, sum=70), 7),
        ("sum", Win(count=7, sum=70), 70),
        ("min", Win(min=-3), -3),
        ("max", Win(max=99), 99),
        ("avg", Win(count=4, sum=10), 2.5),
        ("distinct", Win(distinct=12), 12),
        ("p99", Win(quantiles={"p50": 1, "p99": 42}), 42),
    ],
)
def test_each_metric_is_read_from_the_window(metric: str, window: Win, value: float) -> None:
    evaluator = RuleEvaluator([rule(metric=metric)])
    (signal,) = evaluator.on_window(window)
    assert signal.details["value"] == value


@pytest.mark.parametrize(
    ("metric", "window"),
    [
        ("p90", Win(quantiles=None)),
        ("p90", Win(quantiles={"p50": 1.0})),
        ("distinct", Win(distinct=None)),
        ("avg", Win(count=0, sum=0)),
        ("max", Win(max=float("nan"))),
    ],
)
def test_a_metric_the_window_lacks_is_not_evaluated(metric: str, window: Win) -> None:
    assert RuleEvaluator([rule(metric=metric)]).on_window(window) == []


# --- for_windows -----------------------------------------------------------------------


def test_for_windows_needs_consecutive_breaches_and_a_non_breach_resets() -> None:
    evaluator = RuleEvaluator([rule(for_windows=2)])
    #                          breach, breach, ok,   breach, ok,    breach, breach
    got = states(evaluator, [31, 32, 20, 33, 20, 34, 35])
    assert got == [None, True, False, None, False, None, True]


# --- rate of change --------------------------------------------------------------------

RATE = {"kind": "rate_of_change", "op": ">", "percent": 50}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([100, 160], [None, True]),  # +60%
        ([100, 150], [None, False]),  # +50% is not > 50%
        ([100, 40], [None, False]),  # a drop is not a rise
        ([0, 5], [None, True]),  # from zero: an infinite rise
        ([0, 0], [None, False]),  # zero to zero: no change
        ([-100, -40], [None, True]),  # +60% of |-100|
    ],
)
def test_rate_of_change_between_consecutive_windows(
    values: list[float], expected: list[bool | None]
) -> None:
    assert states(RuleEvaluator([rule(condition=RATE)]), values) == expected


def test_rate_of_change_says_the_change_and_reports_zero_base_without_infinity() -> None:
    evaluator = RuleEvaluator([rule(condition=RATE)])
    evaluator.on_window(win(0, 100))
    (rise,) = evaluator.on_window(win(1, 160))
    assert rise.summary.startswith("avg changed +60.0% (100 to 160), > 50% for temperature")
    assert rise.details["change_percent"] == pytest.approx(60)
    evaluator.on_window(win(2, 0))
    (from_zero,) = evaluator.on_window(win(3, 5))
    assert from_zero.firing
    assert "from zero (0 to 5)" in from_zero.summary
    json.dumps(dict(from_zero.details), allow_nan=False)  # channels send it as JSON


def test_a_drop_rule_uses_a_negative_percent() -> None:
    drop = {"kind": "rate_of_change", "op": "<=", "percent": -50}
    assert states(RuleEvaluator([rule(condition=drop)]), [100, 50, 40, 0]) == [
        None,
        True,
        False,
        True,
    ]


@given(
    st.floats(-1e6, 1e6).filter(lambda v: v != 0),
    st.floats(-1e6, 1e6),
)
def test_percent_change_sign_follows_the_direction(previous: float, current: float) -> None:
    change = percent_change(previous, current)
    assert (change > 0) == (current > previous)
    assert change == pytest.approx((current - previous) / abs(previous) * 100)


# --- anomaly ---------------------------------------------------------------------------

ANOMALY = {"kind": "anomaly", "detector": {"kind": "mad", "window": 30, "min_samples": 10}}


def test_anomaly_spike_opens_one_incident_and_resolves_it() -> None:
    evaluator = RuleEvaluator([rule(condition=ANOMALY, metric="count")])
    book = IncidentBook()
    counts = [20 + minute % 3 for minute in range(40)]
    counts[25] = 500
    kinds = []
    for minute, count in enumerate(counts):
        start = NOON + minute * MINUTE
        for signal in evaluator.on_window(Win(start=start, end=start + MINUTE, count=count)):
            kinds += [(minute, n.kind) for n in book.apply(signal)]
    assert kinds == [(25, "trigger"), (26, "resolve")]


def test_anomaly_details_carry_expected_and_score() -> None:
    evaluator = RuleEvaluator([rule(condition=ANOMALY)])
    states(evaluator, [20.0] * 15)
    (signal,) = evaluator.on_window(win(15, 100))
    assert signal.firing
    assert signal.details["expected"] == 20
    assert signal.details["score"] > 10
    assert signal.summary.startswith("avg 100 is ")


# --- isolation -------------------------------------------------------------------------


def test_groups_keep_their_own_streaks() -> None:
    evaluator = RuleEvaluator([rule(for_windows=2)])
    assert evaluator.on_window(win(0, 31, group_key="site=berlin")) == []
    assert evaluator.on_window(win(0, 31, group_key="site=paris")) == []
    (berlin,) = evaluator.on_window(win(1, 31, group_key="site=berlin"))
    (paris,) = evaluator.on_window(win(1, 20, group_key="site=paris"))
    assert (berlin.group_key, berlin.firing) == ("site=berlin", True)
    assert (paris.group_key, paris.firing) == ("site=paris", False)


def test_group_by_limits_a_rule_to_one_group() -> None:
    evaluator = RuleEvaluator([rule(group_by="site=berlin")])
    assert evaluator.on_window(win(0, 99, group_key="site=paris")) == []
    assert len(evaluator.on_window(win(0, 99, group_key="site=berlin"))) == 1


@pytest.mark.parametrize(
    "other",
    [{"tenant": "globex"}, {"type": "humidity"}, {"window": "5m"}],
)
def test_a_rule_ignores_other_tenants_types_and_windows(other: dict[str, str]) -> None:
    assert RuleEvaluator([rule()]).on_window(win(0, 99, **other)) == []


def test_same_rule_id_in_two_tenants_keeps_separate_state() -> None:
    evaluator = RuleEvaluator([rule(for_windows=2), rule(tenant="globex", for_windows=2)])
    evaluator.on_window(win(0, 31))
    evaluator.on_window(win(0, 31, tenant="globex"))
    (acme,) = evaluator.on_window(win(1, 31))
    (globex,) = evaluator.on_window(win(1, 10, tenant="globex"))
    assert (acme.tenant, acme.firing) == ("acme", True)
    assert (globex.tenant, globex.firing) == ("globex", False)


# --- late and replayed windows ---------------------------------------------------------


def test_replayed_and_late_windows_do_not_count_towards_for_windows() -> None:
    evaluator = RuleEvaluator([rule(for_windows=2)])
    assert evaluator.on_window(win(5, 31)) == []
    assert evaluator.on_window(win(5, 31)) == []  # the same window again (a replay)
    assert evaluator.on_window(win(4, 31)) == []  # an earlier window, late
    (signal,) = evaluator.on_window(win(6, 31))
    assert signal.firing
    assert signal.details["window_start"] == NOON + 6 * MINUTE


def test_a_replay_does_not_feed_the_detector_twice() -> None:
    evaluator = RuleEvaluator([rule(condition=ANOMALY)])
    states(evaluator, [20.0, 21.0, 22.0])
    before = evaluator.snapshot()
    assert evaluator.on_window(win(2, 22)) == []
    assert evaluator.snapshot() == before


# --- set_rules -------------------------------------------------------------------------


def test_set_rules_keeps_state_of_unchanged_rules_only() -> None:
    hot, cold = (
        rule(for_windows=2),
        rule(id="cold", condition={"kind": "threshold", "op": "<", "value": 40}),
    )
    evaluator = RuleEvaluator([hot, replace(cold, for_windows=2)])
    evaluator.on_window(win(0, 31))
    evaluator.set_rules([parse_alert_rule(hot.to_spec()), replace(cold, for_windows=3)])
    signals = evaluator.on_window(win(1, 31))
    # "hot" kept its streak and fires; "cold" changed, restarted, and counts from one.
    assert [(s.rule_id, s.firing) for s in signals] == [("hot-berlin", True)]


def test_set_rules_drops_removed_rules_and_refuses_duplicate_ids() -> None:
    evaluator = RuleEvaluator([rule()])
    evaluator.on_window(win(0, 31))
    evaluator.set_rules([])
    assert evaluator.snapshot()["states"] == []
    assert evaluator.on_window(win(1, 31)) == []
    with pytest.raises(ConfigurationError, match="'hot-berlin' used twice"):
        evaluator.set_rules([rule(), rule()])


# --- snapshot / restore ----------------------------------------------------------------

SERIES = [20.0, 21, 20, 22, 21, 20, 21, 60, 61, 20, 21, 0, 5, 20, 21, 20]


def every_kind() -> list[AlertRule]:
    return [
        rule(for_windows=2),
        rule(id="rate", condition=RATE),
        rule(
            id="spike",
            condition={"kind": "anomaly", "detector": {"kind": "ewma", "min_samples": 3}},
        ),
    ]


@pytest.mark.parametrize("split", [1, 5, 8, 12])
def test_a_restored_evaluator_continues_as_if_never_stopped(split: int) -> None:
    steady = RuleEvaluator(every_kind())
    expected = [steady.on_window(win(m, v)) for m, v in enumerate(SERIES)]

    first = RuleEvaluator(every_kind())
    got = [first.on_window(win(m, v)) for m, v in enumerate(SERIES[:split])]
    saved = json.loads(json.dumps(first.snapshot(), allow_nan=False))
    second = RuleEvaluator(every_kind())
    second.restore(saved)
    got += [second.on_window(win(m, v)) for m, v in enumerate(SERIES) if m >= split]
    assert got == expected


def test_restore_drops_state_of_rules_changed_since() -> None:
    evaluator = RuleEvaluator([rule(for_windows=2)])
    evaluator.on_window(win(0, 31))
    restarted = RuleEvaluator([rule(for_windows=3)])
    restarted.restore(evaluator.snapshot())
    assert restarted.snapshot()["states"] == []


@pytest.mark.parametrize(
    "data",
    [
        {"version": 99, "states": []},
        {"version": 1, "states": [{"rule": {}}]},
        {"version": 1, "states": ["nonsense"]},
    ],
)
def test_restore_refuses_what_is_not_a_snapshot(data: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        RuleEvaluator([rule()]).restore(data)


def test_restore_refuses_a_detector_snapshot_of_another_kind() -> None:
    evaluator = RuleEvaluator([rule(condition=ANOMALY)])
    evaluator.on_window(win(0, 20))
    data = evaluator.snapshot()
    data["states"][0]["detector"] = {"kind": "ewma", "seasonal": None, "states": {}}
    with pytest.raises(InvalidInputError, match="mad"):
        RuleEvaluator([rule(condition=ANOMALY)]).restore(data)


# --- parsing ---------------------------------------------------------------------------


def test_parse_fills_defaults() -> None:
    parsed = rule()
    assert (parsed.for_windows, parsed.severity, parsed.group_by, parsed.summary) == (
        1,
        "warning",
        None,
        "",
    )


@given(
    rule_id=st.from_regex(r"[A-Za-z0-9_.:-]{1,128}", fullmatch=True),
    metric=st.sampled_from(METRICS),
    severity=st.sampled_from(SEVERITIES),
    for_windows=st.integers(1, 100),
    value=st.floats(allow_nan=False, allow_infinity=False),
    op=st.sampled_from(sorted(OPS)),
    group_by=st.none() | st.text(min_size=1),
)
def test_a_rule_survives_its_own_json(
    rule_id: str,
    metric: str,
    severity: str,
    for_windows: int,
    value: float,
    op: str,
    group_by: str | None,
) -> None:
    parsed = rule(
        id=rule_id,
        metric=metric,
        severity=severity,
        for_windows=for_windows,
        group_by=group_by,
        condition={"kind": "threshold", "op": op, "value": value},
    )
    assert parse_alert_rule(json.loads(json.dumps(parsed.to_spec()))) == parsed


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"colour": "red"}, r"unknown alert rule keys \['colour'\]"),
        ({"id": "has space"}, r"'id' must be 1 to 128"),
        ({"id": "x" * 129}, r"'id' must be 1 to 128"),
        ({"tenant": ""}, r"'tenant' must be a non-empty text"),
        ({"metric": "median"}, r"'metric' must be one of count, sum"),
        ({"severity": "doom"}, r"'severity' must be one of critical"),
        ({"for_windows": 0}, r"'for_windows' must be a whole number of at least 1"),
        ({"for_windows": True}, r"'for_windows' must be a whole number"),
        ({"condition": "x > 3"}, r"'condition' must be an object"),
        ({"condition": {"kind": "magic"}}, r"'condition.kind' must be one of threshold"),
        ({"condition": {"kind": "threshold", "op": "=>", "value": 1}}, r"'condition.op'"),
        ({"condition": {"kind": "threshold", "op": ">", "value": float("nan")}}, r"finite"),
        ({"condition": {"kind": "threshold", "op": ">", "value": "30"}}, r"'condition.value'"),
        (
            {"condition": {"kind": "threshold", "op": ">"}},
            r"needs exactly the keys kind, op, value",
        ),
        ({"condition": {**RATE, "value": 3}}, r"needs exactly the keys kind, op, percent"),
        ({"condition": {"kind": "anomaly", "detector": {"kind": "x"}}}, r"'condition.detector'"),
    ],
)
def test_parse_errors_name_the_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_alert_rule(spec(**changes))


def test_parse_names_missing_keys() -> None:
    broken = spec()
    del broken["condition"]
    with pytest.raises(ConfigurationError, match=r"missing \['condition'\]"):
        parse_alert_rule(broken)
