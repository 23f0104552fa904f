"""Complex event processing: threshold, sequence and absence rules, in event time.

One :class:`CepEngine` runs next to one Kafka partition's worker. The worker hands it
each micro-batch with :meth:`CepEngine.on_events`, then the partition's watermark after
the batch with :meth:`CepEngine.on_watermark`, which returns the matches. Times are
integer epoch milliseconds of event time; the engine never reads a clock.

Rules
=====

A rule is a mapping (YAML or JSON, one row of the rules table) parsed by
:func:`parse_rule`, strictly: an unknown field, a wrong type or a bad value raises
:class:`RuleError`, whose message names the rule, the field, what was expected and what
came. :func:`load_rules` parses a whole table, keeping the good rules. Durations are
strings such as ``500ms``, ``30s``, ``5m``, ``2h`` or ``1d``, or integer milliseconds;
a parsed rule holds them as integer milliseconds.

Fields of every rule:

=========== ========= ================================================================
field       default   meaning
=========== ========= ================================================================
id          required  ``[A-Za-z0-9_.:-]{1,128}``, unique in the table
kind        required  ``threshold``, ``sequence`` or ``absence``
tenant      null      only events of this tenant; null: every tenant, each on its own
key         entity    the event field naming the entity the rule follows: a top-level
                      field (``entity``, ``source``, ``event_id``...) or
                      ``attributes.<name>``; an event without it is ignored
cooldown    0         after a match for (rule, tenant, key value) at time t, the next
                      candidate for that triple matches only when its time is >= t +
                      cooldown; the ones before are dropped (and counted)
severity    warning   ``info``, ``warning`` or ``critical``, copied into the match
description null      free text for people
=========== ========= ================================================================

``threshold`` (``type``, ``window``, ``agg``, ``op``, ``value``, ``max_event_ids``
default 100): events of ``type`` fold, per tenant and key value, into tumbling windows
``[k*window, (k+1)*window)``; ``agg`` is ``count``, ``sum``, ``avg``, ``min`` or ``max`` of
the events' ``value``. When the watermark reaches the window's end the window is final:
if ``agg op value`` holds it matches at the window's end, carrying the ids of its first
``max_event_ids`` events (in arrival order) and the count of all. A key with no event in
a window is not evaluated at all, so ``count < 3`` never fires for a silent entity:
silence is what ``absence`` rules are for.

``sequence`` (``first``, ``then``, ``within``): an event A of type ``first`` followed by
an event B of type ``then`` of the same tenant and key value, with
``A.ts <= B.ts <= A.ts + within``, matches at ``B.ts`` carrying both ids. Only the most
recent pending A of a key is kept (a newer A replaces it), and a match uses its A up,
so A A B gives one match, A B B one too. When ``first`` equals ``then``, events pair
up: the second of two within ``within`` closes the sequence the first opened. A pending
A expires once the watermark passes ``A.ts + within``.

``absence`` (``type``, ``within``): once an event A of ``type`` has been seen for a
tenant and key value, the next one is expected at most ``within`` later. When none
comes with ``ts <= last_A.ts + within`` and the watermark passes that time, a match at
``last_A.ts + within`` carries the last A's id, and the key is forgotten until its next
A.

Event time and watermarks
=========================

Every match is final when it comes out, because the engine decides only about event
time the watermark has passed. An event with ``ts`` below the watermark last given is
*late*: the engine ignores it and counts it in :attr:`CepEngine.stats`. (The worker's own
filter judges lateness per aggregation window and may let such an event through; the
engine drops it so that a closed window or a fired absence is never contradicted.) An
event at the watermark is on time, so "the watermark passes t" means it is above t.

Sequence and absence events wait in a buffer until the watermark passes them and are
then taken in event-time order (at equal times a sequence's A before its B, otherwise
in arrival order). So events may arrive in any order, within a batch or across batches:
as long as none is late, the matches do not depend on that order or on how the stream
was cut into batches (only a threshold's list of event ids follows arrival order). The
cost is latency: a sequence matches only once the watermark passes B, which is the
allowed lateness after B.

Matches of one call come sorted by (time, rule id, tenant, key value, event ids). Each
carries an ``alert_id``, a hash of the rule id, tenant, key value and time (and, for a
sequence, the two event ids), so a replay produces the same ids and a consumer can drop
the repeats.

State
=====

State lives per rule and per (tenant, key value): open threshold windows, buffered
events, pending sequences, last absence events, running cooldowns. Each part goes
when the watermark passes its end, so memory follows the allowed lateness and the
rules' windows, not the length of the run; ``len(engine)`` counts the entries.
:meth:`CepEngine.snapshot` gives plain JSON-able data and :meth:`CepEngine.restore`
takes it back: a restored engine fed the same events and watermarks gives the same
matches as one never interrupted. :meth:`CepEngine.set_rules` swaps the rules in place,
keeping the state of each rule whose spec is unchanged and starting changed or new rules
empty; a restore does the same against the specs saved in the snapshot.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import operator
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

SNAPSHOT_VERSION = 1
Group = tuple[str, str]  # (tenant, key value): what keyed state is kept per

# ---------------------------------------------------------------------------- rules

_DURATION_RE = re.compile(r"(\d{1,12})(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = "a duration such as 30s, 5m or 1h"
_ATTRIBUTES = "attributes."
_FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_ATTRIBUTE_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_NAME_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"
_TENANT_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"

# What each field takes, in words, for error messages (validators may say more).
_EXPECTED = {
    "id": "1 to 128 letters, digits or _.:-",
    "kind": "one of threshold, sequence, absence",
    "tenant": "a tenant name (1 to 64 letters, digits or _.-) or null for every tenant",
    "key": "an event field such as entity, source, event_id or attributes.<name>",
    "cooldown": _DURATION,
    "severity": "one of info, warning, critical",
    "description": "a string of at most 1000 characters",
    "type": "an event type (1 to 128 letters, digits or _.:-)",
    "first": "an event type (1 to 128 letters, digits or _.:-)",
    "then": "an event type (1 to 128 letters, digits or _.:-)",
    "window": _DURATION,
    "within": _DURATION,
    "agg": "one of count, sum, avg, min, max",
    "op": "one of >, >=, <, <=",
    "value": "a finite number",
    "max_event_ids": "an integer from 0 to 10000",
}


def parse_duration(value: Any) -> int:
    """Milliseconds in ``"500ms"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"1d"`` or an integer.

    Raises:
        ValueError: with what a duration looks like, when ``value`` is none.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (found := _DURATION_RE.fullmatch(value)):
        return int(found[1]) * _UNIT_MS[found[2]]
    raise ValueError(_DURATION)


