"""Event-time windows with watermarks: tumbling, hopping and session.

A :class:`WindowOperator` keeps the open windows of one partition in memory. Events
fold into every window that holds them; :meth:`WindowOperator.close_until` hands
back the windows whose end the watermark has passed and forgets them, so memory
follows the open windows only. An event whose every window has closed already is
*late*: ``add`` returns it to the caller (which dead-letters it), never drops it.

A :class:`PartitionWatermark` keeps one watermark per tenant of a partition: the
tenant's newest event time (capped at the time Kafka appended that event) less the
allowed lateness. It moves on data only: on the broker's time of the records read,
and, for a partition with nothing more to read, on the broker saying so for the idle
timeout. A worker's pause, a restart or a backlog moves nothing, and one tenant's
event times never make another tenant's events late. Windows close per tenant.
"""

from __future__ import annotations

import base64
import fnmatch
import functools
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from core.sketches import DDSketch, HyperLogLog

Group = tuple[Hashable, ...]


@dataclass(slots=True)
class Agg:
    """count, sum, min and max of the values folded in (avg derives from them), and
    optionally a distinct-count sketch and a quantile sketch; all of it merges."""

    count: int = 0
    sum: float = 0.0
    min: float = float("inf")
    max: float = float("-inf")
    distinct: HyperLogLog | None = None
    quantiles: DDSketch | None = None

    def add(self, value: float) -> None:
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value

    def merge(self, other: Agg) -> None:
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        if other.distinct is not None:
            if self.distinct is None:
                self.distinct = other.distinct.copy()
            else:
                self.distinct.merge(other.distinct)
        if other.quantiles is not None:
            if self.quantiles is None:
                self.quantiles = DDSketch.from_bytes(other.quantiles.to_bytes())
            else:
                self.quantiles.merge(other.quantiles)

    @property
    def avg(self) -> float | None:
        return self.sum / self.count if self.count else None

    def as_list(self) -> list[Any]:
        return [
            self.count,
            self.sum,
            self.min,
            self.max,
            None if self.distinct is None else _b64(self.distinct.to_bytes()),
            None if self.quantiles is None else _b64(self.quantiles.to_bytes()),
        ]

    @classmethod
    def from_list(cls, data: list[Any]) -> Agg:
        agg = cls(int(data[0]), data[1], data[2], data[3])
        if len(data) > 4 and data[4] is not None:
            agg.distinct = HyperLogLog.from_bytes(base64.b64decode(data[4]))
        if len(data) > 5 and data[5] is not None:
            agg.quantiles = DDSketch.from_bytes(base64.b64decode(data[5]))
        return agg


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True, slots=True)
class Tumbling:
    size_ms: int

    def starts(self, ts: int) -> list[int]:
        return [ts - ts % self.size_ms]

    @property
    def length_ms(self) -> int:
        return self.size_ms


@dataclass(frozen=True, slots=True)
class Hopping:
    """Windows of ``size_ms`` starting every ``hop_ms``; an event is in size/hop of them."""

    size_ms: int
    hop_ms: int

    def __post_init__(self) -> None:
        if self.hop_ms <= 0 or self.size_ms <= 0 or self.size_ms % self.hop_ms:
            raise ValueError(
                f"hopping windows need a positive hop that divides the size, "
                f"got size {self.size_ms} ms and hop {self.hop_ms} ms"
            )

    def starts(self, ts: int) -> list[int]:
        last = ts - ts % self.hop_ms
        return list(range(last - self.size_ms + self.hop_ms, last + 1, self.hop_ms))

    @property
    def length_ms(self) -> int:
        return self.size_ms


@dataclass(frozen=True, slots=True)
class Session:
    """Per-group windows that stay open while events keep coming within ``gap_ms``."""

    gap_ms: int


WindowSpec = Tumbling | Hopping | Session


@dataclass(frozen=True, slots=True)
class ClosedWindow:
    group: Group
    start: int
    end: int
    agg: Agg


