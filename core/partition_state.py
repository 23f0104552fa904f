"""Everything one partition remembers between micro-batches, and how a batch changes it.

:class:`PartitionState` holds what one partition remembers: the dedup filter, the
watermark, the open windows (panes) of every declared window kind and the CEP
engine's state; it snapshots to plain data. A batch is folded into it by
:func:`core.batch.process_batch` (several partitions at once, column-wise), which
gives each partition a :class:`BatchOutcome`: the windows that closed, the records
rejected (with the reason), the late records, the CEP matches and the counts.

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

import base64
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any, NamedTuple

from core.batch import Runtime, process_batch
from core.cep import CepEngine, Match
from core.columnar import Layout, decode_record
from core.dedup import DedupFilter
from core.event_time import (
    ClosedWindow,
    Group,
    Hopping,
    Lateness,
    PartitionWatermark,
    Session,
    Tumbling,
    WindowOperator,
    WindowSpec,
)
from core.sketches import DDSketch, HyperLogLog
from core.transforms import EnrichmentSpec, Transform


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
    layout: Layout = field(default_factory=Layout)
    transforms: tuple[Transform, ...] = ()
    enrichment: tuple[EnrichmentSpec, ...] = ()
    group_by: tuple[str, ...] = ()
    distinct: str | None = None
    quantiles: bool = False
    max_future_ms: int = 300_000
    """An event stamped further ahead of its arrival in Kafka is refused (``future``)."""
    max_tenants: int = 10_000
    """Most tenants whose watermark one partition keeps apart (see PartitionWatermark)."""
    lateness_overrides: tuple[tuple[str, int], ...] = ()
    """(tenant name pattern, allowed lateness in ms), the first match winning."""

    @property
    def lateness(self) -> Lateness:
        return Lateness(self.allowed_lateness_ms, self.lateness_overrides)


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
    dims: tuple[tuple[str, str], ...] = ()
    distinct: str | None = None  # a HyperLogLog, base64
    quantiles: str | None = None  # a DDSketch, base64

    @property
    def group_key(self) -> str:
        """The group-by values as one text (empty without group-by): part of the row key."""
        return "\x1f".join(f"{name}={value}" for name, value in self.dims)

    def to_row(self) -> list[Any]:
        return [
            self.window,
            self.partition,
            self.tenant,
            self.type,
            self.start,
            self.end,
            self.count,
            self.sum,
            self.min,
            self.max,
            [list(pair) for pair in self.dims],
            self.distinct,
            self.quantiles,
        ]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> WindowResult:
        values = list(row)
        if len(values) > 10:
            values[10] = tuple((str(n), str(v)) for n, v in values[10])
        return cls(*values)

    def distinct_estimate(self) -> float | None:
        if self.distinct is None:
            return None
        return HyperLogLog.from_bytes(base64.b64decode(self.distinct)).estimate()

    def quantile(self, q: float) -> float | None:
        if self.quantiles is None:
            return None
        return DDSketch.from_bytes(base64.b64decode(self.quantiles)).quantile(q)


class RecordRef(NamedTuple):
    """Where a record came from, its bytes (for the dead-letter topic), and when Kafka
    appended it (epoch ms; None when unknown: the event time stands in for it).

    A named tuple: the worker makes one per consumed record, and a tuple is several
    times cheaper to build than a frozen dataclass.
    """

    offset: int
    key: bytes | None
    value: bytes | None
    arrival: int | None = None


@dataclass
class BatchOutcome:
    closed: list[WindowResult] = field(default_factory=list)
    rejected: list[tuple[RecordRef, str]] = field(default_factory=list)
    late: list[RecordRef] = field(default_factory=list)
    alerts: list[Match] = field(default_factory=list)
    duplicates: int = 0
    processed: int = 0
    filtered: int = 0


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


class PartitionState:
    """The state of one partition; see the module docstring for the contract."""

    def __init__(self, partition: int, config: ProcessingConfig, next_offset: int = 0) -> None:
        self.partition = partition
        self.config = config
        self.next_offset = next_offset
        self.watermark = PartitionWatermark(
            config.lateness, config.idle_timeout_ms, config.max_tenants
        )
        # per tenant of the batch, the watermark its lateness is judged by
        self.mark_before: dict[str, int | None] = {}
        self.operators = {w.name: WindowOperator(w.spec) for w in config.windows}
        self.dedup = DedupFilter(config.dedup_horizon_ms, max_ids=config.dedup_max_ids)
        self.cep = CepEngine(())
        self.rules_version: int | None = None

    # Processing ----------------------------------------------------------------

    def process(self, records: Sequence[RecordRef], runtime: Runtime | None = None) -> BatchOutcome:
        """Fold one batch of this partition's records (in offset order)."""
        states = {self.partition: self}
        batch = {self.partition: records}
        outcomes, _counted = process_batch(states, batch, runtime or Runtime())
        return outcomes[self.partition]

    def sync_rules(self, runtime: Runtime) -> None:
        """Take the CEP rules in force (a hot reload keeps the state of unchanged rules)."""
        if runtime.rules_version != self.rules_version:
            self.cep.set_rules(runtime.rules)
            self.rules_version = runtime.rules_version

    def tick(self) -> tuple[list[WindowResult], list[Match]]:
        """Close what each tenant's watermark has passed; forget idle tenants."""
        marks = self.watermark
        low = marks.low()
        if low is None:
            return [], []
        self.dedup.advance(low)
        results: list[WindowResult] = []
        for name, op in self.operators.items():
            closed = op.close_until(marks.of, marks.since, marks.tenants)
            results.extend(self._result(name, w) for w in closed)
        matches = self.cep.on_watermark(self._cep_watermark(low))
        marks.closed()
        marks.forget_idle()
        return results, matches

    def _cep_watermark(self, low: int) -> int:
        """The event time the CEP rules may treat as final: the lowest watermark of the
        tenants they name (of every tenant, when one names none)."""
        tenants = {rule.tenant for rule in self.cep.rules}
        if not tenants or None in tenants:
            return low
        return min(self.watermark.of(str(t)) or low for t in tenants)

    def _result(self, name: str, w: ClosedWindow) -> WindowResult:
        tenant, type_, *dims = w.group
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
            # (a window restored from other settings may lack a column: it is empty)
            tuple(
                (name, str(d))
                for name, d in zip_longest(
                    self.config.group_by, dims[: len(self.config.group_by)], fillvalue=""
                )
            ),
            None if a.distinct is None else base64.b64encode(a.distinct.to_bytes()).decode(),
            None if a.quantiles is None else base64.b64encode(a.quantiles.to_bytes()).decode(),
        )

    def open_windows(self, sketches: bool = True) -> list[WindowResult]:
        """The open windows' partial results; without ``sketches`` (cheaper), no
        distinct counts or quantiles."""
        return [
            self._result(name, w)
            for name, op in self.operators.items()
            for w in op.open_windows(sketches, self.watermark.since)
        ]

    # Snapshots -----------------------------------------------------------------

    def dedup_rebuild_from(self) -> int:
        """The offset from which re-reading the partition rebuilds the dedup filter."""
        first = self.dedup.rebuild_from()
        return self.next_offset if first is None else first

    def rebuild_dedup(
        self,
        records: Sequence[RecordRef],
        avro: Callable[[bytes], dict[str, Any]] | None = None,
    ) -> None:
        """Re-learn the ids of records already processed (offsets before ``next_offset``)."""
        keys, times, offsets = [], [], []
        for ref in records:
            if ref.offset >= self.next_offset:
                break
            row, _reason = decode_record(ref.value, Layout(), avro)
            if row is not None:
                keys.append(f"{row['tenant']}\x1f{row['source'] or ''}\x1f{row['event_id']}")
                times.append(int(row["ts"]))
                offsets.append(ref.offset)
        counted = self.dedup.stats.duplicates
        self.dedup.split_keys(keys, times, offsets)
        self.dedup.stats.duplicates = counted  # a rebuild re-reads; it finds nothing new

    def snapshot(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "next_offset": self.next_offset,
            "dedup_from": self.dedup_rebuild_from(),
            "watermark": self.watermark.snapshot(),
            "windows": {name: op.snapshot() for name, op in self.operators.items()},
            "group_by": list(self.config.group_by),
            "cep": self.cep.snapshot(),
        }

    @classmethod
    def restore(
        cls, config: ProcessingConfig, data: Mapping[str, Any], runtime: Runtime | None = None
    ) -> PartitionState:
        state = cls(data["partition"], config, data["next_offset"])
        state.watermark.restore(data["watermark"])
        saved_by = tuple(data.get("group_by", ()))
        for w in config.windows:
            if w.name in data["windows"]:
                op = WindowOperator.restore(w.spec, data["windows"][w.name])
                if saved_by != config.group_by:
                    op = _regrouped(op, saved_by, config.group_by)
                state.operators[w.name] = op
        runtime = runtime or Runtime()
        rules = list(runtime.rules)
        state.cep = CepEngine.restore(rules, data["cep"]) if "cep" in data else CepEngine(rules)
        state.rules_version = runtime.rules_version
        return state


