"""The deployed pipeline: PartitionWorker Ray actors against a bare Kafka consumer.

Throughput (``--events N``): produces the processing benchmark's workload
(``benchmarks.processing.produce``: ~250-byte envelopes, 10,000 entities, ~1%
re-sent) to a fresh 8-partition topic while no worker reads it, under three tenant
names of this run only. Then, in the same run, on the same backlog:

* reference: a bare confluent-kafka batch consumer (group of its own) reads it all;
* pipeline: the workers start on that topic, as the coordinator starts them
  (``actors.coordinator.start_worker_actors``: the same actor, the settings'
  ``workers``, batch size, windows, sketches, checkpoints in PostgreSQL, raw events
  and closed windows through the ClickHouse owner actor, Redis tiles), plus the
  processing benchmark's enrichment and group-by; they are timed from the first
  worker's start of consuming to the last worker's last batch.

The stack's own workers (on ``events.raw``) stay deployed and idle meanwhile. The run
fails (exit 1) unless ClickHouse holds every distinct event of the backlog once.

Memory (``--seconds S --rate R``): a subprocess offers now-stamped events at ``R``
per second for ``S`` seconds to a fresh topic, while the workers read it; each
worker actor's own RSS (``/proc/<pid>/status`` of the worker processes, not this
one's) is sampled every ``--sample`` seconds and printed, with its drift after
``--warmup`` seconds.

With the stack up (``rayline up``)::

    .venv/bin/python -m benchmarks.pipeline --events 1000000
    .venv/bin/python -m benchmarks.pipeline --seconds 600 --rate 20000
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray

from actors.clickhouse_owner import OWNER_NAME
from actors.coordinator import start_worker_actors, stop_worker_actors
from adapters.kafka import TopicSpec, end_offsets, ensure_topics
from adapters.postgres import CheckpointStore
from benchmarks.processing import (
    PARTITIONS,
    bench_config,
    produce,
    produce_at_rate,
    raw_consume,
    seed_dimension,
)
from cluster.deploy import connected, worker_config
from cluster.settings import Settings, load_settings
from core.assignment import assign_partitions

ENTITIES = 10_000


@dataclass
class Workers:
    """The benchmark's own worker actors on its own topic."""

    settings: Settings
    topic: str
    handles: list[Any]

    @classmethod
    def start(cls, settings: Settings, topic: str, workers: int) -> Workers:
        config = replace(
            worker_config(settings),
            topic=topic,
            group_id=f"bench-workers-{uuid.uuid4().hex[:8]}",
            processing=bench_config(settings),
        )
        store = CheckpointStore(settings.postgres.dsn())
        try:
            epoch = store.next_epoch()
        finally:
            store.close()
        assignments = assign_partitions(list(range(PARTITIONS)), workers, epoch)
        handles = start_worker_actors(
            config, assignments, settings.ray.namespace, 0, name="rayline-bench-worker"
        )
        return cls(settings, topic, handles)

    def stats(self) -> list[dict[str, Any]]:
        return list(ray.get([h.stats.remote() for h in self.handles], timeout=60))

    def stop(self) -> None:
        stop_worker_actors(self.handles)


def seen(stats: Sequence[dict[str, Any]]) -> int:
    """Records the workers are done with: counted, dropped as duplicates, or dead-lettered."""
    return sum(s["processed"] + s["duplicates"] + s["dead_lettered"] + s["filtered"] for s in stats)


def wait_done(workers: Workers, records: int, timeout: float) -> list[dict[str, Any]]:
    """Poll the workers' stats until they are done with ``records`` records."""
    deadline = time.monotonic() + timeout
    while True:
        stats = workers.stats()
        errors = [s["last_error"] for s in stats if s.get("last_error")]
        if seen(stats) >= records:
            return stats
        if time.monotonic() > deadline:
            raise SystemExit(
                f"the workers handled {seen(stats):,} of {records:,} records in "
                f"{timeout:.0f} s (errors: {errors or 'none'}); see `rayline status`"
            )
        time.sleep(0.2)


def stored(tenants: Sequence[str]) -> tuple[int, int]:
    """(rows, distinct event ids) of the raw events ClickHouse holds for ``tenants``."""
    owner = ray.get_actor(OWNER_NAME)
    rows = ids = 0
    for tenant in tenants:
        ref: Any = owner.raw_event_stats.remote(tenant)
        found: dict[str, int] = ray.get(ref, timeout=60)
        rows += found["rows"]
        ids += found["distinct_ids"]
    return rows, ids


def check_stored(tenants: Sequence[str], expected: int) -> bool:
    """Whether ClickHouse holds each of the ``expected`` events once; prints the verdict."""
    rows, ids = stored(tenants)
    ok = rows == ids == expected
    verdict = "OK" if ok else "MISMATCH"
    print(f"ClickHouse raw events: {rows:,} rows, {ids:,} distinct; expected {expected:,}: "
          f"{verdict}")  # fmt: skip
    return ok


def fresh_run(settings: Settings, kind: str) -> tuple[str, tuple[str, ...]]:
    """A new topic and three tenant names of this run only, and the dimension table."""
    run = uuid.uuid4().hex[:6]
    topic = f"bench.{kind}.{run}"
    ensure_topics(settings.kafka.bootstrap, [TopicSpec(topic, PARTITIONS)])
    seed_dimension(settings, ENTITIES)
    return topic, tuple(f"b{run}-{name}" for name in ("acme", "globex", "initech"))


