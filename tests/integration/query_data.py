"""Synthetic raw events with known aggregates, for the rollup and query tests."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
import pyarrow as pa

MINUTE_MS = 60_000


@dataclass(frozen=True, slots=True)
class Event:
    tenant: str
    type: str
    ts: int
    event_id: str
    entity: str
    value: float
    region: str
    source: str = "synthetic"


def make_events(
    tenants: Sequence[str], start_ms: int, minutes: int, per_minute: int, seed: int = 1
) -> list[Event]:
    """``per_minute`` events a minute for each tenant, two types, three regions."""
    rng = random.Random(seed)
    events = []
    for tenant in tenants:
        for m in range(minutes):
            for i in range(per_minute):
                ts = start_ms + m * MINUTE_MS + rng.randrange(MINUTE_MS)
                events.append(
                    Event(
                        tenant=tenant,
                        type=("click", "view")[i % 2],
                        ts=ts,
                        event_id=f"{tenant}-{m}-{i}",
                        entity=f"user-{rng.randrange(40)}",
                        value=float(rng.randrange(1000)) / 10,
                        region=("eu", "us", "apac")[rng.randrange(3)],
                    )
                )
    return events


def events_table(events: Sequence[Event], partition: int = 0) -> pa.Table:
    """The rows of the ``events`` table for these events."""
    return pa.table(
        {
            "tenant": [e.tenant for e in events],
            "type": [e.type for e in events],
            "ts": pa.array([e.ts for e in events], pa.int64()).cast(pa.timestamp("ms", "UTC")),
            "source": [e.source for e in events],
            "event_id": [e.event_id for e in events],
            "entity": [e.entity for e in events],
            "value": pa.array([e.value for e in events], pa.float64()),
            "partition": pa.array([partition] * len(events), pa.uint16()),
            "offset": pa.array(range(len(events)), pa.uint64()),
            "payload": [
                orjson.dumps(
                    {
                        "event_id": e.event_id,
                        "tenant": e.tenant,
                        "type": e.type,
                        "ts": e.ts,
                        "entity": e.entity,
                        "value": e.value,
                        "attributes": {"region": e.region},
                        "received_at": e.ts + 250,
                    }
                )
                for e in events
            ],
        }
    )
