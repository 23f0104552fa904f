"""Alert rules judged each time a window closes: threshold, rate of change and anomaly.

A rule names a tenant, an event type, a window and a metric of that window (count, sum,
min, max, avg, distinct or a quantile such as p99), and a condition on it. The
:class:`RuleEvaluator` turns each closed window into :class:`core.incidents.Signal` values
that an :class:`core.incidents.IncidentBook` folds into incidents.

The evaluator reads a finalised view of a window (:class:`WindowLike`): plain numbers, not
the sketches a ``WindowResult`` carries, so that this module depends on nothing heavy.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from core.anomaly import Detector, parse_detector
from core.exceptions import ConfigurationError, InvalidInputError
from core.incidents import Signal

OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
KINDS: tuple[str, ...] = ("threshold", "rate_of_change", "anomaly")
METRICS: tuple[str, ...] = ("count", "sum", "min", "max", "avg", "distinct", "p50", "p90", "p99")
SEVERITIES: tuple[str, ...] = ("critical", "error", "warning", "info")
SNAPSHOT_VERSION = 1
_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_REQUIRED: tuple[str, ...] = ("id", "tenant", "type", "window", "metric", "condition")
_OPTIONAL: tuple[str, ...] = ("group_by", "for_windows", "severity", "summary")
_CONDITION_KEYS: dict[str, set[str]] = {
    "threshold": {"kind", "op", "value"},
    "rate_of_change": {"kind", "op", "percent"},
    "anomaly": {"kind", "detector"},
}


class WindowLike(Protocol):
    """What the evaluator reads of a closed window: finalised numbers, not sketches."""

    @property
    def tenant(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def window(self) -> str: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def group_key(self) -> str: ...
    @property
    def count(self) -> int: ...
    @property
    def sum(self) -> float: ...
    @property
    def min(self) -> float: ...
    @property
    def max(self) -> float: ...
    @property
    def distinct(self) -> float | None: ...
    @property
    def quantiles(self) -> Mapping[str, float] | None: ...


@dataclass(frozen=True)
class Condition:
    """What makes a metric value a breach.

    Attributes:
        kind: "threshold", "rate_of_change" or "anomaly".
        op: The comparison, for threshold and rate_of_change.
        value: The threshold, or the percent change for rate_of_change.
        detector: The anomaly detector's spec as sorted pairs, hashable and comparable.
    """

    kind: str
    op: str = ""
    value: float = 0.0
    detector: tuple[tuple[str, Any], ...] = ()

    def to_spec(self) -> dict[str, Any]:
        """Return the JSON that :func:`parse_alert_rule` reads back into this condition."""
        if self.kind == "anomaly":
            return {"kind": self.kind, "detector": dict(self.detector)}
        key = "value" if self.kind == "threshold" else "percent"
        return {"kind": self.kind, "op": self.op, key: self.value}


@dataclass(frozen=True)
class AlertRule:
    """One rule of one tenant; build it with :func:`parse_alert_rule`."""

    id: str
    tenant: str
    type: str
    window: str
    metric: str
    condition: Condition
    group_by: str | None = None
    for_windows: int = 1
    severity: str = "warning"
    summary: str = ""

    def matches(self, window: WindowLike) -> bool:
        """True when the window is of this rule's tenant, type, window and group."""
        return (
            window.tenant == self.tenant
            and window.type == self.type
            and window.window == self.window
            and self.group_by in (None, window.group_key)
        )

    def to_spec(self) -> dict[str, Any]:
        """Return the rule as JSON, e.g. to store it; parses back to an equal rule."""
        spec: dict[str, Any] = {
            "id": self.id,
            "tenant": self.tenant,
            "type": self.type,
            "window": self.window,
            "metric": self.metric,
            "condition": self.condition.to_spec(),
            "for_windows": self.for_windows,
            "severity": self.severity,
            "summary": self.summary,
        }
        if self.group_by is not None:
            spec["group_by"] = self.group_by
        return spec