def throughput(settings: Settings, events: int, workers: int) -> bool:
    topic, tenants = fresh_run(settings, "pipeline")
    bootstrap = settings.kafka.bootstrap
    print(f"producing {events:,} events to {topic} (no worker reads it yet) ...", flush=True)
    produced = produce(bootstrap, topic, events, ENTITIES, tenants)
    backlog = sum(end_offsets(bootstrap, topic).values())
    print(f"  {backlog:,} records, {produced.unique:,} distinct events, "
          f"in {produced.seconds:.1f} s", flush=True)  # fmt: skip
    print("reading the backlog with a bare batch consumer ...", flush=True)
    bare = raw_consume(bootstrap, topic, backlog)
    print(f"starting {workers} worker actors on it ...", flush=True)
    started = time.time()
    crew = Workers.start(settings, topic, workers)
    try:
        stats = wait_done(crew, backlog, timeout=max(300.0, backlog / 2000))
    finally:
        crew.stop()
    begin = min(s["consuming_since"] for s in stats)
    end = max(s["last_batch_at"] for s in stats)
    bare_rate, pipe_rate = backlog / bare, backlog / (end - begin)
    print()
    print(f"{'':44}{'events/s':>12}")
    print(f"{'bare batch consume (reference)':44}{bare_rate:>12,.0f}")
    print(f"{f'deployed pipeline, {workers} worker actors':44}{pipe_rate:>12,.0f}")
    print(f"{'ratio pipeline / reference':44}{pipe_rate / bare_rate:>12.2f}")
    print(f"{'  same, from creating the actors':44}{backlog / (end - started):>12,.0f}")
    print(
        f"processed {sum(s['processed'] for s in stats):,}, duplicates "
        f"{sum(s['duplicates'] for s in stats):,}, dead-lettered "
        f"{sum(s['dead_lettered'] for s in stats):,}, batches "
        f"{sum(s['batches'] for s in stats):,}, windows written "
        f"{sum(s['windows_written'] for s in stats):,}"
    )
    return check_stored(tenants, produced.unique)


def rss_mb(pid: int) -> float:
    """The resident set of process ``pid`` (MB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


def memory(settings: Settings, seconds: float, rate: int, workers: int, args: Any) -> bool:
    topic, tenants = fresh_run(settings, "memory")
    bootstrap = settings.kafka.bootstrap
    crew = Workers.start(settings, topic, workers)
    context = multiprocessing.get_context("spawn")
    sent = context.Value("q", 0)
    producer = context.Process(
        target=produce_at_rate, args=(bootstrap, topic, rate, seconds, ENTITIES, tenants, sent)
    )
    series: dict[int, list[tuple[float, float]]] = {}
    try:
        pids = {s["worker"]: s["pid"] for s in crew.stats()}
        print(f"offering {rate:,} events/s for {seconds:.0f} s; worker pids {pids}", flush=True)
        producer.start()
        began = time.monotonic()
        while producer.is_alive():
            at = time.monotonic() - began
            line = []
            for worker, pid in pids.items():
                mb = rss_mb(pid)
                series.setdefault(worker, []).append((at, mb))
                line.append(f"worker {worker} {mb:,.0f} MB")
            stats = crew.stats()
            lag = sum(sum(s["lag"].values()) for s in stats)
            print(f"  {at:5.0f} s  {', '.join(line)}; handled {seen(stats):,}, lag {lag:,}",
                  flush=True)  # fmt: skip
            producer.join(args.sample)
        stats = wait_done(crew, sent.value, timeout=300)
        took = time.monotonic() - began
    finally:
        if producer.is_alive():
            producer.kill()
        crew.stop()
    print(f"\nsent {sent.value:,} events; the workers were done with them after {took:.0f} s")
    warm = args.warmup
    flat = True
    for worker, samples in series.items():
        after = [mb for at, mb in samples if at >= warm]
        if not after:
            print(f"worker {worker}: no sample after the {warm:.0f} s warm-up")
            flat = False
            continue
        first, low, high = after[0], min(after), max(after)
        spread = max(high - first, first - low) / first * 100
        flat &= spread <= 10
        print(f"worker {worker}: RSS after {warm:.0f} s warm-up: first {first:,.0f} MB, last "
              f"{after[-1]:,.0f} MB ({(after[-1] - first) / first * 100:+.1f}%), range "
              f"{low:,.0f}-{high:,.0f} MB (largest excursion {spread:.1f}%)")  # fmt: skip
    print(f"within ±10% after warm-up: {'yes' if flat else 'NO'}")
    return check_stored(tenants, sent.value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="backlog size")
    parser.add_argument("--workers", type=int, default=None, help="default: the settings'")
    parser.add_argument("--seconds", type=float, default=0, help="memory run length (s)")
    parser.add_argument("--rate", type=int, default=20_000, help="memory run: events/s offered")
    parser.add_argument("--sample", type=float, default=10, help="memory run: RSS every (s)")
    parser.add_argument("--warmup", type=float, default=120, help="memory run: warm-up (s)")
    args = parser.parse_args(argv)
    settings = load_settings()
    workers = args.workers or settings.pipeline.workers
    with connected(settings):
        if args.seconds > 0:
            ok = memory(settings, args.seconds, args.rate, workers, args)
        else:
            ok = throughput(settings, args.events, workers)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
