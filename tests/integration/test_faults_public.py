"""The user's view of correctness under real conditions, through the public interface
only: a tenant key from `rayline tenants add`, `POST /v1/events`, `GET /v1/query/latest`,
worker PIDs from `rayline status --json`, and the `events.dlq` topic.

A stream with event-time disorder inside the allowed lateness (the default 5 s), exact
re-sends shortly after their originals, and very late events flows for about 45 s;
meanwhile one worker is SIGKILLed and another SIGSTOPped for 15 s, then SIGCONTed.
Afterwards every on-time event is counted exactly once in its 1-minute window (count and
sum, once the windows are stored), and every very late one is in `events.dlq` as `late`.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import defaultdict
from datetime import datetime
from typing import Any

import httpx
import orjson

from adapters.kafka import end_offsets
from cluster.settings import Settings
from tests.integration.conftest import eventually, rayline, read_from

SEND_SECONDS = 45
DISORDER_S = 2.5  # inside the default 5 s of lateness, with room for the ingest path
TYPES = ("view", "buy")


def worker_pids() -> dict[int, int]:
    """Worker index -> PID, as `rayline status --json` shows them."""
    result = rayline("status", "--json")
    assert result.returncode == 0, result.stderr
    workers = orjson.loads(result.stdout)["pipeline"]["workers"]
    return {w["worker"]: w["pid"] for w in workers if w.get("pid")}


class Sender:
    """Posts batches at a steady pace until stopped, keeping what it sent."""

    def __init__(self, client: httpx.Client, tenant: str) -> None:
        self.client, self.tenant = client, tenant
        self.rng = random.Random(11)
        self.on_time: dict[str, dict[str, Any]] = {}
        self.very_late: set[str] = set()
        self.resent = 0
        self.stop = threading.Event()
        self.error: str | None = None

    def post(self, batch: list[dict[str, Any]]) -> None:
        for _ in range(60):
            answer = self.client.post("/v1/events", json=batch)
            if answer.status_code == 202:
                assert answer.json()["rejected"] == 0, answer.text
                return
            assert answer.status_code in (429, 503), answer.text
            time.sleep(float(answer.headers.get("retry-after", "1")))
        raise AssertionError("ingest did not accept a batch within a minute")

    def batch(self, n: int) -> list[dict[str, Any]]:
        now, out = time.time(), []
        for i in range(120):
            event_id = f"u-{n}-{i}"
            event: dict[str, Any] = {
                "event_id": event_id,
                "tenant": self.tenant,
                "type": TYPES[i % 2],
                "ts": round(now - self.rng.uniform(0, DISORDER_S), 3),
                "entity": f"d{self.rng.randrange(400)}",
                "value": self.rng.randrange(1, 50),
            }
            if i % 40 == 7:  # ten minutes old: every window that would hold it has closed
                event["ts"] = round(now - 600, 3)
                self.very_late.add(event_id)
            else:
                self.on_time[event_id] = event
            out.append(event)
        return out

    def run(self) -> None:
        try:
            previous: list[dict[str, Any]] = []
            n = 0
            while not self.stop.is_set():
                current = self.batch(n)
                self.post(current)
                if previous and n % 3 == 0:  # a sender's retry of what was accepted
                    self.post(previous)
                    self.resent += len(previous)
                previous, n = current, n + 1
                time.sleep(0.1)
        except Exception as exc:  # reported by the test
            self.error = repr(exc)


def per_minute(events: list[dict[str, Any]], type_: str) -> dict[int, tuple[int, float]]:
    out: dict[int, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e["type"] == type_:
            minute = int(e["ts"] // 60 * 60)
            out[minute][0] += 1
            out[minute][1] += e["value"]
    return {m: (int(c), float(s)) for m, (c, s) in out.items()}


def test_on_time_events_count_once_through_kill_and_stop(stack: Settings, live_tenant: str) -> None:
    made = rayline("tenants", "add", live_tenant)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    base = f"http://{stack.serve.host}:{stack.serve.port}"
    headers = {"authorization": f"Bearer {key}"}
    dlq_before = end_offsets(stack.kafka.bootstrap, stack.kafka.dlq_topic)
    started = time.time()
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        sender = Sender(client, live_tenant)
        thread = threading.Thread(target=sender.run, daemon=True)
        thread.start()
        time.sleep(10)
        pids = worker_pids()
        assert len(pids) >= 2, pids
        killed, stopped = sorted(pids)[:2]
        os.kill(pids[killed], signal.SIGKILL)
        time.sleep(8)
        os.kill(pids[stopped], signal.SIGSTOP)
        try:
            time.sleep(15)
        finally:
            os.kill(pids[stopped], signal.SIGCONT)
        time.sleep(max(0.0, SEND_SECONDS - (time.time() - started)))
        sender.stop.set()
        thread.join(120)
        assert sender.error is None, sender.error
        assert sender.resent > 0

        events = list(sender.on_time.values())
        first = min(e["ts"] for e in events) // 60 * 60
        span = {"from": first - 60, "to": time.time() + 120}

        def windows(type_: str) -> tuple[dict[int, tuple[int, float]], bool]:
            answer = client.get(f"/v1/query/latest/{type_}", params=span)
            assert answer.status_code == 200, answer.text
            rows = answer.json()["windows"]
            got = {
                int(datetime.fromisoformat(w["start"]).timestamp()): (w["count"], w["sum"])
                for w in rows
            }
            return got, all(not w["open"] for w in rows)

        for type_ in TYPES:
            want = per_minute(events, type_)

            def probe(kind: str = type_) -> tuple[dict[int, tuple[int, float]], bool]:
                return windows(kind)

            # Counted once, live (open windows merged with stored ones), then stored:
            # every window closed by its tenant's watermark, none counted twice.
            def counted(got: tuple[dict[int, tuple[int, float]], bool], wanted: Any = want) -> bool:
                return got[0] == wanted

            eventually(probe, counted, 120)
            stored, _closed = eventually(probe, lambda got: got[1], 150)
            assert stored == want

    # Every very late event is in the dead-letter topic as `late`, and nothing else of
    # this tenant is (a crash may replay a batch's dead letters: compare as sets).
    letters: dict[str, set[str]] = defaultdict(set)
    offsets = dict(dlq_before)
    deadline = time.monotonic() + 60
    while not sender.very_late <= letters["late"] and time.monotonic() < deadline:
        for letter in read_from(stack, stack.kafka.dlq_topic, offsets, 500, timeout=5):
            offsets[letter.partition()] = max(offsets[letter.partition()], letter.offset() + 1)
            record = orjson.loads(letter.value())
            if record.get("tenant") == live_tenant:
                reason = dict(letter.headers())["reason"].decode()
                letters[reason].add(record["event_id"])
    assert dict(letters) == {"late": sender.very_late}