def _positive_duration(value: Any) -> int:
    milliseconds = parse_duration(value)
    if milliseconds == 0:
        raise ValueError("a duration above zero such as 30s, 5m or 1h")
    return milliseconds


def _key_path(value: Any) -> Any:
    if isinstance(value, str):
        if value.startswith(_ATTRIBUTES):
            ok = _ATTRIBUTE_RE.fullmatch(value.removeprefix(_ATTRIBUTES)) is not None
        else:
            ok = _FIELD_RE.fullmatch(value) is not None and value != "attributes"
        if ok:
            return value
    raise ValueError(_EXPECTED["key"])


Duration = Annotated[int, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[int, BeforeValidator(_positive_duration)]
EventType = Annotated[str, Field(pattern=_NAME_PATTERN)]


class _RuleBase(BaseModel):
    """Fields every rule has; durations are held as integer milliseconds."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: str = Field(pattern=_NAME_PATTERN)
    tenant: str | None = Field(default=None, pattern=_TENANT_PATTERN)
    key: Annotated[str, BeforeValidator(_key_path)] = "entity"
    cooldown: Duration = 0
    severity: Literal["info", "warning", "critical"] = "warning"
    description: str | None = Field(default=None, max_length=1000)


class ThresholdRule(_RuleBase):
    """``agg`` of ``value`` over a tumbling window, compared with a threshold."""

    kind: Literal["threshold"] = "threshold"
    type: EventType
    window: PositiveDuration
    agg: Literal["count", "sum", "avg", "min", "max"]
    op: Literal[">", ">=", "<", "<="]
    value: float = Field(allow_inf_nan=False)
    max_event_ids: int = Field(default=100, ge=0, le=10_000)


class SequenceRule(_RuleBase):
    """An event of type ``first`` followed within ``within`` by one of type ``then``."""

    kind: Literal["sequence"] = "sequence"
    first: EventType
    then: EventType
    within: PositiveDuration


class AbsenceRule(_RuleBase):
    """No further event of ``type`` within ``within`` of the last one."""

    kind: Literal["absence"] = "absence"
    type: EventType
    within: PositiveDuration


Rule = ThresholdRule | SequenceRule | AbsenceRule
_KINDS: dict[str, type[ThresholdRule] | type[SequenceRule] | type[AbsenceRule]] = {
    "threshold": ThresholdRule,
    "sequence": SequenceRule,
    "absence": AbsenceRule,
}

Problem = tuple[str | None, str, str]  # (field or None for the whole spec, expected, got)


class RuleError(ValueError):
    """A rule spec that cannot be used; the message names the rule, field, expectation
    and what came, e.g. ``rule 'hot-device': field 'within' expected a duration such as
    30s, 5m or 1h, got '5 minutes'``. Several problems are joined with ``; ``.

    Attributes:
        rule_id: the spec's ``id`` when it is a string, else None.
        problems: (field, expected, got) of each problem; field None for the whole spec.
    """

    def __init__(self, rule_id: str | None, problems: Sequence[Problem]) -> None:
        self.rule_id = rule_id
        self.problems = tuple(problems)
        label = _describe(rule_id) if rule_id is not None else "(no id)"
        parts = [
            f"field '{name}' expected {expected}, got {got}"
            if name is not None
            else f"expected {expected}, got {got}"
            for name, expected, got in self.problems
        ]
        super().__init__(f"rule {label}: " + "; ".join(parts))


def _describe(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_rule(spec: Mapping[str, Any]) -> Rule:
    """Validate one rule spec strictly.

    Raises:
        RuleError: naming every problem of the spec (or only ``kind`` when it is bad,
            since the other fields depend on it).
    """
    if not isinstance(spec, Mapping):
        raise RuleError(None, [(None, "a mapping of rule fields", _describe(spec))])
    raw_id = spec.get("id")
    rule_id = raw_id if isinstance(raw_id, str) else None
    kind = spec.get("kind")
    model = _KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        got = _describe(kind) if "kind" in spec else "nothing"
        raise RuleError(rule_id, [("kind", _EXPECTED["kind"], got)])
    try:
        return model.model_validate(dict(spec))
    except ValidationError as exc:
        problems = [
            _problem(error, model.__name__, set(model.model_fields)) for error in exc.errors()
        ]
        raise RuleError(rule_id, problems) from None


def _problem(error: Any, model_name: str, fields: set[str]) -> Problem:
    name = str(error["loc"][0]) if error["loc"] else None
    got = "nothing" if error["type"] == "missing" else _describe(error["input"])
    if error["type"] == "extra_forbidden":
        kind = model_name.removesuffix("Rule").lower()
        return name, f"no such field ({kind} rules take {', '.join(sorted(fields))})", got
    if error["type"] == "value_error":
        return name, str(error["ctx"]["error"]), got  # our validators say it best
    return name, _EXPECTED.get(name or "", "a valid value"), got


def load_rules(specs: Iterable[Mapping[str, Any]]) -> tuple[list[Rule], list[RuleError]]:
    """Parse a rules table: the good rules, and an error for each bad spec, in order.

    One bad spec does not stop the others. Every spec whose id another spec shares is
    rejected, since which of them was meant cannot be told.
    """
    specs = list(specs)
    ids = [spec.get("id") if isinstance(spec, Mapping) else None for spec in specs]
    shared = Counter(rule_id for rule_id in ids if isinstance(rule_id, str))
    rules: list[Rule] = []
    errors: list[RuleError] = []
    for spec, rule_id in zip(specs, ids, strict=True):
        if isinstance(rule_id, str) and shared[rule_id] > 1:
            got = f"{_describe(rule_id)}, which {shared[rule_id]} rules share"
            errors.append(RuleError(rule_id, [("id", "an id no other rule has", got)]))
            continue
        try:
            rules.append(parse_rule(spec))
        except RuleError as exc:
            errors.append(exc)
    return rules, errors


# ---------------------------------------------------------------------------- matches


@dataclass(frozen=True, slots=True)
class Match:
    """One rule firing for one tenant and key value at one event time.

    ``ts`` is B's time for a sequence, the window's end for a threshold and
    ``last_A.ts + within`` for an absence.
    """

    alert_id: str
    rule_id: str
    kind: str
    severity: str
    tenant: str
    key: str
    ts: int
    event_ids: tuple[str, ...]
    detail: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """The match as plain JSON-able data."""
        return {
            "alert_id": self.alert_id,
            "rule_id": self.rule_id,
            "kind": self.kind,
            "severity": self.severity,
            "tenant": self.tenant,
            "key": self.key,
            "ts": self.ts,
            "event_ids": list(self.event_ids),
            "detail": dict(self.detail),
        }


def alert_id(rule_id: str, tenant: str, key: str, ts: int, extra: Sequence[str] = ()) -> str:
    """The deterministic id of a match: 32 hex digits of the sha256 of its identity.

    Rule, tenant, key value and time identify a threshold or absence match. A sequence
    adds its event ids as ``extra``: one key can pair up twice in one ms.
    """
    identity = json.dumps([rule_id, tenant, key, ts, *extra], separators=(",", ":"))
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def _make_match(
    rule: Rule,
    group: Group,
    ts: int,
    event_ids: tuple[str, ...],
    detail: dict[str, Any],
) -> Match:
    tenant, key = group
    # A threshold's ids follow arrival order; they must not change its identity.
    extra = event_ids if isinstance(rule, SequenceRule) else ()
    return Match(
        alert_id(rule.id, tenant, key, ts, extra),
        rule.id,
        rule.kind,
        rule.severity,
        tenant,
        key,
        ts,
        event_ids,
        detail,
    )


def _order(match: Match) -> tuple[int, str, str, str, tuple[str, ...]]:
    return (match.ts, match.rule_id, match.tenant, match.key, match.event_ids)


# ---------------------------------------------------------------------------- state


class _Timed:
    """Entries that each fall due at a deadline; a heap finds the due ones in order.

    Replacing or removing an entry leaves its old heap item behind: an item whose
    deadline no longer matches its entry is skipped when it comes up, which is cheaper
    than digging it out, and it comes up no later than the deadline it names.
    """

    __slots__ = ("_heap", "entries")

    def __init__(self) -> None:
        self.entries: dict[Group, tuple[int, str]] = {}  # group -> (deadline, payload)
        self._heap: list[tuple[int, str, str]] = []

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, group: Group, deadline: int, payload: str) -> None:
        self.entries[group] = (deadline, payload)
        heapq.heappush(self._heap, (deadline, *group))

    def discard(self, group: Group) -> None:
        self.entries.pop(group, None)

    def pop_due(self, before: int) -> list[tuple[Group, int, str]]:
        """Remove and return (group, deadline, payload) of entries due before ``before``."""
        due = []
        heap = self._heap
        while heap and heap[0][0] < before:
            deadline, tenant, key = heapq.heappop(heap)
            entry = self.entries.get((tenant, key))
            if entry is not None and entry[0] == deadline:
                del self.entries[(tenant, key)]
                due.append(((tenant, key), deadline, entry[1]))
        return due

    def snapshot(self) -> list[list[Any]]:
        return [[t, k, deadline, payload] for (t, k), (deadline, payload) in self.entries.items()]

    def load(self, rows: Iterable[Sequence[Any]]) -> None:
        for tenant, key, deadline, payload in rows:
            self.entries[(tenant, key)] = (int(deadline), payload)
        self._heap = [(deadline, t, k) for (t, k), (deadline, _) in self.entries.items()]
        heapq.heapify(self._heap)


_Buffered = tuple[int, int, int, str, str, str]  # (ts, rank, arrival, tenant, key, event id)


class _Buffer:
    """Events held until the watermark passes them, then handed out in order of
    (ts, rank, arrival): that order no longer changes once the watermark is past."""

    __slots__ = ("_arrival", "_heap")

    def __init__(self) -> None:
        self._heap: list[_Buffered] = []
        self._arrival = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, ts: int, rank: int, group: Group, event_id: str) -> None:
        if not self._heap:
            self._arrival = 0  # keeps the numbers small; only their order matters
        heapq.heappush(self._heap, (ts, rank, self._arrival, *group, event_id))
        self._arrival += 1

    def pop_before(self, watermark: int) -> Iterator[tuple[int, int, Group, str]]:
        heap = self._heap
        while heap and heap[0][0] < watermark:
            ts, rank, _, tenant, key, event_id = heapq.heappop(heap)
            yield ts, rank, (tenant, key), event_id

    def snapshot(self) -> dict[str, Any]:
        return {"arrival": self._arrival, "events": [list(item) for item in self._heap]}

    def load(self, data: Mapping[str, Any]) -> None:
        self._arrival = int(data["arrival"])
        self._heap = [(int(a), int(b), int(c), d, e, f) for a, b, c, d, e, f in data["events"]]
        heapq.heapify(self._heap)


class _RuleState(ABC):
    """What one rule remembers; each kind adds its own state."""

    rule: Rule

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.cooldown = _Timed()  # group -> (end of its cooldown, "")
        attribute = self.rule.key.removeprefix(_ATTRIBUTES)
        self._attribute = attribute if self.rule.key.startswith(_ATTRIBUTES) else None

    def key_of(self, event: Mapping[str, Any]) -> str | None:
        """The event's key value as text (non-strings as JSON), None when it has none."""
        if self._attribute is None:
            raw = event.get(self.rule.key)
        else:
            attributes = event.get("attributes")
            raw = attributes.get(self._attribute) if isinstance(attributes, Mapping) else None
        if raw is None or isinstance(raw, str):
            return raw
        return json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str)

    @abstractmethod
    def add(self, group: Group, ts: int, event: Mapping[str, Any]) -> None:
        """Take one on-time event of one of the rule's types."""

    @abstractmethod
    def advance(self, watermark: int) -> list[Match]:
        """The candidates the watermark makes final, before any cooldown."""

    def admit(self, candidates: list[Match], watermark: int) -> tuple[list[Match], int]:
        """Apply the cooldown to ``candidates``; return those kept and how many were not."""
        candidates.sort(key=_order)  # a rule's candidates never go back in time across calls
        kept = []
        for match in candidates:
            running = self.cooldown.entries.get((match.tenant, match.key))
            if running is not None and match.ts < running[0]:
                continue
            if self.rule.cooldown:
                self.cooldown.put((match.tenant, match.key), match.ts + self.rule.cooldown, "")
            kept.append(match)
        # Every later candidate is at or after this watermark: a cooldown that ends by
        # then can hold nothing back any more.
        self.cooldown.pop_due(watermark + 1)
        return kept, len(candidates) - len(kept)

    def __len__(self) -> int:
        return len(self.cooldown)

    def snapshot(self) -> dict[str, Any]:
        return {"cooldown": self.cooldown.snapshot()}

    def load(self, data: Mapping[str, Any]) -> None:
        self.cooldown.load(data["cooldown"])


