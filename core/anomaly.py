"""Anomaly detection on window aggregates, judged each time a window closes.

Two detectors share one ``observe(window_start_ms, value) -> Verdict`` call:

* ``EwmaDetector``: exponentially weighted mean and variance, optionally one state per
  hour of the week (168 buckets, UTC) so that Monday 09:00 is compared with earlier
  Mondays at 09:00 and not with Sunday night.
* ``MadDetector``: median and scaled median absolute deviation over the last N values,
  robust to the outliers it is looking for.

A value is judged against the state *before* it, then folded in, so a spike never
hides itself. Both guard against a perfectly steady history: the deviation has a floor,
otherwise a series that never moved would make the smallest change infinitely unusual.

State snapshots to plain JSON-able data and restores from it, for checkpoints.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from core.exceptions import ConfigurationError, InvalidInputError

Direction = Literal["up", "down", "both"]
DIRECTIONS: tuple[str, ...] = ("up", "down", "both")
HOURS_PER_WEEK = 168
MAD_SCALE = 1.4826  # makes the MAD estimate the standard deviation of a normal series
_MS_PER_HOUR = 3_600_000
# 1970-01-01 was a Thursday: shift so that hour-of-week 0 is Monday 00:00 UTC.
_EPOCH_OFFSET_HOURS = 3 * 24
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_GLOBAL = "all"


@dataclass(frozen=True)
class Verdict:
    """What a detector thinks of one window's value.

    Attributes:
        anomalous: True when the value is beyond the threshold in a watched direction.
        score: Signed deviations from the expected value (positive is above).
        expected: The baseline the value was compared with.
        observed: The value itself.
        reason: The verdict in words, for an alert or a log line.
        warming_up: Too little history to judge; never anomalous then.
    """

    anomalous: bool
    score: float
    expected: float
    observed: float
    reason: str
    warming_up: bool


def hour_of_week(window_start_ms: int) -> int:
    """Return the UTC hour of the week of an epoch time, 0 being Monday 00:00."""
    return (window_start_ms // _MS_PER_HOUR + _EPOCH_OFFSET_HOURS) % HOURS_PER_WEEK


def describe_hour(key: int) -> str:
    """Return an hour-of-week key in words, e.g. ``"Tuesday 14:00 UTC"``."""
    return f"{_DAYS[key // 24]} {key % 24:02d}:00 UTC"


def _fmt(value: float) -> str:
    # Two decimals at most, and none for whole numbers: "480", "100.3".
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


@dataclass(frozen=True)
class _Judge:
    """Threshold, direction and deviation floor: what both detectors judge with."""

    threshold: float
    direction: Direction
    relative_floor: float
    absolute_floor: float
    name: str

    def __post_init__(self) -> None:
        _positive("threshold", self.threshold)
        _positive("absolute_floor", self.absolute_floor)
        _non_negative("relative_floor", self.relative_floor)
        if self.direction not in DIRECTIONS:
            raise ConfigurationError(
                f"direction must be one of {', '.join(DIRECTIONS)}, not {self.direction!r}"
            )

    def deviation(self, spread: float, centre: float) -> float:
        return max(spread, self.relative_floor * abs(centre), self.absolute_floor)

    def verdict(self, value: float, centre: float, spread: float, where: str) -> Verdict:
        score = (value - centre) / self.deviation(spread, centre)
        beyond = {"up": score > self.threshold, "down": score < -self.threshold}
        anomalous = beyond.get(self.direction, abs(score) > self.threshold)
        side = "above" if score >= 0 else "below"
        reason = (
            f"{self.name} {_fmt(value)} is {abs(score):.1f} deviations {side} "
            f"the usual {_fmt(centre)}{where}"
        )
        return Verdict(anomalous, score, centre, value, reason, warming_up=False)

    def warming(self, value: float, centre: float, seen: int, needed: int, where: str) -> Verdict:
        reason = f"{self.name} {_fmt(value)} not judged: {seen} of {needed} samples seen{where}"
        return Verdict(False, 0.0, centre, value, reason, warming_up=True)


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigurationError(f"{name} must be a finite number above 0, not {value!r}")


def _non_negative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigurationError(f"{name} must be a finite number of at least 0, not {value!r}")


def _min_samples(value: int) -> None:
    if value < 1:
        raise ConfigurationError(f"min_samples must be at least 1, not {value!r}")


def _check_value(value: float) -> None:
    # A NaN compares false with every threshold: let through, it would never alert.
    if not math.isfinite(value):
        raise InvalidInputError(f"observed value must be a finite number, not {value!r}")


def _snapshot_error(kind: str, detail: str) -> InvalidInputError:
    return InvalidInputError(f"not a {kind} detector snapshot: {detail}")


class EwmaDetector:
    """Exponentially weighted mean and variance, optionally one per hour of the week.

    A value judged anomalous is folded in with ``outlier_weight`` times the usual
    weight: one spike barely moves the baseline, while a lasting level shift is still
    learnt, slowly, instead of alerting forever.
    """

    def __init__(
        self,
        half_life: float = 24.0,
        threshold: float = 4.0,
        min_samples: int = 20,
        seasonal: str | None = None,
        direction: Direction = "both",
        relative_floor: float = 0.05,
        absolute_floor: float = 1e-6,
        outlier_weight: float = 0.1,
        name: str = "value",
    ) -> None:
        """Set the detector up; raises ConfigurationError on a bad setting."""
        _positive("half_life", half_life)
        _min_samples(min_samples)
        if seasonal not in (None, "hour_of_week"):
            raise ConfigurationError(f"seasonal must be 'hour_of_week' or absent, not {seasonal!r}")
        if not (math.isfinite(outlier_weight) and 0 <= outlier_weight <= 1):
            raise ConfigurationError(
                f"outlier_weight must be within [0, 1], not {outlier_weight!r}"
            )
        self._judge = _Judge(threshold, direction, relative_floor, absolute_floor, name)
        self.alpha = 1 - 0.5 ** (1 / half_life)
        self.min_samples = min_samples
        self.seasonal = seasonal
        self.outlier_weight = outlier_weight
        # key -> [samples seen, mean, variance]; a list so updates need no new object
        self._states: dict[str, list[float]] = {}

    def _key(self, window_start_ms: int) -> tuple[str, str]:
        if self.seasonal is None:
            return _GLOBAL, ""
        hour = hour_of_week(window_start_ms)
        return str(hour), f" for {describe_hour(hour)}"

    def observe(self, window_start_ms: int, value: float) -> Verdict:
        """Judge ``value`` against the history before it, then learn from it.

        Raises:
            InvalidInputError: The value is NaN or infinite.
        """
        _check_value(value)
        key, where = self._key(window_start_ms)
        state = self._states.get(key)
        if state is None:
            self._states[key] = [1, value, 0.0]
            return self._judge.warming(value, value, 0, self.min_samples, where)
        seen, mean, variance = int(state[0]), state[1], state[2]
        if seen < self.min_samples:
            verdict = self._judge.warming(value, mean, seen, self.min_samples, where)
        else:
            verdict = self._judge.verdict(value, mean, math.sqrt(variance), where)
        alpha = self.alpha * (self.outlier_weight if verdict.anomalous else 1.0)
        # Incremental EWMA variance (West 1979): no history of values is kept.
        diff = value - mean
        step = alpha * diff
        state[:] = [seen + 1, mean + step, (1 - alpha) * (variance + diff * step)]
        return verdict

    def snapshot(self) -> dict[str, Any]:
        """Return the learnt state as JSON-able data."""
        states = {key: list(state) for key, state in self._states.items()}
        return {"kind": "ewma", "seasonal": self.seasonal, "states": states}

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """Replace the learnt state with one from ``snapshot``.

        Raises:
            InvalidInputError: The snapshot is not one of an EWMA detector of this shape.
        """
        if snapshot.get("kind") != "ewma" or snapshot.get("seasonal") != self.seasonal:
            raise _snapshot_error("ewma", "kind or seasonality differ from this detector")
        states: dict[str, list[float]] = {}
        for key, state in dict(snapshot.get("states", {})).items():
            valid_key = key == _GLOBAL if self.seasonal is None else key in _HOUR_KEYS
            if not (valid_key and _is_ewma_state(state)):
                raise _snapshot_error("ewma", f"bad state {key!r}: {state!r}")
            states[key] = [int(state[0]), float(state[1]), float(state[2])]
        self._states = states


_HOUR_KEYS = frozenset(str(hour) for hour in range(HOURS_PER_WEEK))


def _is_ewma_state(state: object) -> bool:
    if not isinstance(state, list | tuple) or len(state) != 3:
        return False
    if not all(isinstance(part, int | float) and not isinstance(part, bool) for part in state):
        return False
    return state[0] >= 1 and all(math.isfinite(part) for part in state) and state[2] >= 0


class MadDetector:
    """Median and scaled MAD (a modified z-score) over the last ``window`` values.

    Every value joins the window, anomalous or not: the median ignores a few outliers
    by construction, so no down-weighting is needed.
    """

    def __init__(
        self,
        window: int = 60,
        threshold: float = 3.5,
        min_samples: int = 20,
        direction: Direction = "both",
        relative_floor: float = 0.05,
        absolute_floor: float = 1e-6,
        name: str = "value",
    ) -> None:
        """Set the detector up; raises ConfigurationError on a bad setting."""
        _min_samples(min_samples)
        if min_samples > window:
            raise ConfigurationError(
                f"min_samples ({min_samples}) cannot exceed the window ({window})"
            )
        self._judge = _Judge(threshold, direction, relative_floor, absolute_floor, name)
        self.window = window
        self.min_samples = min_samples
        self._values: deque[float] = deque(maxlen=window)

    def observe(self, window_start_ms: int, value: float) -> Verdict:
        """Judge ``value`` against the last ``window`` values, then add it to them.

        ``window_start_ms`` is accepted for a common signature; MAD has no seasonality.

        Raises:
            InvalidInputError: The value is NaN or infinite.
        """
        _check_value(value)
        history = self._values
        centre = statistics.median(history) if history else value
        if len(history) < self.min_samples:
            verdict = self._judge.warming(value, centre, len(history), self.min_samples, "")
        else:
            mad = statistics.median(abs(past - centre) for past in history)
            verdict = self._judge.verdict(value, centre, MAD_SCALE * mad, "")
        history.append(value)
        return verdict

    def snapshot(self) -> dict[str, Any]:
        """Return the window of values as JSON-able data."""
        return {"kind": "mad", "values": list(self._values)}

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """Replace the window of values with one from ``snapshot``.

        Raises:
            InvalidInputError: The snapshot is not one of a MAD detector.
        """
        values = snapshot.get("values")
        if snapshot.get("kind") != "mad" or not isinstance(values, list):
            raise _snapshot_error("mad", "kind is not 'mad' or values are missing")
        if not all(_is_finite_number(value) for value in values):
            raise _snapshot_error("mad", "values must be finite numbers")
        # A longer saved window (the setting shrank) keeps its newest values.
        self._values = deque((float(value) for value in values), maxlen=self.window)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


Detector = EwmaDetector | MadDetector
_COMMON_KEYS = {"threshold", "min_samples", "direction", "relative_floor", "absolute_floor"}
_KEYS: dict[str, set[str]] = {
    "ewma": _COMMON_KEYS | {"half_life", "seasonal", "outlier_weight"},
    "mad": _COMMON_KEYS | {"window"},
}
_INTEGER_KEYS = {"min_samples", "window"}
_TEXT_KEYS = {"direction", "seasonal"}


def parse_detector(spec: Mapping[str, Any], name: str = "value") -> Detector:
    """Build a detector from a rule's JSON, e.g. ``{"kind": "mad", "window": 60}``.

    Args:
        spec: ``kind`` ("ewma" or "mad") and that detector's settings.
        name: What the value is called in the verdict's reason, e.g. "count".

    Raises:
        ConfigurationError: Unknown kind or key, or a setting of the wrong type or range.
    """
    kind = spec.get("kind")
    if kind not in _KEYS:
        raise ConfigurationError(f"detector kind must be 'ewma' or 'mad', not {kind!r}")
    unknown = sorted(set(spec) - _KEYS[kind] - {"kind"})
    if unknown:
        allowed = ", ".join(sorted(_KEYS[kind]))
        raise ConfigurationError(f"unknown {kind} detector keys {unknown}; allowed: {allowed}")
    settings = {key: _setting(key, value) for key, value in spec.items() if key != "kind"}
    if kind == "ewma":
        return EwmaDetector(**settings, name=name)
    return MadDetector(**settings, name=name)


def _setting(key: str, value: object) -> Any:
    if key in _TEXT_KEYS:
        if value is not None and not isinstance(value, str):
            raise ConfigurationError(f"{key} must be text, not {value!r}")
        return value
    # bool is an int in Python, but "threshold": true is a mistake, not a 1.
    wanted = int if key in _INTEGER_KEYS else int | float
    if isinstance(value, bool) or not isinstance(value, wanted):
        kind = "a whole number" if key in _INTEGER_KEYS else "a number"
        raise ConfigurationError(f"{key} must be {kind}, not {value!r}")
    return value
