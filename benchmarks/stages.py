"""Where a batch's time goes: the benchmark pipeline's step, timed stage by stage.

With the local stack up: ``.venv/bin/python -m benchmarks.stages --events 200000``.
Prints the seconds each stage took over the whole run (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections import defaultdict

import orjson

from actors.partition_worker import Outbox, counted_offsets
from adapters.kafka import TopicSpec, ensure_topics
from benchmarks.processing import PARTITIONS, BenchPipeline, produce, seed_dimension
from cluster.settings import load_settings
from core.batch import process_batch, raw_event_rows
from core.partition_state import RecordRef


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    settings = load_settings()
    topic = f"bench.stages.{uuid.uuid4().hex[:8]}"
    ensure_topics(settings.kafka.bootstrap, [TopicSpec(topic, PARTITIONS)])
    produce(settings.kafka.bootstrap, topic, args.events, 10_000)
    seed_dimension(settings, 10_000)
    took: dict[str, float] = defaultdict(float)
    with tempfile.TemporaryDirectory() as folder:
        pipe = BenchPipeline(settings, topic, folder)
        seen = 0
        while seen < args.events:
            mark = time.perf_counter()

            def lap(stage: str) -> None:
                nonlocal mark
                now = time.perf_counter()
                took[stage] += now - mark
                mark = now

            messages = pipe.consumer.consume(pipe.batch, 1.0)
            lap("consume")
            records: dict[int, list[RecordRef]] = {p: [] for p in range(PARTITIONS)}
            for m in messages:
                partition, offset = m.partition(), m.offset()
                if m.error() is None and partition is not None and offset is not None:
                    stamp = m.timestamp()[1]
                    records[partition].append(RecordRef(offset, m.key(), m.value(), stamp))
            seen += len(messages)
            lap("record refs")
            outcomes, counted = process_batch(pipe.states, records, pipe.runtime)
            lap("columnar pass")
            offsets = counted_offsets(counted, records)
            boxes = {
                p: Outbox.of(o, records[p], offsets.get(p, set())) for p, o in outcomes.items()
            }
            lap("outbox")
            snapshots = {
                p: (
                    pipe.states[p].next_offset,
                    orjson.dumps(
                        {"snapshot": pipe.states[p].snapshot(), "outbox": boxes[p].to_json()}
                    ),
                )
                for p in outcomes
            }
            lap("snapshot JSON")
            pipe.checkpoints.save(topic, 1, snapshots)
            lap("PostgreSQL save")
            raw = raw_event_rows(counted, records, set(records))
            lap("raw event rows")
            if raw is not None:
                pipe.store.insert_events(raw)
            lap("raw events to ClickHouse")
            pipe.store.insert_window_results([r for o in outcomes.values() for r in o.closed])
            lap("windows to ClickHouse")
        pipe.close()
    for stage, seconds in took.items():
        print(f"{stage:28}{seconds:8.2f} s")
    total = sum(took.values())
    print(f"{'total':28}{total:8.2f} s  ({args.events / total:,.0f} events/s)")


if __name__ == "__main__":
    main()
