"""Alert rules of kind ``cep``: incidents from the matches of a CEP rule.

The partition workers publish every CEP match (``core.cep.Match.as_json``) to the
``alerts`` topic. A ``cep`` alert rule names a CEP rule id; each match of it, for the
rule's tenant, is a firing :class:`core.incidents.Signal` for the group ``match["key"]``.
Matches of one key while its incident is open fold into that incident (one page, not
one per match). The incident resolves once no match of that key came for
``quiet_minutes``: the resolve signal is stamped ``last match + quiet`` and sent as soon
as the engine's clock passes that time.

Spec::

    {"id": "fraud-burst", "tenant": "acme",
     "condition": {"kind": "cep", "rule_id": "card-velocity", "quiet_minutes": 10},
     "severity": "critical", "summary": "Card velocity"}

``severity`` is optional: without it, the match's own severity is used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from core.alert_rules import SEVERITIES, AlertRule, parse_alert_rule
from core.exceptions import ConfigurationError, InvalidInputError
from core.incidents import Signal

MINUTE_MS = 60_000
SNAPSHOT_VERSION = 1
_KEYS = {"id", "tenant", "condition", "severity", "summary"}
_CONDITION_KEYS = {"kind", "rule_id", "quiet_minutes"}


@dataclass(frozen=True)
class CepAlertRule:
    """An alert rule on the matches of one CEP rule; build it with :func:`parse_rule_spec`."""

    id: str
    tenant: str
    cep_rule_id: str
    quiet_minutes: int = 5
    severity: str | None = None
    summary: str = ""

    def to_spec(self) -> dict[str, Any]:
        """Return the rule as JSON; parses back to an equal rule."""
        spec: dict[str, Any] = {
            "id": self.id,
            "tenant": self.tenant,
            "condition": {
                "kind": "cep",
                "rule_id": self.cep_rule_id,
                "quiet_minutes": self.quiet_minutes,
            },
            "summary": self.summary,
        }
        if self.severity is not None:
            spec["severity"] = self.severity
        return spec


AnyRule = AlertRule | CepAlertRule


def parse_rule_spec(spec: Mapping[str, Any]) -> AnyRule:
    """Build a window rule (:func:`core.alert_rules.parse_alert_rule`) or a ``cep`` rule.

    Raises:
        ConfigurationError: The spec is invalid; the message names the field.
    """
    condition = spec.get("condition") if isinstance(spec, Mapping) else None
    if isinstance(condition, Mapping) and condition.get("kind") == "cep":
        return _parse_cep(spec, condition)
    return parse_alert_rule(spec)


def _bad(field: str, problem: str) -> ConfigurationError:
    return ConfigurationError(f"alert rule field {field!r} {problem}")


def _parse_cep(spec: Mapping[str, Any], condition: Mapping[str, Any]) -> CepAlertRule:
    unknown = sorted(set(spec) - _KEYS)
    if unknown:
        raise ConfigurationError(
            f"unknown keys {unknown} for a cep alert rule; allowed: {', '.join(sorted(_KEYS))}"
        )
    bad_keys = sorted(set(condition) - _CONDITION_KEYS)
    if bad_keys or "rule_id" not in condition:
        raise _bad("condition", "of kind cep needs rule_id and may have quiet_minutes")
    # The window fields are the same as for every rule: reuse their checks.
    base = parse_alert_rule(
        {
            "id": spec.get("id"),
            "tenant": spec.get("tenant"),
            "type": "cep",
            "window": "cep",
            "metric": "count",
            "condition": {"kind": "threshold", "op": ">", "value": 0},
            "severity": spec.get("severity", "warning"),
            "summary": spec.get("summary", ""),
        }
    )
    rule_id = condition["rule_id"]
    if not isinstance(rule_id, str) or not rule_id:
        raise _bad("condition.rule_id", f"must be a CEP rule id, not {rule_id!r}")
    quiet = condition.get("quiet_minutes", 5)
    if isinstance(quiet, bool) or not isinstance(quiet, int) or not 1 <= quiet <= 10_080:
        raise _bad("condition.quiet_minutes", f"must be a whole number 1..10080, not {quiet!r}")
    return CepAlertRule(
        id=base.id,
        tenant=base.tenant,
        cep_rule_id=rule_id,
        quiet_minutes=quiet,
        severity=spec.get("severity"),
        summary=base.summary,
    )


class CepAlertTracker:
    """Turns CEP matches into signals and resolves keys that went quiet."""

    def __init__(self, rules: Iterable[CepAlertRule] = ()) -> None:
        self._rules: list[CepAlertRule] = []
        # (tenant, alert rule id, key) -> event time of the newest match.
        self._last: dict[tuple[str, str, str], int] = {}
        self.set_rules(rules)

    def set_rules(self, rules: Iterable[CepAlertRule]) -> None:
        """Replace the rules; keys of rules that are gone are forgotten."""
        self._rules = sorted(rules, key=lambda r: (r.tenant, r.id))
        ids = {(r.tenant, r.id) for r in self._rules}
        self._last = {k: v for k, v in self._last.items() if k[:2] in ids}

    def on_match(self, match: Mapping[str, Any]) -> list[Signal]:
        """Firing signals for one CEP match (``Match.as_json``), one per rule that wants it.

        Raises:
            InvalidInputError: The match lacks tenant, rule_id, key or ts.
        """
        try:
            tenant, cep_rule = str(match["tenant"]), str(match["rule_id"])
            key, ts = str(match["key"]), int(match["ts"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"CEP match {match!r} is malformed: {exc}") from exc
        signals = []
        for rule in self._rules:
            if rule.tenant != tenant or rule.cep_rule_id != cep_rule:
                continue
            slot = (rule.tenant, rule.id, key)
            self._last[slot] = max(ts, self._last.get(slot, ts))
            signals.append(_firing(rule, match, key, ts))
        return signals

    def due(self, now_ms: int) -> list[Signal]:
        """Resolve signals for every key without a match for its rule's quiet time."""
        quiet = {(r.tenant, r.id): r.quiet_minutes * MINUTE_MS for r in self._rules}
        signals = []
        for slot, last in sorted(self._last.items()):
            ends = last + quiet[slot[:2]]
            if now_ms >= ends:
                del self._last[slot]
                minutes = quiet[slot[:2]] // MINUTE_MS
                text = f"no match for {minutes} min"
                signals.append(Signal(*slot, firing=False, at_ms=ends, summary=text))
        return signals

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state for :meth:`restore`."""
        return {"version": SNAPSHOT_VERSION, "last": [[*k, v] for k, v in self._last.items()]}

    def restore(self, data: Mapping[str, Any]) -> None:
        """Take back a :meth:`snapshot`, for the rules set now; an empty one is a fresh start.

        Raises:
            InvalidInputError: The data is not a snapshot this version understands.
        """
        if not data:
            self._last = {}
            return
        if data.get("version") != SNAPSHOT_VERSION:
            raise InvalidInputError(f"unsupported CEP alert snapshot {data.get('version')!r}")
        ids = {(r.tenant, r.id) for r in self._rules}
        self._last = {
            (str(t), str(r), str(k)): int(v) for t, r, k, v in data.get("last", []) if (t, r) in ids
        }


def _firing(rule: CepAlertRule, match: Mapping[str, Any], key: str, ts: int) -> Signal:
    severity = rule.severity or match.get("severity")
    text = f"CEP rule {rule.cep_rule_id} matched for {key}"
    detail = match.get("detail")
    return Signal(
        tenant=rule.tenant,
        rule_id=rule.id,
        group_key=key,
        firing=True,
        at_ms=ts,
        summary=f"{rule.summary}: {text}" if rule.summary else text,
        details={
            **(dict(detail) if isinstance(detail, Mapping) else {}),
            "severity": severity if severity in SEVERITIES else "warning",
            "condition": "cep",
            "cep_rule_id": rule.cep_rule_id,
            "alert_id": match.get("alert_id"),
            "event_ids": list(match.get("event_ids", [])),
        },
    )
