"""The incident lifecycle of the alerting service: open, deduplicate, silence, resolve.

Rule evaluation emits a :class:`Signal` per (tenant, rule, group) each time it looks:
the condition holds (``firing``) or no longer holds. :class:`IncidentBook` folds those
signals into incidents and says which :class:`Notification` the channels must send, so
that a condition that keeps firing pages once, not once per evaluation.

Nothing here reads the clock or sends anything: times come in as epoch milliseconds
and the notifications go out as values, which makes a replay of the same signals yield
the same incidents, ids included.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

from core.exceptions import ConfigurationError, InvalidInputError

State = Literal["firing", "acknowledged", "resolved"]
Kind = Literal["trigger", "acknowledge", "resolve"]
STATES: tuple[str, ...] = get_args(State)
SNAPSHOT_VERSION = 1

_Key = tuple[str, str, str]


@dataclass(frozen=True)
class Signal:
    """One evaluation of one rule for one group: the condition holds or it does not."""

    tenant: str
    rule_id: str
    group_key: str
    firing: bool
    at_ms: int
    summary: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> _Key:
        return (self.tenant, self.rule_id, self.group_key)


def incident_id(tenant: str, rule_id: str, group_key: str, opened_ms: int) -> str:
    """Returns a short id that depends only on what opened the incident.

    A restarted or replaying worker must produce the same id, because the id is the
    dedup key the channels use to match the trigger with its acknowledge and resolve.
    """
    # The unit separator cannot occur in sane names, so ("a", "bc") != ("ab", "c").
    raw = "\x1f".join((tenant, rule_id, group_key, str(opened_ms)))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@dataclass
class Incident:
    """A condition that started firing and has not been (or has just been) resolved."""

    id: str
    tenant: str
    rule_id: str
    group_key: str
    state: State
    opened_ms: int
    updated_ms: int
    resolved_ms: int | None = None
    last_summary: str = ""
    occurrences: int = 1
    acknowledged_by: str | None = None
    acknowledged_ms: int | None = None
    # True when a silence matched at opening: the trigger was never sent, so neither
    # may an acknowledge or a resolve be (the receiver would not know the incident).
    silenced: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> Incident:
        return replace(self, details=dict(self.details))


@dataclass(frozen=True)
class Notification:
    """What one channel message is about; the payload builders live in core.notify."""

    kind: Kind
    incident: Incident

    @property
    def dedup_key(self) -> str:
        return self.incident.id


@dataclass(frozen=True)
class Silence:
    """Mutes new incidents of one tenant that match, while ``starts_ms <= t < ends_ms``.

    A matcher left at None matches any value; given matchers must match exactly.
    """

    tenant: str
    starts_ms: int
    ends_ms: int
    rule_id: str | None = None
    group_key: str | None = None
    comment: str = ""

    def __post_init__(self) -> None:
        if self.ends_ms <= self.starts_ms:
            raise ConfigurationError(
                f"silence for tenant {self.tenant!r} ends ({self.ends_ms}) "
                f"before it starts ({self.starts_ms})"
            )

    def matches(self, signal: Signal) -> bool:
        """True when the silence is active at the signal's time and every matcher fits."""
        return (
            signal.tenant == self.tenant
            and self.starts_ms <= signal.at_ms < self.ends_ms
            and self.rule_id in (None, signal.rule_id)
            and self.group_key in (None, signal.group_key)
        )


def _silenced(signal: Signal, silences: Sequence[Silence]) -> bool:
    return any(s.matches(signal) for s in silences)


