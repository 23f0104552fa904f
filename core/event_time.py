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


@dataclass
class PartitionWatermark:
    allowed_lateness_ms: int
    idle_timeout_ms: int
    max_ts: int | None = None
    last_event_wall_ms: int | None = None
    # The highest watermark handed out: it never goes back, even when events arrive
    # after an idle spell moved it ahead on the wall clock.
    floor: int | None = None

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
        if self.floor is not None and mark < self.floor:
            return self.floor
        self.floor = mark
        return mark


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
    """

    spec: WindowSpec
    # (group, pane start) -> aggregate of the pane's events
    _fixed: dict[tuple[Group, int], Agg] = field(default_factory=dict, init=False)
    # group -> its open sessions, sorted by start, each at least one gap from the next
    _sessions: dict[Group, list[_OpenSession]] = field(default_factory=dict, init=False)
    # Windows ending at or before this watermark have been handed out by close_until.
    _closed_through: int | None = field(default=None, init=False)

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
            since = self._closed_through
            closed = self._windows(lambda end: end <= watermark and (since is None or end > since))
            length = self.spec.length_ms
            for key in [k for k in self._fixed if k[1] + length <= watermark]:
                del self._fixed[key]  # no open window holds this pane any more
            self._closed_through = watermark if since is None else max(since, watermark)
        closed.sort(key=lambda w: (w.start, repr(w.group)))
        return closed

    def _windows(self, wanted: Callable[[int], bool], sketches: bool = True) -> list[ClosedWindow]:
        """The windows whose end is ``wanted``, each the merge of its panes."""
        assert not isinstance(self.spec, Session)
        step, length = self.step_ms, self.spec.length_ms
        parts: dict[tuple[Group, int], list[tuple[int, Agg]]] = {}
        for (group, pane), agg in self._fixed.items():
            for start in range(pane - length + step, pane + 1, step):
                if wanted(start + length):
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

    def open_windows(self, sketches: bool = True) -> list[ClosedWindow]:
        """The windows still open, with their partial aggregates (for live views);
        without ``sketches``, hopping windows skip merging their sketches (cheaper)."""
        if isinstance(self.spec, Session):
            gap = self.spec.gap_ms
            return [
                ClosedWindow(g, s.start, s.last + gap, s.agg)
                for g, sessions in self._sessions.items()
                for s in sessions
            ]
        since = self._closed_through
        return self._windows(lambda end: since is None or end > since, sketches)

    def __len__(self) -> int:
        return len(self._fixed) + sum(len(s) for s in self._sessions.values())

    def snapshot(self) -> dict[str, Any]:
        return {
            "panes": True,
            "closed_through": self._closed_through,
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
        op._closed_through = data.get("closed_through")
        for group, start, agg in data["fixed"]:
            op._fixed[(tuple(group), start)] = Agg.from_list(agg)
        for group, start, last, agg in data["sessions"]:
            session = _OpenSession(start, last, Agg.from_list(agg))
            op._sessions.setdefault(tuple(group), []).append(session)
        return op
