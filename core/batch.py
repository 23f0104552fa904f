"""One consumed batch, all of its partitions, in one columnar pass.

A worker's consumer hands back records of several partitions at once. Splitting them
per partition first would pay every fixed cost (a JSON parse, a hash aggregation)
once per partition; instead this module decodes the whole batch into one Arrow table
with the partition as a column, and runs each stage over the whole table:

1. decode JSON (one Arrow parse) or, when any record is not a clean envelope, record
   by record (JSON or Avro in the Confluent wire format), rejecting the bad ones with
   their reason;
2. check records against the schema registered for their (source, type), and refuse
   those stamped too far ahead of their arrival in Kafka (``future``);
3. apply the transforms declared in the settings (rename, cast, derive, filter);
4. enrich from the dimension tables (a vectorised lookup);
5. per partition, drop duplicates (the partition's dedup filter) and set aside late
   records (their tenant's watermark in the partition before this batch);
6. aggregate per (partition, group, window start) and fold the partials into each
   partition's open windows; session windows fold record by record;
7. feed the records the CEP rules look at to each partition's CEP engine.

Then each tenant's watermark advances, windows close, and CEP rules that wait on
the watermark fire. Everything a partition decides lands in its own
:class:`~core.partition_state.BatchOutcome`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from core.avro import subject_for
from core.cep import Rule
from core.columnar import (
    NO_WATERMARK,
    decode_json,
    decode_record,
    group_ids,
    late_mask,
    table_from_events,
    window_partials,
)
from core.dead_letters import FUTURE
from core.dedup import id_hashes
from core.event_time import Hopping, Session, Tumbling
from core.sketches import hash64
from core.transforms import apply_transforms, enrich

if TYPE_CHECKING:
    from core.partition_state import BatchOutcome, PartitionState, RecordRef

Validator = Callable[[Mapping[str, Any]], list[str]]


@dataclass
class Runtime:
    """Inputs of a batch that change while the pipeline runs; the worker keeps them current.

    Attributes:
        dimensions: the current table of each enrichment dimension, by table name.
        avro: decodes one Avro record in the Confluent wire format into an envelope.
        validator: the check of the schema registered for a subject, or None.
        rules: the CEP rules in force.
        rules_version: changes whenever ``rules`` does (a hot reload).
    """

    dimensions: Mapping[str, pa.Table] = field(default_factory=dict)
    avro: Callable[[bytes], dict[str, Any]] | None = None
    validator: Callable[[str], Validator | None] = lambda _subject: None
    rules: Sequence[Rule] = ()
    rules_version: int = 0


_ENVELOPE_COLUMNS = ["event_id", "source", "tenant", "type", "ts", "value", "entity"]


def process_batch(
    states: Mapping[int, PartitionState],
    records: Mapping[int, Sequence[RecordRef]],
    runtime: Runtime,
) -> tuple[dict[int, BatchOutcome], pa.Table | None]:
    """Fold each partition's records (in offset order) into its state; see the module.

    Returns:
        Each partition's outcome, and the envelope columns of the records that counted
        (with ``_row``, their index in the batch, and ``_partition``), for the raw-event
        sink; None when the batch was empty.
    """
    from core.partition_state import BatchOutcome

    outcomes = {p: BatchOutcome() for p in states}
    refs: list[RecordRef] = []
    parts: list[int] = []
    for partition, batch in records.items():
        refs.extend(batch)
        parts.extend([partition] * len(batch))
    for state in states.values():
        state.sync_rules(runtime)
    counted = None
    if refs:
        config = next(iter(states.values())).config
        table = _decode(refs, parts, config.layout, runtime, outcomes)
        table = _check_schemas(table, refs, runtime, outcomes)
        table = _check_future(table, refs, config.max_future_ms, outcomes)
        _observe(states, table)
        on_time = _fold(states, table, refs, runtime, outcomes)
        counted = table.select([*_ENVELOPE_COLUMNS, "_row", "_partition"])
        counted = counted.filter(pc.is_in(counted["_row"], on_time["_row"]))
    for partition, batch in records.items():
        if batch:
            states[partition].next_offset = batch[-1].offset + 1
    for partition, state in states.items():
        closed, alerts = state.tick()
        outcomes[partition].closed = closed
        outcomes[partition].alerts.extend(alerts)
    return outcomes, counted


def _decode(
    refs: Sequence[RecordRef],
    parts: Sequence[int],
    layout: Any,
    runtime: Runtime,
    outcomes: dict[int, BatchOutcome],
) -> pa.Table:
    table = decode_json([r.value for r in refs], layout)
    if table is not None:
        row_index = np.arange(len(refs), dtype=np.int64)
    else:
        rows, kept = [], []
        for i, ref in enumerate(refs):
            row, reason = decode_record(ref.value, layout, runtime.avro)
            if row is None:
                outcomes[parts[i]].rejected.append((ref, reason))
            else:
                rows.append(row)
                kept.append(i)
        table = table_from_events(rows, layout)
        row_index = np.asarray(kept, dtype=np.int64)
    partition = np.asarray(parts, dtype=np.int64)[row_index]
    known = (-1 if r.arrival is None else r.arrival for r in refs)
    arrival = np.fromiter(known, np.int64, len(refs))[row_index]
    ts = table["ts"].to_numpy()
    table = table.append_column("_row", pa.array(row_index))
    table = table.append_column("_partition", pa.array(partition))
    # where Kafka's append time is unknown, the event time stands in for it
    return table.append_column("_arrival", pa.array(np.where(arrival < 0, ts, arrival)))


def _check_schemas(
    table: pa.Table, refs: Sequence[RecordRef], runtime: Runtime, outcomes: dict[int, BatchOutcome]
) -> pa.Table:
    """Reject records that break the schema registered for their (source, type)."""
    if not table.num_rows:
        return table
    pairs = table.select(["source", "type"]).group_by(["source", "type"]).aggregate([])
    checked = {
        (s, t): v
        for s, t in zip(pairs["source"].to_pylist(), pairs["type"].to_pylist(), strict=True)
        if s and t and (v := runtime.validator(subject_for(s, t))) is not None
    }
    if not checked:
        return table
    keep = np.ones(table.num_rows, dtype=bool)
    rows = table.select(["source", "type", "_row", "_partition"]).to_pylist()
    for i, row in enumerate(rows):
        check = checked.get((row["source"], row["type"]))
        if check is None:
            continue
        ref = refs[row["_row"]]
        value = ref.value or b""
        if value[:1] != b"{":
            continue  # an Avro record was decoded with its own registered schema
        problems = check(orjson.loads(value))
        if problems:
            subject = subject_for(row["source"], row["type"])
            reason = f"schema '{subject}': " + "; ".join(problems)
            outcomes[row["_partition"]].rejected.append((ref, reason))
            keep[i] = False
    return table.filter(pa.array(keep))


def _check_future(
    table: pa.Table,
    refs: Sequence[RecordRef],
    max_future_ms: int,
    outcomes: dict[int, BatchOutcome],
) -> pa.Table:
    """Refuse records stamped more than ``max_future_ms`` ahead of their arrival: their
    clock is wrong, and they must not hold windows open or move a watermark."""
    if not table.num_rows:
        return table
    ahead = table["ts"].to_numpy() - table["_arrival"].to_numpy() > max_future_ms
    if not ahead.any():
        return table
    rows, parts = table["_row"].to_numpy(), table["_partition"].to_numpy()
    for i in np.flatnonzero(ahead).tolist():
        outcomes[int(parts[i])].rejected.append((refs[int(rows[i])], FUTURE))
    return table.filter(pa.array(~ahead))


def _observe(states: Mapping[int, PartitionState], table: pa.Table) -> None:
    """Remember each tenant's watermark before the batch, then let the marks see it."""
    for state in states.values():
        state.mark_before = {}
    if not table.num_rows:
        return
    capped = pc.min_element_wise(table["ts"], table["_arrival"])
    seen = (
        pa.table(
            {"p": table["_partition"], "t": table["tenant"], "c": capped, "a": table["_arrival"]}
        )
        .group_by(["p", "t"])
        .aggregate([("c", "max"), ("a", "max")])
    )
    by_partition: dict[int, dict[str, tuple[int, int]]] = {}
    for p, tenant, ts, arrival in zip(
        *(seen[name].to_pylist() for name in ("p", "t", "c_max", "a_max")), strict=True
    ):
        by_partition.setdefault(p, {})[tenant] = (ts, arrival)
    for p, tenants in by_partition.items():
        marks = states[p].watermark
        states[p].mark_before = {tenant: marks.of(tenant) for tenant in tenants}
        marks.observe(tenants)