@dataclass(slots=True)
class _Window:
    count: int
    sum: float
    min: float
    max: float
    ids: list[str]


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


def _measure(agg: str, window: _Window) -> float:
    if agg == "count":
        return window.count
    if agg == "avg":
        return window.sum / window.count
    return float(getattr(window, agg))


class _ThresholdState(_RuleState):
    rule: ThresholdRule

    def __init__(self, rule: ThresholdRule) -> None:
        super().__init__(rule)
        self._windows: dict[int, dict[Group, _Window]] = {}  # window start -> its groups

    def add(self, group: Group, ts: int, event: Mapping[str, Any]) -> None:
        raw = event.get("value")
        value = 0.0 if raw is None else float(raw)  # the envelope's default value is 0
        event_id = str(event["event_id"])
        windows = self._windows.setdefault(ts - ts % self.rule.window, {})
        window = windows.get(group)
        if window is None:
            ids = [event_id] if self.rule.max_event_ids else []
            windows[group] = _Window(1, value, value, value, ids)
            return
        window.count += 1
        window.sum += value
        window.min = min(window.min, value)
        window.max = max(window.max, value)
        if len(window.ids) < self.rule.max_event_ids:
            window.ids.append(event_id)

    def advance(self, watermark: int) -> list[Match]:
        size, rule = self.rule.window, self.rule
        found = []
        for start in sorted(s for s in self._windows if s + size <= watermark):
            for group, window in self._windows.pop(start).items():
                measured = _measure(rule.agg, window)
                if not _OPS[rule.op](measured, rule.value):
                    continue
                detail = {
                    "agg": rule.agg,
                    "value": measured,
                    "op": rule.op,
                    "threshold": rule.value,
                    "window_start": start,
                    "window_end": start + size,
                    "events": window.count,
                }
                found.append(_make_match(rule, group, start + size, tuple(window.ids), detail))
        return found

    def __len__(self) -> int:
        return super().__len__() + sum(len(groups) for groups in self._windows.values())

    def snapshot(self) -> dict[str, Any]:
        rows = [
            [start, tenant, key, w.count, w.sum, w.min, w.max, w.ids]
            for start, groups in self._windows.items()
            for (tenant, key), w in groups.items()
        ]
        return {**super().snapshot(), "windows": rows}

    def load(self, data: Mapping[str, Any]) -> None:
        super().load(data)
        for start, tenant, key, count, total, low, high, ids in data["windows"]:
            window = _Window(int(count), float(total), float(low), float(high), list(ids))
            self._windows.setdefault(int(start), {})[(tenant, key)] = window


