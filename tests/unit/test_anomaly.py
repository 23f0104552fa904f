from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.anomaly import (
    Detector,
    EwmaDetector,
    MadDetector,
    Verdict,
    describe_hour,
    hour_of_week,
    parse_detector,
)
from core.exceptions import ConfigurationError, InvalidInputError

HOUR = 3_600_000
WEEK = 168 * HOUR
MONDAY = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp() * 1000)  # Monday 00:00 UTC

DETECTORS: dict[str, Callable[..., Detector]] = {"ewma": EwmaDetector, "mad": MadDetector}


def at(day: int, hour: int, week: int = 0) -> int:
    """Window start of ``day`` (0 = Monday) at ``hour`` UTC, ``week`` weeks on."""
    return MONDAY + week * WEEK + (day * 24 + hour) * HOUR


def feed(detector: Detector, values: list[float], start: int = MONDAY) -> list[Verdict]:
    return [detector.observe(start + i * HOUR, value) for i, value in enumerate(values)]


def daily_series(hours: int, seed: int = 7) -> list[float]:
    """100 with a gentle daily swing and a little noise, one value an hour."""
    rng = random.Random(seed)
    return [100 + 5 * math.sin(2 * math.pi * h / 24) + rng.uniform(-2, 2) for h in range(hours)]


# --- hour of week ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "key", "words"),
    [
        (datetime(2024, 1, 1, 0, 0, tzinfo=UTC), 0, "Monday 00:00 UTC"),
        (datetime(2024, 1, 2, 14, 30, tzinfo=UTC), 38, "Tuesday 14:00 UTC"),
        (datetime(2024, 1, 7, 23, 59, tzinfo=UTC), 167, "Sunday 23:00 UTC"),
        (datetime(1970, 1, 1, 0, 0, tzinfo=UTC), 72, "Thursday 00:00 UTC"),
        (datetime(1969, 12, 31, 23, 0, tzinfo=UTC), 71, "Wednesday 23:00 UTC"),
    ],
)
def test_hour_of_week_is_utc_monday_based(when: datetime, key: int, words: str) -> None:
    ms = int(when.timestamp() * 1000)
    assert hour_of_week(ms) == key
    assert describe_hour(key) == words


@given(st.integers(min_value=0, max_value=4_102_444_800_000))
def test_hour_of_week_agrees_with_the_calendar(ms: int) -> None:
    when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    assert hour_of_week(ms) == when.weekday() * 24 + when.hour


# --- acceptance: one spike in a steady series fires once ------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: EwmaDetector(),
        lambda: MadDetector(),
        lambda: EwmaDetector(seasonal="hour_of_week", min_samples=3),
    ],
    ids=["ewma", "mad", "ewma-hour-of-week"],
)
def test_a_single_spike_in_a_steady_series_fires_once(make: Callable[[], Detector]) -> None:
    values = daily_series(5 * 168)
    spike = 4 * 168 + 24 + 14  # Tuesday 14:00 of the fifth week, well past warm-up
    values[spike] = 480.0
    verdicts = feed(make(), values)
    assert [i for i, v in enumerate(verdicts) if v.anomalous] == [spike]
    assert verdicts[spike].score > 4
    assert "480 is" in verdicts[spike].reason
    assert "above the usual" in verdicts[spike].reason
    assert not any(v.anomalous for v in verdicts[spike + 1 :])


def test_reason_names_the_metric_the_baseline_and_the_hour() -> None:
    detector = EwmaDetector(seasonal="hour_of_week", min_samples=3, name="count")
    for week in range(3):
        detector.observe(at(1, 14, week), 100.0)
    verdict = detector.observe(at(1, 14, 3), 480.0)
    # A steady 100 has no variance: the 5 % floor (5) is the deviation.
    assert verdict == Verdict(
        anomalous=True,
        score=76.0,
        expected=100.0,
        observed=480.0,
        reason="count 480 is 76.0 deviations above the usual 100 for Tuesday 14:00 UTC",
        warming_up=False,
    )


def test_a_value_normal_on_monday_morning_is_anomalous_on_sunday_night() -> None:
    detector = EwmaDetector(seasonal="hour_of_week", min_samples=4)
    rng = random.Random(3)
    for week in range(6):
        detector.observe(at(0, 9, week), 1000 + rng.uniform(-30, 30))
        detector.observe(at(6, 3, week), 10 + rng.uniform(-1, 1))
    monday = detector.observe(at(0, 9, 6), 1000.0)
    sunday = detector.observe(at(6, 3, 6), 1000.0)
    assert not monday.anomalous
    assert sunday.anomalous
    assert "Sunday 03:00 UTC" in sunday.reason
    assert sunday.expected == pytest.approx(10, abs=1)


