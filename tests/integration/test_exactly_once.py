"""The exactly-once effect under failure: workers SIGKILLed at the named points of a
batch (after the snapshot but before the sink writes, after the writes but before the
offset commit, while the snapshot statement is in flight) and at a random moment,
rescaled 2 -> 3 -> 1 and the Kafka broker restarted, while a known stream with repeats
and late events flows. Afterwards the windows equal an offline recomputation of the
same events with Polars, the raw events in ClickHouse are each stored once, every late
event is in the dead-letter topic, and nothing is counted twice."""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any

import httpx
import orjson
import polars as pl
import ray

from adapters.kafka import end_offsets
from cluster.settings import Settings
from cluster.stack import LocalStack
from tests.integration.conftest import eventually, rayline, read_from, workers


def post_until_accepted(http: httpx.Client, events: list[dict[str, Any]]) -> None:
    for _ in range(60):
        try:
            answer = http.post("/v1/events", json=events)
        except httpx.HTTPError:
            time.sleep(1)
            continue
        if answer.status_code == 202:
            return
        assert answer.status_code == 503, answer.text
        time.sleep(float(answer.headers.get("retry-after", "1")))
    raise AssertionError("ingest did not accept the batch within a minute")


def worker_pids() -> list[int]:
    result = rayline("status", "--json")
    assert result.returncode == 0, result.stderr
    return [w["pid"] for w in orjson.loads(result.stdout)["pipeline"]["workers"] if "pid" in w]


def sigkill_a_worker(rng: random.Random) -> None:
    os.kill(rng.choice(worker_pids()), signal.SIGKILL)


def crash_at(stack: Settings, point: str) -> None:
    """Arm every worker to SIGKILL itself at ``point`` of its next batch."""
    for handle in workers(stack):
        for _ in range(60):  # a worker killed a moment ago is still restarting
            try:
                ray.get(handle.arm_crash.remote(point), timeout=10)
                break
            except (ray.exceptions.RayError, TimeoutError):
                time.sleep(0.5)
        else:
            raise AssertionError(f"could not arm a worker for {point}")


def scale(count: int) -> None:
    result = rayline("scale", "workers", str(count))
    assert result.returncode == 0, result.stdout + result.stderr


def test_failures_neither_lose_nor_double_count(
    http: httpx.Client, stack: Settings, tenant: str, driver: None
) -> None:
    rng = random.Random(2026)
    now = int(time.time()) // 60 * 60
    base = now - 1200  # on time for the test stack's hour of lateness
    events: list[dict[str, Any]] = [
        {
            "event_id": f"x-{i}",
            "tenant": tenant,
            "type": "order",
            "ts": base + rng.randrange(600),
            "entity": f"c{rng.randrange(60)}",
            "value": rng.randrange(100),
        }
        for i in range(3000)
    ]
    repeats = [dict(rng.choice(events)) for _ in range(300)]
    late: list[dict[str, Any]] = [
        {
            "event_id": f"late-{i}",
            "tenant": tenant,
            "type": "order",
            "ts": now - 7200,
            "entity": f"c{i % 60}",
            "value": 1,
        }
        for i in range(60)
    ]
    stream = events + repeats
    rng.shuffle(stream)
    chunks = [stream[i : i + 330] for i in range(0, len(stream), 330)]
    chunks[3] += late  # after every partition has seen events, so its watermark is set
    dlq_before = end_offsets(stack.kafka.bootstrap, stack.kafka.dlq_topic)

    faults = {
        0: lambda: crash_at(stack, "before_sink"),
        1: lambda: sigkill_a_worker(rng),
        2: lambda: crash_at(stack, "during_snapshot"),
        3: lambda: scale(3),
        4: lambda: crash_at(stack, "after_sink"),
        5: lambda: LocalStack(stack).restart("kafka"),
        7: lambda: scale(1),
        8: lambda: sigkill_a_worker(rng),
    }
    for n, chunk in enumerate(chunks):
        post_until_accepted(http, chunk)
        if n in faults:
            faults[n]()
    scale(stack.pipeline.workers)

    # The offline recomputation, with Polars over the events as produced: the first
    # sighting of each id counts (repeats are copies), late events count nowhere.
    produced = pl.DataFrame(events + repeats).unique(subset="event_id", keep="first")
    per_minute = (
        produced.with_columns(minute=pl.col("ts") - pl.col("ts") % 60)
        .group_by("minute")
        .agg(pl.len().alias("count"), pl.col("value").sum().cast(pl.Float64).alias("sum"))
        .sort("minute")
    )
    want = [[m, c, s] for m, c, s in per_minute.select("minute", "count", "sum").iter_rows()]
    distinct = dict(
        produced.with_columns(minute=pl.col("ts") - pl.col("ts") % 60)
        .group_by("minute")
        .agg(pl.col("entity").n_unique())
        .iter_rows()
    )

    def windows() -> list[list[Any]]:
        answer = http.get(
            "/v1/query/latest/order",
            params={"tenant": tenant, "from": base - 60, "to": base + 3600},
        )
        assert answer.status_code == 200, answer.text
        rows = answer.json()["windows"]
        seen_distinct.update({int(_epoch(w["start"])): w["distinct"] for w in rows})
        return [[int(_epoch(w["start"])), w["count"], w["sum"]] for w in rows]

    seen_distinct: dict[int, int] = {}
    got = eventually(windows, lambda rows: sum(r[1] for r in rows) >= len(events), timeout=240)
    time.sleep(3)
    assert windows() == got == want
    # Distinct entities per minute (HyperLogLog, merged over partitions): near exact here.
    assert all(abs(seen_distinct[m] - n) <= 1 for m, n in distinct.items()), (
        seen_distinct,
        distinct,
    )
    # Raw events: each counted event stored once in ClickHouse.
    owner = ray.get_actor("rayline-clickhouse", namespace=stack.ray.namespace)
    ref: Any = owner.raw_event_stats.remote(tenant)
    assert ray.get(ref) == {"rows": len(events), "distinct_ids": len(events)}

    # A crash replays a batch's dead letters (each crash point may send them again), so
    # the topic can hold several copies: read until every late id is there, as a set.
    wanted = {e["event_id"] for e in late}
    dead: set[str] = set()
    deadline = time.monotonic() + 60
    offsets = dict(dlq_before)
    while not wanted <= dead and time.monotonic() < deadline:
        letters = read_from(stack, stack.kafka.dlq_topic, offsets, 500, timeout=5)
        for m in letters:
            offsets[m.partition()] = max(offsets[m.partition()], m.offset() + 1)
            if dict(m.headers())["reason"] == b"late":
                dead.add(orjson.loads(m.value())["event_id"])
    assert dead == wanted


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()