@dataclass(frozen=True, slots=True)
class Lateness:
    """The allowed lateness of each tenant: a default, and overrides by tenant name
    pattern (``fnmatch``: ``acme``, ``iot-*``), the first match winning."""

    default_ms: int
    overrides: tuple[tuple[str, int], ...] = ()

    def of(self, tenant: str) -> int:
        return _lateness_of(self, tenant)

    @property
    def most_ms(self) -> int:
        """The largest lateness any tenant may have."""
        return max([self.default_ms, *(ms for _pattern, ms in self.overrides)])


@functools.lru_cache(maxsize=65_536)
def _lateness_of(lateness: Lateness, tenant: str) -> int:
    for pattern, ms in lateness.overrides:
        if fnmatch.fnmatchcase(tenant, pattern):
            return ms
    return lateness.default_ms


@dataclass
class PartitionWatermark:
    """The watermarks of one partition: one per tenant, moved by data only.

    Time here is the broker's: each record carries the time Kafka appended it
    (``arrival``). The partition's *progress* is the newest arrival read, so it stands
    still while the worker pauses, restarts or catches up on a backlog, whatever the
    wall clock does. Each tenant's watermark is its newest event time, capped at that
    event's arrival (an event stamped ahead of its arrival moves nothing past it), less
    the tenant's allowed lateness: one tenant's clock never makes another tenant late.

    A tenant with no record for ``idle_timeout_ms`` of progress (or never seen) is
    *idle*: its watermark is its *base*, progress less its allowed lateness. A
    partition makes progress without records only when the broker has said, for
    ``idle_timeout_ms`` of wall-clock time, that there is nothing more to read
    (:meth:`at_end`); then progress takes the wall clock of that answer.

    Memory: one entry per tenant seen within the idle timeout, at most
    ``max_tenants`` (the longest-quiet ones are let go first; a tenant let go has its
    base watermark, which is never below its own). Every watermark only goes up.
    """

    lateness: Lateness
    idle_timeout_ms: int
    max_tenants: int = 10_000
    progress: int | None = None
    # tenant -> (its watermark, progress when its newest record was read)
    tenants: dict[str, tuple[int, int]] = field(default_factory=dict)
    # progress when windows were last closed (see since)
    closed_at: int | None = None
    # wall clock since which the broker keeps saying the partition has nothing more
    # (not snapshotted: after a restart the broker must say so again)
    at_end_since: int | None = None

    def base(self, tenant: str) -> int | None:
        """The watermark of ``tenant`` when idle or unknown; None before any progress."""
        if self.progress is None:
            return None
        return self.progress - self.lateness.of(tenant)

    def of(self, tenant: str) -> int | None:
        """The watermark of ``tenant`` now."""
        entry = self.tenants.get(tenant)
        base = self.base(tenant)
        if entry is None or base is None:
            return base
        mark, seen = entry
        assert self.progress is not None
        return max(mark, base) if self.progress - seen >= self.idle_timeout_ms else mark

    def low(self) -> int | None:
        """The lowest watermark any tenant has or may get: below it nothing counts."""
        if self.progress is None:
            return None
        lowest = self.progress - self.lateness.most_ms
        return min([lowest, *(m for t in self.tenants if (m := self.of(t)) is not None)])

    def since(self, tenant: str) -> int | None:
        """The watermark ``tenant`` had when windows were last closed, for a tenant that
        was idle or unknown then (an active one is remembered by the window operator)."""
        if self.closed_at is None:
            return None
        return self.closed_at - self.lateness.of(tenant)

    def closed(self) -> None:
        """Windows were closed at every tenant's watermark now."""
        self.closed_at = self.progress

    def observe(self, seen: Mapping[str, tuple[int, int]]) -> None:
        """Follow one batch: per tenant, (newest event time capped at its arrival,
        newest arrival)."""
        if not seen:
            return
        before = {tenant: self.of(tenant) for tenant in seen}
        newest = max(arrival for _ts, arrival in seen.values())
        self.progress = newest if self.progress is None else max(self.progress, newest)
        for tenant, (ts, arrival) in seen.items():
            mark = ts - self.lateness.of(tenant)
            old = before[tenant]
            entry = self.tenants.get(tenant)
            last = arrival if entry is None else max(entry[1], arrival)
            self.tenants[tenant] = (mark if old is None else max(old, mark), last)
        self.at_end_since = None
        if len(self.tenants) > self.max_tenants:
            quiet = sorted(self.tenants, key=lambda t: self.tenants[t][1])
            for tenant in quiet[: len(self.tenants) - self.max_tenants]:
                del self.tenants[tenant]

    def at_end(self, wall_ms: int) -> None:
        """The broker said, at ``wall_ms``, that the partition has nothing more to read."""
        if self.at_end_since is None:
            self.at_end_since = wall_ms
        elif wall_ms - self.at_end_since >= self.idle_timeout_ms:
            self.progress = wall_ms if self.progress is None else max(self.progress, wall_ms)

    def not_at_end(self) -> None:
        """The broker has records the worker has not read: the partition is not idle."""
        self.at_end_since = None

    def forget_idle(self) -> None:
        """Let go of tenants idle for the timeout: their watermark is the base anyway."""
        if self.progress is None:
            return
        horizon = self.progress - self.idle_timeout_ms
        for tenant in [t for t, (_m, seen) in self.tenants.items() if seen <= horizon]:
            del self.tenants[tenant]

    def snapshot(self) -> dict[str, Any]:
        return {
            "progress": self.progress,
            "closed_at": self.closed_at,
            "tenants": {t: list(v) for t, v in self.tenants.items()},
        }

    def restore(self, data: Any) -> None:
        """Take a snapshot; a list is the format before per-tenant watermarks
        ``[max event time, wall clock, floor]``: its floor becomes the base."""
        if isinstance(data, Mapping):
            self.progress = data["progress"]
            self.closed_at = data.get("closed_at", self.progress)
            self.tenants = {t: (int(m), int(s)) for t, (m, s) in data["tenants"].items()}
            return
        max_ts, _wall, *floor = data
        mark = floor[0] if floor and floor[0] is not None else None
        if mark is None and max_ts is not None:
            mark = max_ts - self.lateness.default_ms
        self.progress = None if mark is None else mark + self.lateness.default_ms
        self.closed_at = self.progress