def test_without_a_seasonal_baseline_the_same_hours_blur_together() -> None:
    # The contrast that makes the seasonal case worth having.
    detector = EwmaDetector(min_samples=4)
    for week in range(6):
        detector.observe(at(0, 9, week), 1000.0)
        detector.observe(at(6, 3, week), 10.0)
    assert not detector.observe(at(6, 3, 6), 1000.0).anomalous


# --- warm-up --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DETECTORS))
def test_nothing_is_judged_before_min_samples(kind: str) -> None:
    detector = DETECTORS[kind](min_samples=5)
    warming = feed(detector, [100.0, 100.0, 100.0, 100.0, 1e9])
    assert all(v.warming_up and not v.anomalous for v in warming)
    assert "4 of 5 samples" in warming[-1].reason
    judged = detector.observe(MONDAY + 10 * HOUR, 100.0)
    assert not judged.warming_up


def test_each_hour_of_the_week_warms_up_on_its_own() -> None:
    detector = EwmaDetector(seasonal="hour_of_week", min_samples=2)
    for week in range(3):
        detector.observe(at(0, 9, week), 100.0)
    assert not detector.observe(at(0, 9, 3), 100.0).warming_up
    first_tuesday = detector.observe(at(1, 9, 3), 1e6)
    assert first_tuesday.warming_up
    assert not first_tuesday.anomalous
    assert "Tuesday 09:00 UTC" in first_tuesday.reason


# --- direction ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DETECTORS))
@pytest.mark.parametrize(
    ("direction", "value", "anomalous"),
    [
        ("up", 200.0, True),
        ("up", 0.0, False),
        ("down", 200.0, False),
        ("down", 0.0, True),
        ("both", 200.0, True),
        ("both", 0.0, True),
        ("both", 101.0, False),
    ],
)
def test_direction_decides_which_side_alerts(
    kind: str, direction: str, value: float, anomalous: bool
) -> None:
    detector = DETECTORS[kind](min_samples=20, direction=direction)
    feed(detector, daily_series(30))
    verdict = detector.observe(MONDAY + 100 * HOUR, value)
    assert verdict.anomalous is anomalous
    assert (verdict.score > 0) is (value > verdict.expected)


# --- exact numbers --------------------------------------------------------------------


def test_ewma_numbers_follow_the_half_life() -> None:
    detector = EwmaDetector(half_life=1, min_samples=2)
    assert detector.alpha == 0.5
    feed(detector, [0.0, 10.0])  # mean 5, variance 0.5 * (0 + 10 * 5) = 25
    verdict = detector.observe(MONDAY, 30.0)
    assert (verdict.expected, verdict.score, verdict.anomalous) == (5.0, 5.0, True)


def test_a_spike_barely_moves_the_ewma_baseline() -> None:
    def after_spike(outlier_weight: float) -> float:
        detector = EwmaDetector(outlier_weight=outlier_weight)
        feed(detector, [*[100.0] * 30, 1000.0])
        return detector.observe(MONDAY, 100.0).expected

    assert after_spike(0.1) < 103  # default: about a tenth of the usual pull
    assert after_spike(1.0) > 120  # full weight: the spike drags the baseline up


def test_mad_is_a_modified_z_score() -> None:
    detector = MadDetector(window=5, min_samples=5, relative_floor=0)
    feed(detector, [98.0, 99.0, 100.0, 101.0, 102.0])  # median 100, MAD 1
    verdict = detector.observe(MONDAY, 110.0)
    assert verdict.expected == 100.0
    assert verdict.score == pytest.approx(10 / 1.4826)
    assert verdict.anomalous


def test_mad_forgets_values_older_than_its_window() -> None:
    detector = MadDetector(window=5, min_samples=5)
    feed(detector, [*[10.0] * 5, *[1000.0] * 5])
    verdict = detector.observe(MONDAY, 1000.0)
    assert verdict.expected == 1000.0
    assert not verdict.anomalous


# --- zero variance --------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DETECTORS))
@pytest.mark.parametrize(
    ("level", "value", "anomalous"),
    [(100.0, 101.0, False), (100.0, 110.0, False), (100.0, 200.0, True), (0.0, 1.0, True)],
)
def test_a_perfectly_steady_series_does_not_make_small_changes_infinite(
    kind: str, level: float, value: float, anomalous: bool
) -> None:
    detector = DETECTORS[kind]()
    feed(detector, [level] * 30)
    verdict = detector.observe(MONDAY, value)
    assert math.isfinite(verdict.score)
    assert verdict.anomalous is anomalous


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DETECTORS))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused_and_change_nothing(kind: str, value: float) -> None:
    detector = DETECTORS[kind](min_samples=2)
    feed(detector, [1.0, 2.0, 3.0])
    before = detector.snapshot()
    with pytest.raises(InvalidInputError, match="finite"):
        detector.observe(MONDAY, value)
    assert detector.snapshot() == before