class _SequenceState(_RuleState):
    rule: SequenceRule

    def __init__(self, rule: SequenceRule) -> None:
        super().__init__(rule)
        self._buffer = _Buffer()
        self._pending = _Timed()  # group -> (A.ts + within, A's id)

    def add(self, group: Group, ts: int, event: Mapping[str, Any]) -> None:
        # rank 0 sorts an A before a B of the same ms, so that A.ts <= B.ts holds inclusive
        rank = 0 if event["type"] == self.rule.first else 1
        self._buffer.push(ts, rank, group, str(event["event_id"]))

    def advance(self, watermark: int) -> list[Match]:
        rule = self.rule
        paired = rule.first == rule.then
        found = []
        for ts, rank, group, event_id in self._buffer.pop_before(watermark):
            if rank == 1 or paired:
                pending = self._pending.entries.get(group)
                if pending is not None and ts <= pending[0]:
                    self._pending.discard(group)  # the A is used up
                    found.append(self._match(group, pending, ts, event_id))
                    continue
            if rank == 0:
                self._pending.put(group, ts + rule.within, event_id)
        # Only now: a buffered B up to a pending A's deadline could still have used it.
        self._pending.pop_due(watermark)
        return found

    def _match(self, group: Group, pending: tuple[int, str], ts: int, event_id: str) -> Match:
        first_ts = pending[0] - self.rule.within
        detail = {
            "first": self.rule.first,
            "then": self.rule.then,
            "first_ts": first_ts,
            "then_ts": ts,
            "gap_ms": ts - first_ts,
        }
        return _make_match(self.rule, group, ts, (pending[1], event_id), detail)

    def __len__(self) -> int:
        return super().__len__() + len(self._buffer) + len(self._pending)

    def snapshot(self) -> dict[str, Any]:
        return {
            **super().snapshot(),
            "buffer": self._buffer.snapshot(),
            "pending": self._pending.snapshot(),
        }

    def load(self, data: Mapping[str, Any]) -> None:
        super().load(data)
        self._buffer.load(data["buffer"])
        self._pending.load(data["pending"])