def _fold(
    states: Mapping[int, PartitionState],
    table: pa.Table,
    refs: Sequence[RecordRef],
    runtime: Runtime,
    outcomes: dict[int, BatchOutcome],
) -> pa.Table:
    config = next(iter(states.values())).config
    if config.transforms and table.num_rows:
        done = apply_transforms(table, config.transforms)
        row_of = table["_row"].to_numpy()
        part_of = table["_partition"].to_numpy()
        for i, reason in sorted(done.failed.items()):
            outcomes[int(part_of[i])].rejected.append((refs[int(row_of[i])], reason))
        dropped = ~done.kept
        dropped[list(done.failed)] = False
        for p in part_of[dropped].tolist():
            outcomes[int(p)].filtered += 1
        table = done.table
    for spec in config.enrichment:
        dim = runtime.dimensions.get(spec.table)
        if dim is None:  # not loaded (yet): every lookup misses
            names = [spec.key, *spec.columns]
            dim = pa.table({name: pa.array([], pa.string()) for name in names})
        table, _misses = enrich(table, dim, spec)
    on_time = _split(states, table, refs, outcomes)
    _aggregate(states, on_time)
    _feed_rules(states, on_time)
    return on_time


def _split(
    states: Mapping[int, PartitionState],
    table: pa.Table,
    refs: Sequence[RecordRef],
    outcomes: dict[int, BatchOutcome],
) -> pa.Table:
    """Drop duplicates and set aside late records; return the rows that count."""
    if not table.num_rows:
        return table
    part = table["_partition"].to_numpy()
    ts = table["ts"].to_numpy()
    rows = table["_row"].to_numpy()
    hashes = id_hashes(table["tenant"], table["source"], table["event_id"])
    offset_of = np.fromiter((r.offset for r in refs), np.int64, len(refs))[rows]
    tenants = pc.dictionary_encode(table["tenant"]).combine_chunks()
    tenant_of = tenants.indices.to_numpy(zero_copy_only=False)
    names = tenants.dictionary.to_pylist()
    fresh = np.zeros(len(part), dtype=bool)
    marks = np.full(len(part), NO_WATERMARK, dtype=np.int64)
    for p in np.unique(part).tolist():
        idx = np.flatnonzero(part == p)
        state = states[p]
        mask = state.dedup.split_hashes(hashes[idx], ts[idx], offset_of[idx])
        fresh[idx] = mask
        outcomes[p].duplicates += len(idx) - int(mask.sum())
        before = state.mark_before
        lookup = np.array(
            [NO_WATERMARK if before.get(n) is None else before[n] for n in names], np.int64
        )
        marks[idx] = lookup[tenant_of[idx]]
    late = np.zeros(len(part), dtype=bool)
    for op in next(iter(states.values())).operators.values():
        if isinstance(op.spec, Session):
            late |= ts + op.spec.gap_ms <= marks
        else:
            late |= late_mask(ts, op.spec, marks)
    late &= fresh
    for i in np.flatnonzero(late).tolist():
        outcomes[int(part[i])].late.append(refs[int(rows[i])])
    keep = fresh & ~late
    for p, n in zip(*np.unique(part[keep], return_counts=True), strict=True):
        outcomes[int(p)].processed += int(n)
    on_time = table.filter(pa.array(keep))
    return on_time.append_column("_mark", pa.array(marks[keep]))


