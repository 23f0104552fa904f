"""The columnar pass alone: ``core.batch.process_batch`` on pre-built records, no Kafka,
no sinks, with each processing option on and off.

``.venv/bin/python -m benchmarks.columnar_pass`` (needs no running stack).
"""

from __future__ import annotations

import random
import time
from dataclasses import replace

import orjson
import pyarrow as pa

from benchmarks.processing import DIMENSION, SITES, bench_config
from cluster.settings import load_settings
from core.batch import Runtime, process_batch
from core.partition_state import PartitionState, RecordRef, parse_window

EVENTS = 200_000
BATCHES = 10


def records() -> dict[int, list[RecordRef]]:
    rng = random.Random(1)
    start = int(time.time() * 1000) - 3_600_000
    out: dict[int, list[RecordRef]] = {p: [] for p in range(8)}
    for n in range(EVENTS):
        entity = rng.randrange(10_000)
        ts = start + n * 600_000 // EVENTS + rng.randrange(2000)
        envelope = {"event_id": f"ev-{n}", "source": "bench", "tenant": "abc"[entity % 3],
                    "type": "vwxyz"[n % 5], "ts": ts, "entity": f"device-{entity}",
                    "value": n % 100}  # fmt: skip
        batch = out[entity % 8]
        batch.append(RecordRef(len(batch), b"k", orjson.dumps(envelope)))
    return out


def main() -> None:
    devices = [f"device-{i}" for i in range(10_000)]
    dim = pa.table({"device": devices, "site": [f"site-{i % SITES}" for i in range(10_000)]})
    runtime = Runtime(dimensions={DIMENSION: dim})
    full = bench_config(load_settings())
    variants = {
        "everything on": full,
        "1-minute windows only": replace(full, windows=(parse_window("1m"),)),
        "no sketches": replace(full, distinct=None, quantiles=False),
        "no quantiles": replace(full, quantiles=False),
        "no distinct counts": replace(full, distinct=None),
    }
    data = records()
    for name, config in variants.items():
        states = {p: PartitionState(p, config) for p in data}
        began = time.perf_counter()
        for i in range(BATCHES):
            batch = {
                p: v[i * len(v) // BATCHES : (i + 1) * len(v) // BATCHES] for p, v in data.items()
            }
            process_batch(states, batch, runtime)
        print(f"{name:24}{EVENTS / (time.perf_counter() - began):>10,.0f} events/s", flush=True)


if __name__ == "__main__":
    main()
