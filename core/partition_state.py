"""Everything one partition remembers between micro-batches, and how a batch changes it.

:class:`PartitionState` takes the raw records of one partition in offset order and
turns them into: window results that closed, records rejected (with the reason),
late records and a count of duplicates. It holds the dedup filter, the watermark and
the open windows of every declared window kind, and it snapshots to plain data.

The worker around it follows *snapshot before effect*: it saves the snapshot of the
state after a batch, together with that batch's outcome (the outbox), before it
writes the outcome to the sinks; after a crash it restores the snapshot and writes
the outbox again (the sinks are idempotent). Every decision, including one taken on
wall-clock time (an idle partition's watermark), is therefore durable before its
effect, and a replay cannot decide differently.

Dedup ids are not in the snapshot (there may be millions). The snapshot names the
offset from which to re-read the partition to rebuild them (:meth:`rebuild_dedup`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from core.columnar import Columns, decode_batch, late_mask, window_partials
from core.dedup import DedupFilter
from core.envelope import check_stored
from core.event_time import (
    Agg,
    ClosedWindow,
    Group,
    Hopping,
    PartitionWatermark,
    Session,
    Tumbling,
    WindowOperator,
    WindowSpec,
)


@dataclass(frozen=True, slots=True)
class WindowDef:
    """A named window kind, e.g. ``1m`` tumbling or ``5m/1m`` hopping."""

    name: str
    spec: WindowSpec


@dataclass(frozen=True, slots=True)
class ProcessingConfig:
    windows: tuple[WindowDef, ...]
    allowed_lateness_ms: int
    idle_timeout_ms: int
    dedup_horizon_ms: int
    dedup_max_ids: int = 2_000_000


@dataclass(frozen=True, slots=True)
class WindowResult:
    """One closed window of one group in one partition: a row for the sink."""

    window: str
    partition: int
    tenant: str
    type: str
    start: int
    end: int
    count: int
    sum: float
    min: float
    max: float


@dataclass(frozen=True, slots=True)
class RecordRef:
    """Where a record came from, and its bytes, for the dead-letter topic."""

    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class BatchOutcome:
    closed: list[WindowResult] = field(default_factory=list)
    rejected: list[tuple[RecordRef, str]] = field(default_factory=list)
    late: list[RecordRef] = field(default_factory=list)
    duplicates: int = 0
    processed: int = 0


def parse_window(text: str) -> WindowDef:
    """``1m`` tumbling, ``5m/1m`` hopping (size/hop), ``session:30s`` session windows."""
    units = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}

    def duration(part: str) -> int:
        for unit in sorted(units, key=len, reverse=True):
            number = part.removesuffix(unit)
            if number != part and number.isdigit() and int(number) > 0:
                return int(number) * units[unit]
        raise ValueError(
            f"window {text!r}: expected a duration such as 30s, 1m or 1h, got {part!r}"
        )

    if text.startswith("session:"):
        return WindowDef(text, Session(duration(text.removeprefix("session:"))))
    if "/" in text:
        size, hop = text.split("/", 1)
        return WindowDef(text, Hopping(duration(size), duration(hop)))
    return WindowDef(text, Tumbling(duration(text)))


def _group(event: Mapping[str, Any]) -> Group:
    return (event["tenant"], event["type"])


class PartitionState:
    """The state of one partition; see the module docstring for the contract."""

    def __init__(self, partition: int, config: ProcessingConfig, next_offset: int = 0) -> None:
        self.partition = partition
        self.config = config
        self.next_offset = next_offset
        self.watermark = PartitionWatermark(config.allowed_lateness_ms, config.idle_timeout_ms)
        self.operators = {w.name: WindowOperator(w.spec) for w in config.windows}
        self.dedup = DedupFilter(config.dedup_horizon_ms, max_ids=config.dedup_max_ids)

    # Processing ----------------------------------------------------------------

    def process(self, records: Sequence[RecordRef], wall_ms: int) -> BatchOutcome:
        """Fold one batch of this partition's records (in offset order).

        Clean batches take the columnar path; a batch with any bad record takes the
        per-record path, which says why each bad record was rejected.
        """
        sessions = any(isinstance(op.spec, Session) for op in self.operators.values())
        cols = None if sessions else decode_batch([r.value for r in records])
        out = (
            self._process_columns(records, cols, wall_ms)
            if cols
            else self._process_records(records, wall_ms)
        )
        if records:
            self.next_offset = records[-1].offset + 1
        out.closed = self.tick(wall_ms)
        return out

    def _process_columns(
        self, records: Sequence[RecordRef], cols: Columns, wall_ms: int
    ) -> BatchOutcome:
        out = BatchOutcome()
        offsets = [r.offset for r in records]
        fresh_mask = np.array(self.dedup.split_keys(cols.dedup_keys(), cols.ts.tolist(), offsets))
        out.duplicates = int((~fresh_mask).sum())
        mark = self.watermark.current(wall_ms)
        late = np.zeros(len(cols), dtype=bool)
        for op in self.operators.values():
            assert not isinstance(op.spec, Session)
            late |= late_mask(cols.ts, op.spec, mark)
        late &= fresh_mask
        out.late = [records[i] for i in np.flatnonzero(late).tolist()]
        on_time = cols.take(fresh_mask & ~late)
        for op in self.operators.values():
            assert not isinstance(op.spec, Session)
            for row in window_partials(on_time, op.spec, mark):
                agg = Agg(row["value_count"], row["value_sum"], row["value_min"], row["value_max"])
                op.merge_partial((row["tenant"], row["type"]), row["start"], agg)
        out.processed = len(on_time)
        self.watermark.observe(int(cols.ts.max()), wall_ms)
        return out

    def _process_records(self, records: Sequence[RecordRef], wall_ms: int) -> BatchOutcome:
        out = BatchOutcome()
        events: list[dict[str, Any]] = []
        offsets: dict[int, RecordRef] = {}
        for ref in records:
            event, reason = _decode(ref)
            if event is None:
                out.rejected.append((ref, reason))
                continue
            event["_offset"] = ref.offset
            offsets[ref.offset] = ref
            events.append(event)
        fresh, dupes = self.dedup.split(events, [e["_offset"] for e in events])
        out.duplicates = len(dupes)
        mark = self.watermark.current(wall_ms)
        # Late for any window kind means late for all: the event goes to the DLQ once
        # and counts nowhere, so that one rule recomputes every aggregate offline.
        on_time: list[Mapping[str, Any]] = []
        for candidate in fresh:
            if any(op.is_late(candidate["ts"], mark) for op in self.operators.values()):
                out.late.append(offsets[candidate["_offset"]])
            else:
                on_time.append(candidate)
        for op in self.operators.values():
            op.add(on_time, _group, mark)
        out.processed = len(on_time)
        if events:
            self.watermark.observe(max(e["ts"] for e in events), wall_ms)
        return out

    def tick(self, wall_ms: int) -> list[WindowResult]:
        """Close what the watermark (perhaps advanced by idleness) has passed."""
        mark = self.watermark.current(wall_ms)
        if mark is None:
            return []
        self.dedup.advance(mark)
        results: list[WindowResult] = []
        for name, op in self.operators.items():
            results.extend(self._result(name, w) for w in op.close_until(mark))
        return results

    def _result(self, name: str, w: ClosedWindow) -> WindowResult:
        tenant, type_ = w.group
        a = w.agg
        return WindowResult(
            name,
            self.partition,
            str(tenant),
            str(type_),
            w.start,
            w.end,
            a.count,
            a.sum,
            a.min,
            a.max,
        )

    def open_windows(self) -> list[WindowResult]:
        return [
            self._result(name, w) for name, op in self.operators.items() for w in op.open_windows()
        ]

    # Snapshots -----------------------------------------------------------------

    def dedup_rebuild_from(self) -> int:
        """The offset from which re-reading the partition rebuilds the dedup filter."""
        first = self.dedup.rebuild_from()
        return self.next_offset if first is None else first

    def rebuild_dedup(self, records: Sequence[RecordRef]) -> None:
        """Re-learn the ids of records already processed (offsets before ``next_offset``)."""
        events = []
        for ref in records:
            if ref.offset >= self.next_offset:
                break
            event, _reason = _decode(ref)
            if event is not None:
                event["_offset"] = ref.offset
                events.append(event)
        counted = self.dedup.stats.duplicates
        self.dedup.split(events, [e["_offset"] for e in events])
        self.dedup.stats.duplicates = counted  # a rebuild re-reads; it finds nothing new

    def snapshot(self) -> dict[str, Any]:
        mark = self.watermark
        return {
            "partition": self.partition,
            "next_offset": self.next_offset,
            "dedup_from": self.dedup_rebuild_from(),
            "watermark": [mark.max_ts, mark.last_event_wall_ms],
            "windows": {name: op.snapshot() for name, op in self.operators.items()},
        }

    @classmethod
    def restore(cls, config: ProcessingConfig, data: Mapping[str, Any]) -> PartitionState:
        state = cls(data["partition"], config, data["next_offset"])
        state.watermark.max_ts, state.watermark.last_event_wall_ms = data["watermark"]
        for w in config.windows:
            if w.name in data["windows"]:
                state.operators[w.name] = WindowOperator.restore(w.spec, data["windows"][w.name])
        return state


def _decode(ref: RecordRef) -> tuple[dict[str, Any] | None, str]:
    try:
        event = orjson.loads(ref.value or b"")
    except orjson.JSONDecodeError as exc:
        return None, f"not JSON: {exc}"
    problem = check_stored(event)
    if problem is not None:
        return None, problem
    event.setdefault("source", "")
    return event, ""


def combine_results(
    closed: Sequence[WindowResult], live: Sequence[WindowResult]
) -> list[dict[str, Any]]:
    """Merge stored (closed) and live (open) rows into one row per window start.

    Rows are per partition; a partition's window is either still open in its worker
    or stored, and when it shows up in both (it closed between the two reads) the
    stored row wins, so nothing counts twice.
    """
    rows: dict[tuple[int, int], tuple[WindowResult, bool]] = {
        (r.start, r.partition): (r, True) for r in live
    }
    rows.update({(r.start, r.partition): (r, False) for r in closed})
    merged: dict[int, dict[str, Any]] = {}
    for (start, _partition), (r, is_open) in sorted(rows.items()):
        m = merged.get(start)
        if m is None:
            merged[start] = {
                "start": start,
                "end": r.end,
                "count": r.count,
                "sum": r.sum,
                "min": r.min,
                "max": r.max,
                "open": is_open,
            }
            continue
        m["end"] = max(m["end"], r.end)
        m["count"] += r.count
        m["sum"] += r.sum
        m["min"] = min(m["min"], r.min)
        m["max"] = max(m["max"], r.max)
        m["open"] = m["open"] or is_open
    return list(merged.values())
