"""Processing benchmark: the partition worker's loop against a bare Kafka consumer.

Produces a fixed workload to a fresh topic of the local broker, then reads it twice
in this one process:

* reference: a bare confluent-kafka batch consumer (``consume(10000)``), nothing else;
* pipeline: the same consumer feeding the worker's own code per partition (decode,
  validate, dedup, 1-minute tumbling and 5-minute hopping windows, watermarks), with
  a PostgreSQL snapshot per partition and batch and the closed windows written to
  ClickHouse (chDB in a temporary folder), as the worker does.

Both figures come from the same run on the same topic, so their ratio holds on a
noisy machine. Not included: the Ray actor hop to the ClickHouse owner (one call per
batch) and the HTTP ingest in front of Kafka.

Run it with ``make bench`` (which starts the local stack) or, with the stack up,
``.venv/bin/python -m benchmarks.processing --events 1000000``.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from typing import Any

import orjson
from confluent_kafka import Producer, TopicPartition

from adapters.clickhouse import ClickHouseStore
from adapters.kafka import TopicSpec, ensure_topics, make_consumer
from adapters.postgres import CheckpointStore
from cluster.deploy import processing_config
from cluster.settings import load_settings
from core.partition_state import PartitionState, RecordRef

PARTITIONS = 8


def produce(bootstrap: str, topic: str, events: int, entities: int) -> float:
    """Write the workload; return the seconds it took."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 1_000_000,
            "batch.size": 1_000_000,
        }
    )
    rng = random.Random(42)
    start_ms = int(time.time() * 1000) - 3_600_000
    tenants = ("acme", "globex", "initech")
    types = ("page_view", "purchase", "signup", "click", "search")
    began = time.perf_counter()
    for i in range(events):
        entity = rng.randrange(entities)
        # about 1% re-sent events, and time moving forward over ten minutes with jitter
        n = i - 1 if i and rng.random() < 0.01 else i
        envelope = {
            "event_id": f"ev-{n:09d}",
            "source": "bench",
            "tenant": tenants[entity % 3],
            "type": types[n % 5],
            "ts": start_ms + n * 600_000 // events + rng.randrange(2000),
            "entity": f"device-{entity}",
            "value": n % 100,
            "attributes": {"region": "eu-west", "agent": "bench/1.0"},
            "received_at": start_ms,
        }
        key = f"{envelope['tenant']}:{envelope['entity']}".encode()
        while True:
            try:
                producer.produce(topic, orjson.dumps(envelope), key)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10_000 == 0:
            producer.poll(0)
    producer.flush(120)
    return time.perf_counter() - began


def raw_consume(bootstrap: str, topic: str, events: int) -> float:
    consumer = make_consumer(bootstrap, f"bench-raw-{uuid.uuid4()}")
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    seen = 0
    began = time.perf_counter()
    while seen < events:
        seen += sum(1 for m in consumer.consume(10_000, 1.0) if m.error() is None)
    elapsed = time.perf_counter() - began
    consumer.close()
    return elapsed


def pipeline(settings: Any, topic: str, events: int, clickhouse_dir: str) -> dict[str, float]:
    config = processing_config(settings)
    states = {p: PartitionState(p, config) for p in range(PARTITIONS)}
    store = ClickHouseStore(f"chdb://{clickhouse_dir}", "bench")
    store.migrate()
    checkpoints = CheckpointStore(settings.postgres.dsn())
    consumer = make_consumer(settings.kafka.bootstrap, f"bench-pipe-{uuid.uuid4()}")
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    seen = rows = 0
    began = time.perf_counter()
    while seen < events:
        by_partition: dict[int, list[RecordRef]] = defaultdict(list)
        for m in consumer.consume(settings.pipeline.batch_max_records, 1.0):
            partition, offset = m.partition(), m.offset()
            if m.error() is None and partition is not None and offset is not None:
                by_partition[partition].append(RecordRef(offset, m.key(), m.value()))
        wall_ms = int(time.time() * 1000)
        closed = []
        snapshots = {}
        for partition, refs in by_partition.items():
            seen += len(refs)
            state = states[partition]
            outcome = state.process(refs, wall_ms)
            closed += outcome.closed
            blob = orjson.dumps({"snapshot": state.snapshot()})
            snapshots[partition] = (state.next_offset, blob)
        checkpoints.save(topic, 1, snapshots)
        rows += store.insert_window_results(closed)
    # close everything still open, as the watermark eventually does
    final = [r for s in states.values() for r in s.tick(int(time.time() * 1000) + 10**9)]
    rows += store.insert_window_results(final)
    elapsed = time.perf_counter() - began
    consumer.close()
    checkpoints.close()
    store.close()
    return {"seconds": elapsed, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the workload")
    parser.add_argument("--entities", type=int, default=10_000, help="distinct entities")
    args = parser.parse_args(argv)
    settings = load_settings()
    bootstrap = settings.kafka.bootstrap
    topic = f"bench.events.{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [TopicSpec(topic, PARTITIONS)])
    print(f"producing {args.events:,} events to {topic} ...", flush=True)
    produced = produce(bootstrap, topic, args.events, args.entities)
    print(f"  produced in {produced:.1f} s ({args.events / produced:,.0f}/s)", flush=True)
    print("reading it back with a bare batch consumer ...", flush=True)
    raw = raw_consume(bootstrap, topic, args.events)
    print("reading it back through the worker's pipeline ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="rayline-bench-") as folder:
        result = pipeline(settings, topic, args.events, folder)
    raw_rate = args.events / raw
    pipe_rate = args.events / result["seconds"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print(f"{'':38}{'events/s':>12}")
    print(f"{'bare batch consume (reference)':38}{raw_rate:>12,.0f}")
    print(f"{'worker pipeline to ClickHouse':38}{pipe_rate:>12,.0f}")
    print(f"{'ratio pipeline / reference':38}{pipe_rate / raw_rate:>12.2f}")
    print(
        f"window rows written: {result['rows']:,.0f}; peak RSS of this process: {peak_mb:,.0f} MB"
    )
    print(
        f"windows {list(settings.pipeline.windows)}, dedup horizon "
        f"{settings.pipeline.dedup_horizon_seconds:.0f} s, {PARTITIONS} partitions"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