@dataclass(slots=True)
class _OpenSession:
    start: int
    last: int  # time of its latest event; the session ends one gap after it
    agg: Agg


@dataclass
class WindowOperator:
    """Open windows of one partition, keyed by group.

    Tumbling and hopping windows are kept as *panes* of one hop (for tumbling windows
    a pane is the window): an event folds into one pane, and a window is the merge of
    the panes it spans, made when it closes (or is read live). A hopping window of
    five hops thus costs one update per event instead of five.

    Windows close per tenant (the first part of a group), each at its own watermark.
    """

    spec: WindowSpec
    # (group, pane start) -> aggregate of the pane's events
    _fixed: dict[tuple[Group, int], Agg] = field(default_factory=dict, init=False)
    # group -> its open sessions, sorted by start, each at least one gap from the next
    _sessions: dict[Group, list[_OpenSession]] = field(default_factory=dict, init=False)
    # Windows ending at or before these have been handed out by close_until: per
    # tenant still active at the last close; for every other tenant, what the
    # caller's ``since`` says (or the last uniform watermark, when closing with one).
    _closed_through: dict[str, int] = field(default_factory=dict, init=False)
    _uniform: int | None = field(default=None, init=False)

    @property
    def step_ms(self) -> int:
        """The pane size: the hop of hopping windows, the size of tumbling ones."""
        assert not isinstance(self.spec, Session)
        return self.spec.hop_ms if isinstance(self.spec, Hopping) else self.spec.size_ms

    def add(
        self,
        events: Iterable[Mapping[str, Any]],
        group_of: Callable[[Mapping[str, Any]], Group],
        watermark: int | None,
    ) -> list[Mapping[str, Any]]:
        """Fold events into their windows; return the late ones, untouched."""
        late: list[Mapping[str, Any]] = []
        for event in events:
            ts = event["ts"]
            value = event["value"]
            if self.is_late(ts, watermark):
                late.append(event)
                continue
            if isinstance(self.spec, Session):
                self._add_to_session(group_of(event), ts, value)
                continue
            key = (group_of(event), ts - ts % self.step_ms)
            agg = self._fixed.get(key)
            if agg is None:
                agg = self._fixed[key] = Agg()
            agg.add(value)
        return late

    def merge_partial(self, group: Group, start: int, partial: Agg) -> None:
        """Fold a pre-aggregated partial into the pane at ``start``."""
        agg = self._fixed.get((group, start))
        if agg is None:
            if partial.distinct is not None:
                # Sketches made per batch may be views of one array; own a copy.
                partial.distinct = partial.distinct.copy()
            self._fixed[(group, start)] = partial
        else:
            agg.merge(partial)

    def is_late(self, ts: int, watermark: int | None) -> bool:
        """True when every window that would hold ``ts`` has closed at ``watermark``."""
        if watermark is None:
            return False
        spec = self.spec
        if isinstance(spec, Session):
            return ts + spec.gap_ms <= watermark
        return spec.starts(ts)[-1] + spec.length_ms <= watermark

    def _add_to_session(self, group: Group, ts: int, value: float) -> None:
        assert isinstance(self.spec, Session)
        gap = self.spec.gap_ms
        merged = _OpenSession(ts, ts, Agg())
        merged.agg.add(value)
        keep = []
        for session in self._sessions.get(group, []):
            # Two sessions join when they come within the gap of each other.
            if session.start - gap < merged.last and merged.start < session.last + gap:
                merged.start = min(merged.start, session.start)
                merged.last = max(merged.last, session.last)
                merged.agg.merge(session.agg)
            else:
                keep.append(session)
        keep.append(merged)
        keep.sort(key=lambda s: s.start)
        self._sessions[group] = keep

    def close_until(
        self,
        watermark: int | Callable[[str], int | None],
        since: Callable[[str], int | None] | None = None,
        active: Iterable[str] = (),
    ) -> list[ClosedWindow]:
        """Hand back, and forget, every window whose end is at or before its tenant's
        watermark.

        One operator is closed either always with one watermark or always by tenant.

        Args:
            watermark: one watermark for every tenant, or a tenant's by tenant.
            since: the watermark a tenant not ``active`` had at the last close.
            active: the tenants whose watermark may lag behind what ``since`` will say
                of them once this close is done; the operator remembers theirs.
        """
        if isinstance(watermark, int):
            fixed, before = watermark, self._uniform
            self._uniform = fixed if before is None else max(before, fixed)
            return self._close(lambda _tenant: fixed, lambda _tenant: before, ())
        return self._close(watermark, since or (lambda _tenant: self._uniform), active)

    def _close(
        self,
        mark_of: Callable[[str], int | None],
        since_of: Callable[[str], int | None],
        active: Iterable[str],
    ) -> list[ClosedWindow]:
        marks: dict[str, int | None] = {}

        def mark(tenant: str) -> int | None:
            if tenant not in marks:
                marks[tenant] = mark_of(tenant)
            return marks[tenant]

        if isinstance(self.spec, Session):
            closed = self._close_sessions(mark, self.spec.gap_ms)
        else:
            closed = self._close_fixed(mark, since_of, active)
        closed.sort(key=lambda w: (w.start, repr(w.group)))
        return closed

    def _close_sessions(self, mark: Callable[[str], int | None], gap: int) -> list[ClosedWindow]:
        closed: list[ClosedWindow] = []
        for group in list(self._sessions):
            at = mark(_tenant(group))
            if at is None:
                continue
            sessions = self._sessions[group]
            closed += [
                ClosedWindow(group, s.start, s.last + gap, s.agg)
                for s in sessions
                if s.last + gap <= at
            ]
            rest = [s for s in sessions if s.last + gap > at]
            if rest:
                self._sessions[group] = rest
            else:
                del self._sessions[group]
        return closed

    def _close_fixed(
        self,
        mark: Callable[[str], int | None],
        since_of: Callable[[str], int | None],
        active: Iterable[str],
    ) -> list[ClosedWindow]:
        points: dict[Group, tuple[int | None, int | None]] = {}  # once per group, not pane

        def wanted(group: Group, end: int) -> bool:
            got = points.get(group)
            if got is None:
                got = points[group] = (mark(_tenant(group)), self._since(group, since_of))
            at, since = got
            return at is not None and end <= at and (since is None or end > since)

        closed = self._windows(wanted)
        length = self.spec.length_ms  # type: ignore[union-attr]
        for key in list(self._fixed):
            at = mark(_tenant(key[0]))
            if at is not None and key[1] + length <= at:
                del self._fixed[key]  # no open window holds this pane any more
        # A tenant still active keeps its own closing point: it may lag behind what
        # `since` will say of it, and the windows of its next events that end after
        # its own point must still count. Of every other tenant, `since` says it.
        through = {}
        for tenant in active:
            at, since = mark(tenant), self._since((tenant,), since_of)
            if at is not None:
                through[tenant] = at if since is None else max(since, at)
        self._closed_through = through
        return closed

    def _since(
        self, group: Group, since_of: Callable[[str], int | None] | None = None
    ) -> int | None:
        """The watermark up to which the windows of ``group``'s tenant were handed out."""
        tenant = _tenant(group)
        if tenant in self._closed_through:
            return self._closed_through[tenant]
        return self._uniform if since_of is None else since_of(tenant)

    def _windows(
        self, wanted: Callable[[Group, int], bool], sketches: bool = True
    ) -> list[ClosedWindow]:
        """The windows whose (group, end) is ``wanted``, each the merge of its panes."""
        assert not isinstance(self.spec, Session)
        step, length = self.step_ms, self.spec.length_ms
        parts: dict[tuple[Group, int], list[tuple[int, Agg]]] = {}
        for (group, pane), agg in self._fixed.items():
            for start in range(pane - length + step, pane + 1, step):
                if wanted(group, start + length):
                    parts.setdefault((group, start), []).append((pane, agg))
        windows = []
        for (group, start), panes in parts.items():
            if len(panes) == 1 and sketches:
                agg = panes[0][1]
            else:
                agg = Agg()
                for _pane, part in sorted(panes, key=lambda p: p[0]):
                    agg.merge(part if sketches else Agg(part.count, part.sum, part.min, part.max))
            windows.append(ClosedWindow(group, start, start + length, agg))
        return windows

    def open_windows(
        self, sketches: bool = True, since: Callable[[str], int | None] | None = None
    ) -> list[ClosedWindow]:
        """The windows still open, with their partial aggregates (for live views);
        without ``sketches``, hopping windows skip merging their sketches (cheaper);
        ``since`` as for :meth:`close_until`."""
        if isinstance(self.spec, Session):
            gap = self.spec.gap_ms
            return [
                ClosedWindow(g, s.start, s.last + gap, s.agg)
                for g, sessions in self._sessions.items()
                for s in sessions
            ]

        def still_open(group: Group, end: int) -> bool:
            closed = self._since(group, since)
            return closed is None or end > closed

        return self._windows(still_open, sketches)

    def __len__(self) -> int:
        return len(self._fixed) + sum(len(s) for s in self._sessions.values())

    def snapshot(self) -> dict[str, Any]:
        return {
            "panes": True,
            "closed_through": dict(self._closed_through),
            "uniform": self._uniform,
            "fixed": [[list(g), start, a.as_list()] for (g, start), a in self._fixed.items()],
            "sessions": [
                [list(g), s.start, s.last, s.agg.as_list()]
                for g, sessions in self._sessions.items()
                for s in sessions
            ],
        }

    @classmethod
    def restore(cls, spec: WindowSpec, data: Mapping[str, Any]) -> WindowOperator:
        if isinstance(spec, Hopping) and not data.get("panes") and data["fixed"]:
            raise ValueError(
                "this snapshot keeps hopping windows whole (made before panes); "
                "drain the pipeline with the version that wrote it, or reset the "
                "partition checkpoints"
            )
        op = cls(spec)
        through = data.get("closed_through")
        if isinstance(through, Mapping):
            op._closed_through = {str(t): int(m) for t, m in through.items()}
            op._uniform = data.get("uniform")
        else:  # one watermark for the whole partition (before per-tenant watermarks)
            op._uniform = through
        for group, start, agg in data["fixed"]:
            op._fixed[(tuple(group), start)] = Agg.from_list(agg)
        for group, start, last, agg in data["sessions"]:
            session = _OpenSession(start, last, Agg.from_list(agg))
            op._sessions.setdefault(tuple(group), []).append(session)
        return op


def _tenant(group: Group) -> str:
    """The tenant of a window group (its first part)."""
    return str(group[0]) if group else ""