def _aggregate(states: Mapping[int, PartitionState], table: pa.Table) -> None:
    if not table.num_rows:
        return
    config = next(iter(states.values())).config
    key_columns = ["_partition", "tenant", "type", *config.group_by]
    for name in key_columns:
        if name not in table.column_names:
            raise ValueError(
                f"group_by column {name!r} is not in the batch; columns are "
                f"{sorted(table.column_names)} (declare attributes or an enrichment)"
            )
    group = group_ids([table[name] for name in key_columns])
    ts = table["ts"].to_numpy()
    values = table["value"].to_numpy()
    marks = table["_mark"].to_numpy()
    distinct = None
    if config.distinct is not None:
        column = table[config.distinct].combine_chunks()
        valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        hashes = np.zeros(len(column), dtype=np.uint64)
        hashes[valid] = hash64(column.filter(column.is_valid()))
        distinct = (hashes, valid)
    for name, op in next(iter(states.values())).operators.items():
        if isinstance(op.spec, Session):
            keys = [table[column].to_pylist() for column in key_columns]
            _fold_sessions(states, table, name, keys)
            continue
        spec: Tumbling | Hopping = op.spec
        partials = window_partials(group, ts, values, marks, spec, distinct, config.quantiles)
        rows = pa.array([p.row for p in partials], pa.int64())
        for partial, key in zip(
            partials, table.select(key_columns).take(rows).to_pylist(), strict=True
        ):
            values_of = [key[column] for column in key_columns]
            state = states[int(values_of[0])]
            state.operators[name].merge_partial(
                tuple(_text(v) for v in values_of[1:]), partial.start, partial.agg
            )