def _regrouped(
    op: WindowOperator, before: tuple[str, ...], after: tuple[str, ...]
) -> WindowOperator:
    """Open windows keyed by the group-by columns of ``after``, from a snapshot taken
    under ``before`` (the settings changed): columns new to the group-by are empty for
    the windows opened before, and groups that only dropped columns differ in merge."""
    out = WindowOperator(op.spec)
    out._closed_through = dict(op._closed_through)
    out._uniform = op._uniform

    def regroup(group: Group) -> Group:
        tenant, type_, *dims = group
        values = dict(zip(before, dims, strict=False))
        return (tenant, type_, *(values.get(name, "") for name in after))

    for (group, pane), agg in op._fixed.items():
        out.merge_partial(regroup(group), pane, agg)
    for group, sessions in op._sessions.items():
        out._sessions.setdefault(regroup(group), []).extend(sessions)
    return out


def combine_results(
    closed: Sequence[WindowResult], live: Sequence[WindowResult]
) -> list[dict[str, Any]]:
    """Merge stored (closed) and live (open) rows into one row per window start and group.

    Rows are per partition; a partition's window is either still open in its worker
    or stored, and when it shows up in both (it closed between the two reads) the
    stored row wins, so nothing counts twice. Distinct counts and quantiles merge
    their sketches across partitions, so they are exact sketches of the union.
    """
    rows: dict[tuple[int, str, int], tuple[WindowResult, bool]] = {
        (r.start, r.group_key, r.partition): (r, True) for r in live
    }
    rows.update({(r.start, r.group_key, r.partition): (r, False) for r in closed})
    merged: dict[tuple[int, str], _Merged] = {}
    for (start, group, _partition), (r, is_open) in sorted(rows.items()):
        m = merged.get((start, group))
        if m is None:
            merged[(start, group)] = m = _Merged(r)
        m.add(r, is_open)
    return [m.as_dict() for m in merged.values()]


