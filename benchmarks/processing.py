"""Processing benchmark: the partition worker's loop against a bare Kafka consumer,
then its latency and memory under a fixed offered load.

Throughput: produces a fixed workload to a fresh topic of the local broker (10,000
entities, ~1% re-sent events), then reads it twice in this one process:

* reference: a bare confluent-kafka batch consumer (``consume(10000)``), nothing else;
* pipeline: the same consumer feeding the worker's own code (``core.batch``: one
  columnar pass per consumed batch, dedup, enrichment from a PostgreSQL dimension
  table of 10,000 devices grouped by site, 1-minute tumbling and 5-minute/1-minute
  hopping windows with distinct counts and quantiles), with every partition's
  snapshot and outbox saved in PostgreSQL per batch, and the raw events and closed
  windows written to ClickHouse (chDB in a temporary folder), as the worker does.

Latency and memory: a separate process offers now-stamped events at ``--rate`` per
second for ``--seconds`` to another fresh topic while the same pipeline consumes it;
each event's latency runs from its Kafka timestamp to the end of the batch that made
it queryable, and the process's RSS is sampled every 5 s.

Both throughput figures come from the same run on the same topic, so their ratio
holds on a noisy machine. Not included: the Ray actor hop to the ClickHouse owner
(one call per batch), Redis tiles, and the HTTP ingest in front of Kafka.

Run it with ``make bench`` (which starts the local stack) or, with the stack up,
``.venv/bin/python -m benchmarks.processing --events 1000000 --seconds 600``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import resource
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson
import pyarrow as pa
from confluent_kafka import Producer, TopicPartition

from actors.partition_worker import Outbox, counted_offsets
from adapters.clickhouse import ClickHouseStore
from adapters.kafka import TopicSpec, ensure_topics, make_consumer
from adapters.postgres import CheckpointStore, MetadataStore
from cluster.deploy import processing_config
from cluster.settings import load_settings
from core.batch import Runtime, process_batch, raw_event_rows
from core.partition_state import PartitionState, RecordRef
from core.transforms import parse_enrichment

PARTITIONS = 8
DIMENSION = "bench_devices"
SITES = 4  # the group-by column from the enrichment: 3 tenants x 5 types x 4 sites
TENANTS = ("acme", "globex", "initech")


class Produced(NamedTuple):
    """What :func:`produce` wrote: how long it took, and how many distinct events (the
    rest are re-sent copies, which the pipeline must drop as duplicates)."""

    seconds: float
    unique: int


def produce(
    bootstrap: str, topic: str, events: int, entities: int, tenants: tuple[str, ...] = TENANTS
) -> Produced:
    """Write the workload (``tenants``: three names, so that a run can tell its own
    events apart from those of other runs in the same ClickHouse)."""
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
    unique = 0
    types = ("page_view", "purchase", "signup", "click", "search")
    began = time.perf_counter()
    envelope: dict[str, Any] = {}
    for i in range(events):
        # about 1% of the events are a sender's retry: the previous event again
        if not envelope or rng.random() >= 0.01:
            unique += 1
            entity = rng.randrange(entities)
            envelope = {
                "event_id": f"ev-{i:09d}",
                "source": "bench",
                "tenant": tenants[entity % 3],
                "type": types[i % 5],
                # time moving forward over ten minutes, with jitter
                "ts": start_ms + i * 600_000 // events + rng.randrange(2000),
                "entity": f"device-{entity}",
                "value": i % 100,
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
    return Produced(time.perf_counter() - began, unique)


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


def bench_config(settings: Any, sketches: bool = True) -> Any:
    """The worker's processing settings plus the benchmark's enrichment and group-by;
    without ``sketches``, no distinct counts and no quantiles."""
    config = processing_config(settings)
    if not sketches:
        config = replace(config, distinct=None, quantiles=False)
    device_site = parse_enrichment(
        {"table": DIMENSION, "key": "device", "on": "entity", "columns": ["site"]}
    )
    return replace(config, enrichment=(device_site,), group_by=("site",))


def seed_dimension(settings: Any, entities: int) -> None:
    """A PostgreSQL dimension table: device -> site, one row per entity."""
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(settings.postgres.dsn())
        await conn.execute(f"DROP TABLE IF EXISTS {DIMENSION}")
        await conn.execute(f"CREATE TABLE {DIMENSION} (device text PRIMARY KEY, site text)")
        await conn.copy_records_to_table(
            DIMENSION,
            records=[(f"device-{i}", f"site-{i % SITES}") for i in range(entities)],
        )
        await conn.close()

    asyncio.run(run())


class BenchPipeline:
    """The worker's loop minus Ray: one columnar pass per consumed batch, snapshots with
    their outbox in PostgreSQL, raw events and closed windows to ClickHouse."""

    def __init__(
        self, settings: Any, topic: str, clickhouse_dir: str, sketches: bool = True
    ) -> None:
        config = bench_config(settings, sketches)
        self.topic = topic
        self.batch = settings.pipeline.batch_max_records
        self.states = {p: PartitionState(p, config) for p in range(PARTITIONS)}
        self.store = ClickHouseStore(f"chdb://{clickhouse_dir}", "bench")
        self.store.migrate()
        self.checkpoints = CheckpointStore(settings.postgres.dsn())
        self.meta = MetadataStore(settings.postgres.dsn())
        dim = self.meta.dimension_rows(DIMENSION, "device", ("site",))
        self.runtime = Runtime(dimensions={DIMENSION: pa.table(dim)})
        self.consumer = make_consumer(settings.kafka.bootstrap, f"bench-pipe-{uuid.uuid4()}")
        self.consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        self.rows = self.raw_rows = 0
        self.counts = {"processed": 0, "duplicates": 0, "late": 0, "rejected": 0}

    def step(self, timeout: float = 1.0) -> np.ndarray:
        """One batch; returns each record's Kafka timestamp (ms)."""
        records: dict[int, list[RecordRef]] = {p: [] for p in range(PARTITIONS)}
        stamps = []
        for m in self.consumer.consume(self.batch, timeout):
            partition, offset = m.partition(), m.offset()
            if m.error() is None and partition is not None and offset is not None:
                stamps.append(m.timestamp()[1])
                records[partition].append(RecordRef(offset, m.key(), m.value(), stamps[-1]))
        outcomes, counted = process_batch(self.states, records, self.runtime)
        for o in outcomes.values():
            self.counts["processed"] += o.processed
            self.counts["duplicates"] += o.duplicates
            self.counts["late"] += len(o.late)
            self.counts["rejected"] += len(o.rejected)
        offsets = counted_offsets(counted, records)
        snapshots = {}
        for partition, outcome in outcomes.items():
            box = Outbox.of(outcome, records[partition], offsets.get(partition, set()))
            state = self.states[partition]
            blob = orjson.dumps({"snapshot": state.snapshot(), "outbox": box.to_json()})
            snapshots[partition] = (state.next_offset, blob)
        self.checkpoints.save(self.topic, 1, snapshots)
        raw = raw_event_rows(counted, records, set(records))
        self.raw_rows += self.store.insert_events(raw) if raw is not None else 0
        closed = [r for o in outcomes.values() for r in o.closed]
        self.rows += self.store.insert_window_results(closed)
        return np.asarray(stamps, dtype=np.int64)

    def finish(self) -> None:
        """Close everything still open, as the watermark eventually does."""
        for s in self.states.values():
            s.watermark.progress = int(time.time() * 1000) + 10**9
        final = [r for s in self.states.values() for r in s.tick()[0]]
        self.rows += self.store.insert_window_results(final)

    def close(self) -> None:
        self.consumer.close()
        self.checkpoints.close()
        self.meta.close()
        self.store.close()


