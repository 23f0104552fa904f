"""Event-time windows with watermarks: tumbling, hopping and session.

A :class:`WindowOperator` keeps the open windows of one partition in memory. Events
fold into every window that holds them; :meth:`WindowOperator.close_until` hands
back the windows whose end the watermark has passed and forgets them, so memory
follows the open windows only. An event whose every window has closed already is
*late*: ``add`` returns it to the caller (which dead-letters it), never drops it.

A :class:`PartitionWatermark` is ``max event time - allowed lateness``; when a
partition has been idle for ``idle_timeout_ms`` of wall-clock time, it advances with
the clock instead, so that windows close without new data. The clock is passed in.
"""

from __future__ import annotations

import base64
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
                self.distinct = HyperLogLog.from_bytes(other.distinct.to_bytes())
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


@dataclass
class PartitionWatermark:
    allowed_lateness_ms: int
    idle_timeout_ms: int
    max_ts: int | None = None
    last_event_wall_ms: int | None = None

    def observe(self, max_ts: int, wall_ms: int) -> None:
        if self.max_ts is None or max_ts > self.max_ts:
            self.max_ts = max_ts
        self.last_event_wall_ms = wall_ms

    def current(self, wall_ms: int) -> int | None:
        """The watermark now, or None before the first event."""
        if self.max_ts is None or self.last_event_wall_ms is None:
            return None
        mark = self.max_ts - self.allowed_lateness_ms
        if wall_ms - self.last_event_wall_ms >= self.idle_timeout_ms:
            mark = max(mark, wall_ms - self.allowed_lateness_ms)
        return mark


@dataclass(slots=True)
class _OpenSession:
    start: int
    last: int  # time of its latest event; the session ends one gap after it
    agg: Agg


@dataclass
class WindowOperator:
    """Open windows of one partition, keyed by group."""

    spec: WindowSpec
    _fixed: dict[tuple[Group, int], Agg] = field(default_factory=dict, init=False)
    # group -> its open sessions, sorted by start, each at least one gap from the next
    _sessions: dict[Group, list[_OpenSession]] = field(default_factory=dict, init=False)

    def add(
        self,
        events: Iterable[Mapping[str, Any]],
        group_of: Callable[[Mapping[str, Any]], Group],
        watermark: int | None,
    ) -> list[Mapping[str, Any]]:
        """Fold events into their windows; return the late ones, untouched."""
        late: list[Mapping[str, Any]] = []
        spec = self.spec
        for event in events:
            ts = event["ts"]
            value = event["value"]
            if self.is_late(ts, watermark):
                late.append(event)
                continue
            if isinstance(spec, Session):
                self._add_to_session(group_of(event), ts, value)
                continue
            starts = spec.starts(ts)
            group = group_of(event)
            for start in starts:
                if watermark is not None and start + spec.length_ms <= watermark:
                    continue  # this window closed already; the event counts in the later ones
                agg = self._fixed.get((group, start))
                if agg is None:
                    agg = self._fixed[(group, start)] = Agg()
                agg.add(value)
        return late

    def merge_partial(self, group: Group, start: int, partial: Agg) -> None:
        """Fold a pre-aggregated partial into the fixed window at ``start``."""
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

    def close_until(self, watermark: int) -> list[ClosedWindow]:
        """Hand back, and forget, every window whose end is at or before ``watermark``."""
        closed: list[ClosedWindow] = []
        if isinstance(self.spec, Session):
            gap = self.spec.gap_ms
            for group in list(self._sessions):
                sessions = self._sessions[group]
                done = [s for s in sessions if s.last + gap <= watermark]
                closed += [ClosedWindow(group, s.start, s.last + gap, s.agg) for s in done]
                rest = [s for s in sessions if s.last + gap > watermark]
                if rest:
                    self._sessions[group] = rest
                else:
                    del self._sessions[group]
        else:
            length = self.spec.length_ms
            for key in [k for k in self._fixed if k[1] + length <= watermark]:
                closed.append(ClosedWindow(key[0], key[1], key[1] + length, self._fixed.pop(key)))
        closed.sort(key=lambda w: (w.start, repr(w.group)))
        return closed

    def open_windows(self) -> list[ClosedWindow]:
        """The windows still open, with their partial aggregates (for live views)."""
        if isinstance(self.spec, Session):
            gap = self.spec.gap_ms
            return [
                ClosedWindow(g, s.start, s.last + gap, s.agg)
                for g, sessions in self._sessions.items()
                for s in sessions
            ]
        length = self.spec.length_ms
        return [ClosedWindow(g, start, start + length, a) for (g, start), a in self._fixed.items()]

    def __len__(self) -> int:
        return len(self._fixed) + sum(len(s) for s in self._sessions.values())

    def snapshot(self) -> dict[str, Any]:
        return {
            "fixed": [[list(g), start, a.as_list()] for (g, start), a in self._fixed.items()],
            "sessions": [
                [list(g), s.start, s.last, s.agg.as_list()]
                for g, sessions in self._sessions.items()
                for s in sessions
            ],
        }

    @classmethod
    def restore(cls, spec: WindowSpec, data: Mapping[str, Any]) -> WindowOperator:
        op = cls(spec)
        for group, start, agg in data["fixed"]:
            op._fixed[(tuple(group), start)] = Agg.from_list(agg)
        for group, start, last, agg in data["sessions"]:
            session = _OpenSession(start, last, Agg.from_list(agg))
            op._sessions.setdefault(tuple(group), []).append(session)
        return op