def _fold_sessions(
    states: Mapping[int, PartitionState], table: pa.Table, name: str, keys: list[list[Any]]
) -> None:
    """Session windows merge per event: the one stage that stays per record."""
    rows = table.select(["ts", "value", "_mark"]).to_pylist()
    by_partition: dict[int, list[dict[str, Any]]] = {}
    for i, row in enumerate(rows):
        row["_group"] = tuple(_text(column[i]) for column in keys[1:])
        by_partition.setdefault(int(keys[0][i]), []).append(row)
    for partition, events in by_partition.items():
        # late records are gone already (judged in _split by their tenant's watermark)
        states[partition].operators[name].add(events, lambda e: e["_group"], None)


def _feed_rules(states: Mapping[int, PartitionState], table: pa.Table) -> None:
    """Hand each partition's CEP engine the events its rules look at (they match when
    the watermark makes them final, in :meth:`PartitionState.tick`)."""
    first = next(iter(states.values()))
    types = first.cep.types
    if not types or not table.num_rows:
        return
    wanted = table.filter(pc.is_in(table["type"], pa.array(sorted(types), pa.string())))
    if not wanted.num_rows:
        return
    columns = ["event_id", "tenant", "type", "ts", "value", "_partition"]
    columns += sorted(k for k in first.cep.key_fields() if k in wanted.column_names)
    by_partition: dict[int, list[dict[str, Any]]] = {}
    for event in wanted.select(list(dict.fromkeys(columns))).to_pylist():
        by_partition.setdefault(event["_partition"], []).append(event)
    for partition, events in by_partition.items():
        states[partition].cep.on_events(events)


def _text(value: Any) -> str:
    """A group key's value as text: a stable key for the sinks (null becomes '')."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def flat_offsets(records: dict[int, list[RecordRef]]) -> np.ndarray:
    """The offsets of the batch's records in the order ``_row`` numbers them."""
    flat = [r.offset for batch in records.values() for r in batch]
    return np.fromiter(flat, np.int64, len(flat))


def raw_event_rows(
    counted: pa.Table | None, records: dict[int, list[RecordRef]], partitions: set[int]
) -> pa.Table | None:
    """The rows for the raw-event table: envelope columns, origin and the JSON payload."""
    if counted is None or not counted.num_rows:
        return None
    keep = pc.is_in(counted["_partition"], pa.array(sorted(partitions), pa.int64()))
    counted = counted.filter(keep)
    rows = counted["_row"]
    # one Arrow array of the whole batch, then a take: no Python call per row
    payloads = pa.array([r.value for batch in records.values() for r in batch], pa.binary())
    return pa.table(
        {
            "tenant": counted["tenant"],
            "type": counted["type"],
            "ts": pc.cast(counted["ts"], pa.timestamp("ms", "UTC")),
            "source": pc.fill_null(counted["source"], ""),
            "event_id": counted["event_id"],
            "entity": pc.fill_null(counted["entity"], ""),
            "value": counted["value"],
            "partition": pc.cast(counted["_partition"], pa.uint16()),
            "offset": pa.array(flat_offsets(records), pa.uint64()).take(rows),
            "payload": payloads.take(rows),
        }
    )