def throughput(
    settings: Any, topic: str, events: int, folder: str, sketches: bool = True
) -> dict[str, float]:
    pipe = BenchPipeline(settings, topic, folder, sketches)
    seen = 0
    began = time.perf_counter()
    while seen < events:
        seen += len(pipe.step())
    pipe.finish()
    elapsed = time.perf_counter() - began
    pipe.close()
    return {"seconds": elapsed, "rows": pipe.rows, "raw_rows": pipe.raw_rows, **pipe.counts}


def produce_at_rate(
    bootstrap: str,
    topic: str,
    rate: int,
    seconds: float,
    entities: int,
    tenants: tuple[str, ...] = TENANTS,
    sent_out: Any = None,
) -> None:
    """Produce now-stamped events at ``rate`` per second for ``seconds`` (run it in a
    subprocess); ``sent_out``, a ``multiprocessing.Value``, receives how many were sent."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "batch.size": 1_000_000})
    rng = random.Random(7)
    types = ("page_view", "purchase", "signup", "click", "search")
    began = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - began) < seconds:
        due = int(elapsed * rate) - sent
        now_ms = int(time.time() * 1000)
        for _ in range(min(due, rate // 10)):
            entity = rng.randrange(entities)
            envelope = {"event_id": f"ol-{sent:010d}", "source": "bench",
                        "tenant": tenants[entity % 3], "type": types[sent % 5], "ts": now_ms,
                        "entity": f"device-{entity}", "value": sent % 100}  # fmt: skip
            key = f"{envelope['tenant']}:{envelope['entity']}".encode()
            try:
                producer.produce(topic, orjson.dumps(envelope), key)
            except BufferError:
                producer.poll(0.01)
                break
            sent += 1
        producer.poll(0)
        time.sleep(0.002)
    producer.flush(60)
    if sent_out is not None:
        sent_out.value = sent


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def offered_load(
    settings: Any, rate: int, seconds: float, entities: int, folder: str
) -> dict[str, Any]:
    """Event-to-queryable latency and memory while events arrive at ``rate`` per second.

    An event is queryable once the batch that folded it has saved its snapshot and
    written its sinks: from then on the query API answers with it (live from the
    worker while its window is open, from ClickHouse once closed). Its latency is that
    moment minus the event's Kafka timestamp (set by the producer when it sends it).
    """
    topic = f"bench.load.{uuid.uuid4().hex[:8]}"
    ensure_topics(settings.kafka.bootstrap, [TopicSpec(topic, PARTITIONS)])
    pipe = BenchPipeline(settings, topic, folder)
    producer = multiprocessing.get_context("spawn").Process(
        target=produce_at_rate, args=(settings.kafka.bootstrap, topic, rate, seconds, entities)
    )
    producer.start()
    latencies: list[np.ndarray] = []
    rss: list[tuple[float, float]] = []
    began = time.monotonic()
    next_sample = began
    while True:
        alive = producer.is_alive()
        stamps = pipe.step(0.2)
        done_ms = int(time.time() * 1000)
        if stamps.size:
            latencies.append(done_ms - stamps)
        if time.monotonic() >= next_sample:
            rss.append((time.monotonic() - began, _rss_mb()))
            next_sample += 5
        if not alive and not stamps.size:
            break
    producer.join()
    pipe.close()
    all_ms = np.concatenate(latencies) if latencies else np.zeros(1)
    warm = [mb for at, mb in rss if at >= min(30.0, seconds / 4)]
    return {
        "events": int(all_ms.size),
        "p50_ms": float(np.percentile(all_ms, 50)),
        "p99_ms": float(np.percentile(all_ms, 99)),
        "rss_first_mb": warm[0] if warm else float("nan"),
        "rss_last_mb": warm[-1] if warm else float("nan"),
        "rss_min_mb": min(warm) if warm else float("nan"),
        "rss_max_mb": max(warm) if warm else float("nan"),
        "seconds": time.monotonic() - began,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the workload")
    parser.add_argument("--entities", type=int, default=10_000, help="distinct entities")
    parser.add_argument(
        "--rate", type=int, default=50_000, help="offered load of the latency phase (events/s)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=60,
        help="length of the latency phase; 600 for the 10-minute memory check",
    )
    args = parser.parse_args(argv)
    settings = load_settings()
    bootstrap = settings.kafka.bootstrap
    topic = f"bench.events.{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [TopicSpec(topic, PARTITIONS)])
    print(f"producing {args.events:,} events to {topic} ...", flush=True)
    produced = produce(bootstrap, topic, args.events, args.entities).seconds
    seed_dimension(settings, args.entities)
    print(f"  produced in {produced:.1f} s ({args.events / produced:,.0f}/s)", flush=True)
    print("reading it back with a bare batch consumer ...", flush=True)
    raw = raw_consume(bootstrap, topic, args.events)
    print("reading it back through the worker's pipeline ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="rayline-bench-") as folder:
        result = throughput(settings, topic, args.events, folder)
    print("again without distinct counts and quantiles ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="rayline-bench-") as folder:
        plain = throughput(settings, topic, args.events, folder, sketches=False)
    print(f"offering {args.rate:,} events/s for {args.seconds:.0f} s ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="rayline-bench-") as folder:
        load = offered_load(settings, args.rate, args.seconds, args.entities, folder)
    raw_rate = args.events / raw
    pipe_rate = args.events / result["seconds"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print(f"{'':38}{'events/s':>12}")
    print(f"{'bare batch consume (reference)':38}{raw_rate:>12,.0f}")
    plain_rate = args.events / plain["seconds"]
    print(f"{'worker pipeline to ClickHouse':38}{pipe_rate:>12,.0f}")
    print(f"{'ratio pipeline / reference':38}{pipe_rate / raw_rate:>12.2f}")
    print(f"{'  same, no distinct/quantile sketches':38}{plain_rate:>12,.0f}")
    print(f"{'  ratio to reference':38}{plain_rate / raw_rate:>12.2f}")
    print(
        f"processed {result['processed']:,.0f}, duplicates {result['duplicates']:,.0f}, "
        f"late {result['late']:,.0f}, rejected {result['rejected']:,.0f}"
    )
    print(
        f"window rows written: {result['rows']:,.0f}; raw events written: "
        f"{result['raw_rows']:,.0f}; peak RSS of this process: {peak_mb:,.0f} MB"
    )
    print()
    print(
        f"offered {args.rate:,} events/s for {args.seconds:.0f} s: {load['events']:,} events "
        f"processed in {load['seconds']:.0f} s "
        f"({load['events'] / load['seconds']:,.0f}/s)"
    )
    print(f"{'event-to-queryable latency p50':38}{load['p50_ms']:>10,.0f} ms")
    print(f"{'event-to-queryable latency p99':38}{load['p99_ms']:>10,.0f} ms")
    drift = (load["rss_last_mb"] - load["rss_first_mb"]) / load["rss_first_mb"] * 100
    print(
        f"RSS after warm-up: first {load['rss_first_mb']:,.0f} MB, last "
        f"{load['rss_last_mb']:,.0f} MB ({drift:+.1f}%), range {load['rss_min_mb']:,.0f}"
        f"-{load['rss_max_mb']:,.0f} MB"
    )
    print(
        f"windows {list(settings.pipeline.windows)}, dedup horizon "
        f"{settings.pipeline.dedup_horizon_seconds:.0f} s, {PARTITIONS} partitions"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