# --- snapshot / restore ---------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: EwmaDetector(min_samples=3),
        lambda: EwmaDetector(seasonal="hour_of_week", min_samples=1),
        lambda: MadDetector(window=8, min_samples=3),
    ],
    ids=["ewma", "ewma-hour-of-week", "mad"],
)
@given(
    values=st.lists(
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=60
    ),
    cut=st.integers(min_value=0, max_value=60),
)
def test_a_restored_detector_gives_the_same_verdicts(
    make: Callable[[], Detector], values: list[float], cut: int
) -> None:
    cut = min(cut, len(values))
    straight = make()
    expected = feed(straight, values)
    first = make()
    feed(first, values[:cut])
    second = make()
    second.restore(json.loads(json.dumps(first.snapshot())))
    assert feed(second, values[cut:], start=MONDAY + cut * HOUR) == expected[cut:]
    assert second.snapshot() == straight.snapshot()


@pytest.mark.parametrize(
    ("detector", "snapshot"),
    [
        (EwmaDetector(), {"kind": "mad", "values": []}),
        (EwmaDetector(), {"kind": "ewma", "seasonal": "hour_of_week", "states": {}}),
        (EwmaDetector(), {"kind": "ewma", "seasonal": None, "states": {"all": [1, 2.0]}}),
        (EwmaDetector(), {"kind": "ewma", "seasonal": None, "states": {"all": [1, 2.0, -1]}}),
        (EwmaDetector(), {"kind": "ewma", "seasonal": None, "states": {"5": [1, 2.0, 0]}}),
        (
            EwmaDetector(seasonal="hour_of_week"),
            {"kind": "ewma", "seasonal": "hour_of_week", "states": {"168": [1, 2.0, 0]}},
        ),
        (MadDetector(), {"kind": "ewma", "seasonal": None, "states": {}}),
        (MadDetector(), {"kind": "mad", "values": [1.0, "2"]}),
        (MadDetector(), {"kind": "mad"}),
    ],
)
def test_a_foreign_or_broken_snapshot_is_refused(
    detector: Detector, snapshot: dict[str, Any]
) -> None:
    before = detector.snapshot()
    with pytest.raises(InvalidInputError, match="snapshot"):
        detector.restore(snapshot)
    assert detector.snapshot() == before


# --- factory --------------------------------------------------------------------------


def test_the_factory_builds_what_the_rule_says() -> None:
    ewma = parse_detector(
        {"kind": "ewma", "half_life": 24, "threshold": 4, "seasonal": "hour_of_week"},
        name="count",
    )
    mad = parse_detector({"kind": "mad", "window": 60, "threshold": 3.5, "direction": "up"})
    assert isinstance(ewma, EwmaDetector)
    assert ewma.seasonal == "hour_of_week"
    assert ewma.alpha == pytest.approx(1 - 0.5 ** (1 / 24))
    assert isinstance(mad, MadDetector)
    assert mad.window == 60
    feed(mad, [100.0] * 20)
    assert not mad.observe(MONDAY, 0.0).anomalous  # "up" only
    for week in range(20):
        ewma.observe(at(1, 14, week), 100.0)
    assert ewma.observe(at(1, 14, 20), 480.0).reason.startswith("count 480")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "zscore"}, "kind must be 'ewma' or 'mad'"),
        ({"window": 60}, "kind must be 'ewma' or 'mad'"),
        ({"kind": "mad", "half_life": 3}, "unknown mad detector keys \\['half_life'\\]"),
        ({"kind": "ewma", "treshold": 3}, "unknown ewma detector keys \\['treshold'\\]"),
        ({"kind": "ewma", "threshold": math.nan}, "threshold must be a finite number above 0"),
        ({"kind": "ewma", "threshold": -1}, "threshold must be a finite number above 0"),
        ({"kind": "ewma", "threshold": True}, "threshold must be a number"),
        ({"kind": "ewma", "half_life": -24}, "half_life must be a finite number above 0"),
        ({"kind": "ewma", "half_life": math.inf}, "half_life must be a finite number above 0"),
        ({"kind": "ewma", "half_life": "24"}, "half_life must be a number"),
        ({"kind": "ewma", "seasonal": "day_of_week"}, "seasonal must be 'hour_of_week'"),
        ({"kind": "ewma", "seasonal": 168}, "seasonal must be text"),
        ({"kind": "ewma", "outlier_weight": 2}, "outlier_weight must be within"),
        ({"kind": "ewma", "min_samples": 0}, "min_samples must be at least 1"),
        ({"kind": "ewma", "relative_floor": -0.1}, "relative_floor must be"),
        ({"kind": "ewma", "absolute_floor": 0}, "absolute_floor must be"),
        ({"kind": "mad", "window": 60.5}, "window must be a whole number"),
        ({"kind": "mad", "window": 10}, "min_samples \\(20\\) cannot exceed the window \\(10\\)"),
        ({"kind": "mad", "direction": "sideways"}, "direction must be one of up, down, both"),
    ],
)
def test_the_factory_refuses_a_bad_rule_clearly(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_detector(spec)