@dataclass
class IncidentBook:
    """The open incidents, keyed by (tenant, rule_id, group_key)."""

    _open: dict[_Key, Incident] = field(default_factory=dict)
    # When each key last resolved: a late firing signal from before that moment must not
    # open a new incident for a condition already known to be over.
    _resolved_at: dict[_Key, int] = field(default_factory=dict)

    def apply(self, signal: Signal, silences: Sequence[Silence] = ()) -> list[Notification]:
        """Folds one signal in and returns the notifications it calls for (maybe none)."""
        current = self._open.get(signal.key)
        # A late signal describes the past: letting it win would reopen or resolve an
        # incident on stale information.
        if signal.at_ms < self._watermark(signal.key, current):
            return []
        if signal.firing:
            if current is None:
                return self._open_incident(signal, silences)
            return self._fold(current, signal, silences)
        if current is None:
            return []
        return self._resolve(current, signal)

    def acknowledge(self, incident_id: str, by: str, at_ms: int) -> list[Notification]:
        """Marks an open incident acknowledged; only the first acknowledge notifies.

        Raises:
            InvalidInputError: no open incident has this id (unknown or already resolved).
        """
        incident = self.get(incident_id)
        if incident is None:
            raise InvalidInputError(f"no open incident with id {incident_id!r}")
        if incident.state == "acknowledged":
            return []
        incident.state = "acknowledged"
        incident.acknowledged_by = by
        # updated_ms stays the time of the last signal: it orders signals, and a human's
        # click, stamped by another clock, must not make the next signals look late.
        incident.acknowledged_ms = at_ms
        return self._notify("acknowledge", incident)

    def _watermark(self, key: _Key, current: Incident | None) -> int:
        if current is not None:
            return current.updated_ms
        return self._resolved_at.get(key, -(2**63))

    def get(self, incident_id: str) -> Incident | None:
        """Returns the open incident with this id, the live object, or None."""
        return next((i for i in self._open.values() if i.id == incident_id), None)

    def open_incidents(self) -> list[Incident]:
        """Copies of the open incidents, oldest first."""
        return sorted((i.copy() for i in self._open.values()), key=lambda i: i.opened_ms)

    def snapshot(self) -> dict[str, Any]:
        """Plain, JSON-able data that :meth:`restore` turns back into this book."""
        return {
            "version": SNAPSHOT_VERSION,
            "incidents": [asdict(i) for i in self.open_incidents()],
            "resolved_at": [[*key, at] for key, at in sorted(self._resolved_at.items())],
        }

    @classmethod
    def restore(cls, data: Mapping[str, Any]) -> IncidentBook:
        """Rebuilds a book from :meth:`snapshot` output.

        Raises:
            InvalidInputError: the data is not a snapshot this version understands.
        """
        version = data.get("version")
        if version != SNAPSHOT_VERSION:
            raise InvalidInputError(f"unsupported incident snapshot version {version!r}")
        book = cls()
        for raw in data.get("incidents", []):
            incident = _incident_from(raw)
            book._open[(incident.tenant, incident.rule_id, incident.group_key)] = incident
        for tenant, rule_id, group_key, at_ms in data.get("resolved_at", []):
            book._resolved_at[(str(tenant), str(rule_id), str(group_key))] = int(at_ms)
        return book

    def _open_incident(self, signal: Signal, silences: Sequence[Silence]) -> list[Notification]:
        incident = Incident(
            id=incident_id(signal.tenant, signal.rule_id, signal.group_key, signal.at_ms),
            tenant=signal.tenant,
            rule_id=signal.rule_id,
            group_key=signal.group_key,
            state="firing",
            opened_ms=signal.at_ms,
            updated_ms=signal.at_ms,
            last_summary=signal.summary,
            silenced=_silenced(signal, silences),
            details=dict(signal.details),
        )
        self._open[signal.key] = incident
        return self._notify("trigger", incident)

    def _fold(
        self, incident: Incident, signal: Signal, silences: Sequence[Silence]
    ) -> list[Notification]:
        incident.occurrences += 1
        incident.updated_ms = signal.at_ms
        incident.last_summary = signal.summary
        incident.details = dict(signal.details)
        # A silence that ran out while the condition still holds must not hide it for
        # ever: the first firing signal after it ends sends the trigger that was held.
        if incident.silenced and not _silenced(signal, silences):
            incident.silenced = False
            return self._notify("trigger", incident)
        return []

    def _resolve(self, incident: Incident, signal: Signal) -> list[Notification]:
        del self._open[signal.key]
        self._resolved_at[signal.key] = signal.at_ms
        incident.state = "resolved"
        incident.updated_ms = signal.at_ms
        incident.resolved_ms = signal.at_ms
        if signal.summary:
            incident.last_summary = signal.summary
        return self._notify("resolve", incident)

    @staticmethod
    def _notify(kind: Kind, incident: Incident) -> list[Notification]:
        # A silenced incident never reached the channels: nothing to send about it.
        if incident.silenced:
            return []
        # A copy, so that later signals do not rewrite a notification already queued.
        return [Notification(kind=kind, incident=incident.copy())]


def _incident_from(raw: Any) -> Incident:
    if not isinstance(raw, Mapping):
        raise InvalidInputError(f"incident snapshot entry is not an object: {raw!r}")
    try:
        incident = Incident(**raw)
    except TypeError as exc:
        raise InvalidInputError(f"incident snapshot entry is malformed: {exc}") from exc
    if incident.state not in STATES:
        raise InvalidInputError(f"incident {incident.id!r} has unknown state {incident.state!r}")
    incident.details = dict(incident.details)
    return incident


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of a channel send, with capped exponential backoff and full jitter."""

    attempts: int = 5
    base_ms: int = 500
    max_ms: int = 60_000

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError(f"retry attempts must be at least 1, got {self.attempts}")
        if not 0 < self.base_ms <= self.max_ms:
            raise ConfigurationError(
                f"retry delays need 0 < base_ms <= max_ms, got {self.base_ms} and {self.max_ms}"
            )

    def next_delay_ms(self, attempt: int, random_unit: float) -> int | None:
        """Returns the wait before the next try, or None when no try is left.

        Args:
            attempt: how many tries have been made and failed so far (1 after the first).
            random_unit: a uniform draw from [0, 1), passed in so that tests can pin it.
        """
        if attempt < 1:
            raise ValueError(f"attempt counts from 1, got {attempt}")
        if not 0.0 <= random_unit < 1.0:
            raise ValueError(f"random_unit must be in [0, 1), got {random_unit}")
        if attempt >= self.attempts:
            return None
        # Full jitter: a uniform wait under the exponential ceiling spreads the retries of
        # many failing sends instead of having them hit the endpoint in lockstep.
        ceiling = min(self.max_ms, self.base_ms * 2 ** (attempt - 1))
        return int(random_unit * ceiling)

    @staticmethod
    def retryable(status: int | None) -> bool:
        """True when a failed send may succeed later: network errors, 429 and 5xx.

        Other 4xx mean the request itself is wrong (a bad key, a bad body); repeating it
        only delays the error report.
        """
        if status is None:
            return True
        return status == 429 or 500 <= status <= 599