class _AbsenceState(_RuleState):
    rule: AbsenceRule

    def __init__(self, rule: AbsenceRule) -> None:
        super().__init__(rule)
        self._buffer = _Buffer()
        self._last = _Timed()  # group -> (last_A.ts + within, last A's id)

    def add(self, group: Group, ts: int, event: Mapping[str, Any]) -> None:
        self._buffer.push(ts, 0, group, str(event["event_id"]))

    def advance(self, watermark: int) -> list[Match]:
        within = self.rule.within
        found = []
        for ts, _, group, event_id in self._buffer.pop_before(watermark):
            last = self._last.entries.get(group)
            if last is not None and ts > last[0]:
                found.append(self._match(group, last[0], last[1]))  # this A came too late
            self._last.put(group, ts + within, event_id)
        # Every A up to the watermark is in: a deadline before it has passed in silence.
        found += [
            self._match(g, deadline, eid) for g, deadline, eid in self._last.pop_due(watermark)
        ]
        return found

    def _match(self, group: Group, deadline: int, event_id: str) -> Match:
        detail = {"type": self.rule.type, "last_ts": deadline - self.rule.within}
        return _make_match(self.rule, group, deadline, (event_id,), detail)

    def __len__(self) -> int:
        return super().__len__() + len(self._buffer) + len(self._last)

    def snapshot(self) -> dict[str, Any]:
        return {
            **super().snapshot(),
            "buffer": self._buffer.snapshot(),
            "last": self._last.snapshot(),
        }

    def load(self, data: Mapping[str, Any]) -> None:
        super().load(data)
        self._buffer.load(data["buffer"])
        self._last.load(data["last"])