def parse_alert_rule(spec: Mapping[str, Any]) -> AlertRule:
    """Build a rule from its JSON (see the module docstring for the fields).

    Raises:
        ConfigurationError: A missing or unknown key or a bad value; the message names
            the field and says what it must be.
    """
    if not isinstance(spec, Mapping):
        raise ConfigurationError(f"an alert rule must be a JSON object, not {spec!r}")
    unknown = sorted(set(spec) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        allowed = ", ".join(_REQUIRED + _OPTIONAL)
        raise ConfigurationError(f"unknown alert rule keys {unknown}; allowed: {allowed}")
    missing = [key for key in _REQUIRED if key not in spec]
    if missing:
        raise ConfigurationError(f"alert rule is missing {missing}; add them")
    metric = _choice("metric", spec["metric"], METRICS)
    return AlertRule(
        id=_rule_id(spec["id"]),
        tenant=_text("tenant", spec["tenant"]),
        type=_text("type", spec["type"]),
        window=_text("window", spec["window"]),
        metric=metric,
        condition=_condition(spec["condition"], metric),
        group_by=None if spec.get("group_by") is None else _text("group_by", spec["group_by"]),
        for_windows=_for_windows(spec.get("for_windows", 1)),
        severity=_choice("severity", spec.get("severity", "warning"), SEVERITIES),
        summary=_text("summary", spec.get("summary", ""), empty_ok=True),
    )


def _bad(field: str, problem: str) -> ConfigurationError:
    return ConfigurationError(f"alert rule field {field!r} {problem}")


def _rule_id(value: object) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise _bad("id", f"must be 1 to 128 of A-Z a-z 0-9 _ . : -, not {value!r}")
    return value


def _text(field: str, value: object, empty_ok: bool = False) -> str:
    if not isinstance(value, str) or not (value or empty_ok):
        raise _bad(field, f"must be a non-empty text, not {value!r}")
    return value


def _choice(field: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _bad(field, f"must be one of {', '.join(allowed)}, not {value!r}")
    return str(value)


def _number(field: str, value: object) -> float:
    # bool is an int in Python, but "value": true is a mistake, not a 1; NaN never compares.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(field, f"must be a finite number, not {value!r}")
    return float(value)


def _for_windows(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad("for_windows", f"must be a whole number of at least 1, not {value!r}")
    return value


def _condition(spec: object, metric: str) -> Condition:
    if not isinstance(spec, Mapping):
        raise _bad("condition", f"must be an object with a kind, not {spec!r}")
    kind = _choice("condition.kind", spec.get("kind"), KINDS)
    unknown = sorted(set(spec) - _CONDITION_KEYS[kind])
    missing = sorted(_CONDITION_KEYS[kind] - set(spec))
    if unknown or missing:
        allowed = ", ".join(sorted(_CONDITION_KEYS[kind]))
        raise _bad("condition", f"of kind {kind} needs exactly the keys {allowed}")
    if kind == "anomaly":
        return Condition(kind, detector=_detector(spec["detector"], metric))
    op = _choice("condition.op", spec["op"], tuple(OPS))
    key = "value" if kind == "threshold" else "percent"
    return Condition(kind, op=op, value=_number(f"condition.{key}", spec[key]))


def _detector(spec: object, metric: str) -> tuple[tuple[str, Any], ...]:
    if not isinstance(spec, Mapping):
        raise _bad("condition.detector", f"must be an object with a kind, not {spec!r}")
    try:
        parse_detector(spec, name=metric)  # built per group later; parsed now to fail early
    except ConfigurationError as exc:
        raise _bad("condition.detector", f"is invalid: {exc}") from exc
    return tuple(sorted(spec.items()))


def metric_value(window: WindowLike, metric: str) -> float | None:
    """Return the rule's metric of the window, or None when it cannot be evaluated.

    None for: avg of an empty window, a quantile or distinct the window does not carry,
    and any non-finite number (a NaN would compare false and never alert or resolve).
    """
    if metric == "avg":
        value: float | None = window.sum / window.count if window.count else None
    elif metric == "distinct":
        value = window.distinct
    elif metric.startswith("p"):
        value = (window.quantiles or {}).get(metric)
    else:
        value = float(getattr(window, metric))
    return value if value is not None and math.isfinite(value) else None


def percent_change(previous: float, current: float) -> float:
    """Return the signed change from previous to current in percent of ``|previous|``.

    From 0 the ratio is undefined: 0 to 0 is no change (0.0), 0 to anything else is an
    infinite change of that sign, so a rise from nothing breaches every "> x" rule.
    """
    if previous == 0:
        return 0.0 if current == 0 else math.copysign(math.inf, current)
    return (current - previous) / abs(previous) * 100


def _fmt(value: float) -> str:
    # Two decimals at most, none for whole numbers, like the anomaly reasons: "31.5", "30".
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _clock(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%H:%M")


@dataclass
class _GroupState:
    """What one rule remembers of one group between windows."""

    last_start: int | None = None
    previous: float | None = None
    streak: int = 0
    detector: Detector | None = None


@dataclass(frozen=True)
class _Judgement:
    breached: bool
    text: str
    details: dict[str, Any]


def _judge(rule: AlertRule, state: _GroupState, start: int, value: float) -> _Judgement | None:
    cond = rule.condition
    if cond.kind == "threshold":
        breached = OPS[cond.op](value, cond.value)
        words = cond.op if breached else f"not {cond.op}"
        text = f"{rule.metric} {_fmt(value)} {words} {_fmt(cond.value)}"
        return _Judgement(breached, text, {"expected": cond.value})
    if cond.kind == "rate_of_change":
        previous, state.previous = state.previous, value
        return None if previous is None else _judge_rate(rule, previous, value)
    if state.detector is None:
        state.detector = parse_detector(dict(cond.detector), name=rule.metric)
    verdict = state.detector.observe(start, value)
    details = {
        "expected": verdict.expected,
        "score": verdict.score,
        "warming_up": verdict.warming_up,
    }
    return _Judgement(verdict.anomalous, verdict.reason, details)


def _judge_rate(rule: AlertRule, previous: float, value: float) -> _Judgement:
    cond = rule.condition
    change = percent_change(previous, value)
    breached = OPS[cond.op](change, cond.value)
    # Infinity is not JSON: a change from zero is reported as None and said in words.
    finite = change if math.isfinite(change) else None
    said = f"{change:+.1f}%" if finite is not None else "from zero"
    words = cond.op if breached else f"not {cond.op}"
    text = (
        f"{rule.metric} changed {said} ({_fmt(previous)} to {_fmt(value)}), "
        f"{words} {_fmt(cond.value)}%"
    )
    return _Judgement(
        breached, text, {"expected": cond.value, "previous": previous, "change_percent": finite}
    )


class RuleEvaluator:
    """Holds the rules and each (rule, group)'s state, and judges closed windows."""

    def __init__(self, rules: Iterable[AlertRule] = ()) -> None:
        """Start with ``rules``; raises ConfigurationError on a duplicate rule id."""
        self._rules: dict[tuple[str, str], AlertRule] = {}
        self._states: dict[tuple[str, str, str], _GroupState] = {}
        self.set_rules(rules)

    @property
    def rules(self) -> list[AlertRule]:
        """The current rules, by tenant then id."""
        return [self._rules[key] for key in sorted(self._rules)]

    def set_rules(self, rules: Iterable[AlertRule]) -> None:
        """Replace the rules; a rule whose spec is unchanged keeps its state.

        Raises:
            ConfigurationError: Two rules of one tenant share an id.
        """
        new: dict[tuple[str, str], AlertRule] = {}
        for rule in rules:
            if (rule.tenant, rule.id) in new:
                raise ConfigurationError(f"rule id {rule.id!r} used twice for {rule.tenant!r}")
            new[(rule.tenant, rule.id)] = rule
        # A changed rule restarts: its streak and baseline were built under other terms.
        self._states = {
            key: state
            for key, state in self._states.items()
            if key[:2] in new and new[key[:2]] == self._rules.get(key[:2])
        }
        self._rules = new

    def on_window(self, window: WindowLike) -> list[Signal]:
        """Judge one closed window against every rule it matches.

        A rule emits a firing signal once breached for ``for_windows`` consecutive
        windows, and a non-firing one when not breached; nothing while a breach is still
        counting up, on a rate rule's first window, or when the metric is missing.
        Windows no later than the last one seen for that rule and group are ignored, so a
        replay after a crash neither double-counts a streak nor feeds a detector twice.
        """
        signals = []
        for rule in self.rules:
            if rule.matches(window):
                signal = self._evaluate(rule, window)
                if signal is not None:
                    signals.append(signal)
        return signals

    def _evaluate(self, rule: AlertRule, window: WindowLike) -> Signal | None:
        value = metric_value(window, rule.metric)
        if value is None:
            return None
        state = self._states.setdefault((rule.tenant, rule.id, window.group_key), _GroupState())
        if state.last_start is not None and window.start <= state.last_start:
            return None
        state.last_start = window.start
        judgement = _judge(rule, state, window.start, value)
        if judgement is None:
            return None
        state.streak = state.streak + 1 if judgement.breached else 0
        if judgement.breached and state.streak < rule.for_windows:
            return None
        return _signal(rule, window, value, judgement)

    def snapshot(self) -> dict[str, Any]:
        """Return every (rule, group) state as JSON-able data, detectors included."""
        entries = [
            {
                "rule": self._rules[key[:2]].to_spec(),
                "group_key": key[2],
                "last_start": state.last_start,
                "previous": state.previous,
                "streak": state.streak,
                "detector": None if state.detector is None else state.detector.snapshot(),
            }
            for key, state in sorted(self._states.items())
        ]
        return {"version": SNAPSHOT_VERSION, "states": entries}

    def restore(self, data: Mapping[str, Any]) -> None:
        """Replace the state with a :meth:`snapshot`'s, for the rules set now.

        States of rules that are gone or whose spec changed since are dropped.

        Raises:
            InvalidInputError: The data is not a snapshot this version understands.
        """
        if data.get("version") != SNAPSHOT_VERSION:
            raise InvalidInputError(f"unsupported alert rule snapshot {data.get('version')!r}")
        states: dict[tuple[str, str, str], _GroupState] = {}
        for raw in data.get("states", []):
            try:
                restored = self._restore_entry(raw)
            except (KeyError, TypeError, ValueError, ConfigurationError) as exc:
                raise InvalidInputError(f"bad alert rule state {raw!r}: {exc}") from exc
            if restored is not None:
                states[restored[0]] = restored[1]
        self._states = states

    def _restore_entry(self, raw: Any) -> tuple[tuple[str, str, str], _GroupState] | None:
        spec = raw["rule"]
        rule = self._rules.get((spec["tenant"], spec["id"]))
        if rule is None or rule.to_spec() != spec:
            return None
        state = _GroupState(
            last_start=None if raw["last_start"] is None else int(raw["last_start"]),
            previous=None if raw["previous"] is None else float(raw["previous"]),
            streak=int(raw["streak"]),
        )
        if raw["detector"] is not None:
            state.detector = parse_detector(dict(rule.condition.detector), name=rule.metric)
            state.detector.restore(raw["detector"])
        return (rule.tenant, rule.id, str(raw["group_key"])), state


def _signal(rule: AlertRule, window: WindowLike, value: float, judgement: _Judgement) -> Signal:
    group = window.group_key.replace("\x1f", ", ")
    where = f" ({group})" if group else ""
    text = (
        f"{judgement.text} for {window.type}{where}, "
        f"window {_clock(window.start)}–{_clock(window.end)} UTC"
    )
    details = {
        "severity": rule.severity,
        "metric": rule.metric,
        "value": value,
        "condition": rule.condition.kind,
        "window_start": window.start,
        "window_end": window.end,
        **judgement.details,
    }
    return Signal(
        tenant=rule.tenant,
        rule_id=rule.id,
        group_key=window.group_key,
        firing=judgement.breached,
        at_ms=window.end,
        summary=f"{rule.summary}: {text}" if rule.summary else text,
        details=details,
    )