@dataclass
class _Merged:
    first: WindowResult
    count: int = 0
    sum: float = 0.0
    min: float = float("inf")
    max: float = float("-inf")
    end: int = 0
    open: bool = False
    distinct: HyperLogLog | None = None
    quantiles: DDSketch | None = None

    def add(self, r: WindowResult, is_open: bool) -> None:
        self.count += r.count
        self.sum += r.sum
        self.min = min(self.min, r.min)
        self.max = max(self.max, r.max)
        self.end = max(self.end, r.end)
        self.open = self.open or is_open
        if r.distinct is not None:
            hll = HyperLogLog.from_bytes(base64.b64decode(r.distinct))
            self.distinct = hll if self.distinct is None else _merged(self.distinct, hll)
        if r.quantiles is not None:
            sketch = DDSketch.from_bytes(base64.b64decode(r.quantiles))
            self.quantiles = sketch if self.quantiles is None else _merged(self.quantiles, sketch)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "start": self.first.start,
            "end": self.end,
            "count": self.count,
            "sum": self.sum,
            "min": self.min,
            "max": self.max,
            "avg": self.sum / self.count if self.count else None,
            "open": self.open,
        }
        if self.first.dims:
            out["group"] = dict(self.first.dims)
        if self.distinct is not None:
            out["distinct"] = round(self.distinct.estimate())
        if self.quantiles is not None:
            out["quantiles"] = {f"p{round(q * 100)}": self.quantiles.quantile(q) for q in _QS}
        return out


_QS = (0.5, 0.9, 0.99)


def _merged(a: Any, b: Any) -> Any:
    a.merge(b)
    return a
