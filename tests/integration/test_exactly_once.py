"""The exactly-once effect under failure: workers SIGKILLed, rescaled 2 -> 3 -> 1 and
the Kafka broker restarted while a known stream with repeats and late events flows.
Afterwards the windows equal an offline recomputation of the same events, every late
event is in the dead-letter topic, and nothing is counted twice."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter, defaultdict
from typing import Any

import httpx
import orjson

from adapters.kafka import end_offsets
from cluster.settings import Settings
from cluster.stack import LocalStack
from tests.integration.conftest import eventually, rayline, read_from


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


def scale(count: int) -> None:
    result = rayline("scale", "workers", str(count))
    assert result.returncode == 0, result.stdout + result.stderr


def test_failures_neither_lose_nor_double_count(
    http: httpx.Client, stack: Settings, tenant: str
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
        1: lambda: sigkill_a_worker(rng),
        3: lambda: scale(3),
        4: lambda: sigkill_a_worker(rng),
        5: lambda: LocalStack(stack).restart("kafka"),
        7: lambda: scale(1),
        8: lambda: sigkill_a_worker(rng),
    }
    for n, chunk in enumerate(chunks):
        post_until_accepted(http, chunk)
        if n in faults:
            faults[n]()
    scale(stack.pipeline.workers)

    # The offline recomputation: first sighting of each id, by minute.
    expected: dict[int, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        minute = e["ts"] - e["ts"] % 60
        expected[minute][0] += 1
        expected[minute][1] += e["value"]
    want = [[m, c, s] for m, (c, s) in sorted(expected.items())]

    def windows() -> list[list[Any]]:
        answer = http.get(
            "/v1/metrics/order", params={"tenant": tenant, "from": base - 60, "to": base + 3600}
        )
        assert answer.status_code == 200, answer.text
        return [
            [int(w_start), w["count"], w["sum"]]
            for w in answer.json()["windows"]
            for w_start in [_epoch(w["start"])]
        ]

    got = eventually(windows, lambda rows: sum(r[1] for r in rows) >= len(events), timeout=240)
    time.sleep(3)
    assert windows() == got == want

    # A crash may send a dead letter twice: read past the count, then compare as sets.
    letters = read_from(stack, stack.kafka.dlq_topic, dlq_before, 2 * len(late), timeout=20)
    dead = Counter(
        orjson.loads(m.value())["event_id"]
        for m in letters
        if dict(m.headers())["reason"] == b"late"
    )
    assert set(dead) == {e["event_id"] for e in late}


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()