def _new_state(rule: Rule) -> _RuleState:
    if isinstance(rule, ThresholdRule):
        return _ThresholdState(rule)
    if isinstance(rule, SequenceRule):
        return _SequenceState(rule)
    return _AbsenceState(rule)


def _types_of(rule: Rule) -> set[str]:
    return {rule.first, rule.then} if isinstance(rule, SequenceRule) else {rule.type}


# ---------------------------------------------------------------------------- engine


@dataclass
class CepStats:
    """Counters since the engine was made (not part of the snapshot)."""

    late: int = 0  # events behind the watermark, ignored
    suppressed: int = 0  # candidates a cooldown held back


class CepEngine:
    """The rules of one partition and their state; see the module docstring."""

    def __init__(self, rules: Sequence[Rule] = ()) -> None:
        self.stats = CepStats()
        self._watermark: int | None = None
        self._states: dict[str, _RuleState] = {}
        self._by_type: dict[str, list[_RuleState]] = {}
        self.set_rules(rules)

    @property
    def watermark(self) -> int | None:
        """The highest watermark given so far; None before the first."""
        return self._watermark

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules in force, by id."""
        return tuple(state.rule for state in self._states.values())

    @property
    def types(self) -> frozenset[str]:
        """Event types some rule looks at: the caller may drop the others beforehand."""
        return frozenset(self._by_type)

    def key_fields(self) -> frozenset[str]:
        """The key fields the rules read (``entity``, ``attributes.region``...)."""
        return frozenset(state.rule.key for state in self._states.values())

    def set_rules(self, rules: Sequence[Rule]) -> None:
        """Put ``rules`` in force, keeping the state of rules whose spec is unchanged.

        Raises:
            ValueError: when two rules share an id.
        """
        shared = sorted(rule_id for rule_id, n in Counter(r.id for r in rules).items() if n > 1)
        if shared:
            raise ValueError(f"rule ids must be unique, these repeat: {', '.join(shared)}")
        old = self._states
        self._states = {}
        for rule in sorted(rules, key=lambda r: r.id):
            kept = old.get(rule.id)
            self._states[rule.id] = (
                kept if kept is not None and kept.rule == rule else _new_state(rule)
            )
        self._by_type = {}
        for state in self._states.values():
            for event_type in sorted(_types_of(state.rule)):
                self._by_type.setdefault(event_type, []).append(state)

    def on_events(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Take a batch of events, in partition offset order.

        Each event has at least ``event_id``, ``tenant``, ``type``, ``ts`` (integer ms)
        and the rules' key fields; threshold rules also read ``value`` (default 0).
        Nothing matches here: matches are made final by :meth:`on_watermark`.
        """
        watermark = self._watermark
        for event in events:
            states = self._by_type.get(event["type"])
            if not states:
                continue
            ts = int(event["ts"])
            if watermark is not None and ts < watermark:
                self.stats.late += 1
                continue
            tenant = str(event["tenant"])
            for state in states:
                if state.rule.tenant is not None and state.rule.tenant != tenant:
                    continue
                key = state.key_of(event)
                if key is not None:
                    state.add((tenant, key), ts, event)

    def on_watermark(self, watermark: int) -> list[Match]:
        """Advance event time to ``watermark``; return the matches it made final, sorted.

        Closes threshold windows, runs buffered sequence and absence events, expires
        pending sequences and fires absences. A watermark not above the last is a no-op.
        """
        watermark = int(watermark)
        if self._watermark is not None and watermark <= self._watermark:
            return []
        self._watermark = watermark
        matches: list[Match] = []
        for state in self._states.values():
            kept, suppressed = state.admit(state.advance(watermark), watermark)
            matches += kept
            self.stats.suppressed += suppressed
        matches.sort(key=_order)
        return matches

    def __len__(self) -> int:
        return sum(len(state) for state in self._states.values())

    def snapshot(self) -> dict[str, Any]:
        """The whole state as plain JSON-able data (with each rule's spec)."""
        return {
            "version": SNAPSHOT_VERSION,
            "watermark": self._watermark,
            "rules": {
                rule_id: {"spec": state.rule.model_dump(mode="json"), "state": state.snapshot()}
                for rule_id, state in self._states.items()
            },
        }

    @classmethod
    def restore(cls, rules: Sequence[Rule], data: Mapping[str, Any]) -> CepEngine:
        """An engine running ``rules`` with the state ``data`` saved for them.

        A rule whose spec differs from the one saved starts empty, as in :meth:`set_rules`.

        Raises:
            ValueError: when ``data`` is not a snapshot this version can read.
        """
        if not isinstance(data, Mapping) or data.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"expected a CEP snapshot of version {SNAPSHOT_VERSION}")
        engine = cls(rules)
        mark = data["watermark"]
        engine._watermark = None if mark is None else int(mark)
        for rule_id, saved in data["rules"].items():
            state = engine._states.get(rule_id)
            if state is not None and saved["spec"] == state.rule.model_dump(mode="json"):
                state.load(saved["state"])
        return engine
