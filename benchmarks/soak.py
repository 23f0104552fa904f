"""Soak: the deployed pipeline under steady load and faults, for minutes on end.

Sends ``--rate`` now-stamped events/s (default 10,000) through ``POST /v1/events`` for
``--minutes`` (default 10), as `rayline demo` does (32 concurrent requests, retries on
429/503). Meanwhile, at fixed fractions of the run: a worker is SIGSTOPped for 15 s
then SIGCONTed (20%), a worker is SIGKILLed (40%), the ClickHouse owner actor is killed
and restarted by Ray (60%), the Kafka broker is restarted (80%). A probe measures
event-to-queryable time every 2 s (one event posted, then `/v1/query/latest` polled
until it counts it), and each worker's RSS is sampled every 10 s from /proc.

At the end it waits for the backlog to drain and prints: sent, counted by the query
API, dead-lettered by reason, p50/p99 event-to-queryable, and each worker's RSS over
time. Exit status 0 only when every event sent was counted.

Needs the stack (`make soak` brings it up and down). Not part of CI.
Run: ``.venv/bin/python -m benchmarks.soak --minutes 10 --rate 10000``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import ray
from confluent_kafka import TopicPartition

from actors.clickhouse_owner import OWNER_NAME
from adapters.kafka import end_offsets, make_consumer
from cluster import demo
from cluster.deploy import base_url, connected, pipeline_status
from cluster.settings import Settings, load_settings
from cluster.stack import LocalStack


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _workers(settings: Settings) -> dict[int, int]:
    status = pipeline_status(settings) or {}
    return {w["worker"]: w["pid"] for w in status.get("workers", []) if w.get("pid")}


class Soak:
    def __init__(self, settings: Settings, minutes: float, rate: int) -> None:
        self.settings, self.seconds, self.rate = settings, minutes * 60, rate
        self.run = demo.DemoRun()
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.faults: list[tuple[float, str]] = []
        self.latencies: list[float] = []
        self.rss: dict[int, list[tuple[float, float]]] = {}
        self.done = asyncio.Event()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def note(self, what: str) -> None:
        self.faults.append((self.elapsed(), what))
        print(f"[{self.elapsed():6.0f} s] {what}", flush=True)

    async def inject(self) -> None:
        plan = [(0.2, self.stop_a_worker), (0.4, self.kill_a_worker)]
        plan += [(0.6, self.restart_owner), (0.8, self.restart_broker)]
        for fraction, fault in plan:
            await asyncio.sleep(max(0.0, fraction * self.seconds - self.elapsed()))
            await fault()

    async def stop_a_worker(self) -> None:
        worker, pid = sorted((await asyncio.to_thread(_workers, self.settings)).items())[-1]
        os.kill(pid, signal.SIGSTOP)
        self.note(f"SIGSTOP worker {worker} (pid {pid}) for 15 s")
        await asyncio.sleep(15)
        os.kill(pid, signal.SIGCONT)
        self.note(f"SIGCONT worker {worker}")

    async def kill_a_worker(self) -> None:
        worker, pid = sorted((await asyncio.to_thread(_workers, self.settings)).items())[0]
        os.kill(pid, signal.SIGKILL)
        self.note(f"SIGKILL worker {worker} (pid {pid})")

    async def restart_owner(self) -> None:
        owner = ray.get_actor(OWNER_NAME, namespace=self.settings.ray.namespace)
        ray.kill(owner, no_restart=False)
        self.note("ClickHouse owner killed (Ray restarts it)")

    async def restart_broker(self) -> None:
        self.note("Kafka broker restarting")
        await asyncio.to_thread(LocalStack(self.settings).restart, "kafka")
        self.note("Kafka broker back")

    async def sample_rss(self) -> None:
        while not self.done.is_set():
            for worker, pid in (await asyncio.to_thread(_workers, self.settings)).items():
                mb = _rss_mb(pid)
                if mb is not None:
                    self.rss.setdefault(worker, []).append((self.elapsed(), mb))
            await asyncio.sleep(10)

    async def probe(self) -> None:
        """Event-to-queryable: post one event, poll the query API until it counts."""
        tenant = f"soak-probe-{uuid.uuid4().hex[:6]}"
        headers = {"authorization": f"Bearer {self.run.key}"}
        url = base_url(self.settings)
        sent = 0
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
            while not self.done.is_set():
                at = time.time()
                event = {"event_id": f"p{sent}", "tenant": tenant, "type": "probe", "ts": at}
                try:
                    answer = await client.post("/v1/events", json=[event])
                except httpx.HTTPError:
                    await asyncio.sleep(1)
                    continue
                if answer.status_code != 202:
                    await asyncio.sleep(1)
                    continue
                sent += 1
                params: dict[str, str | float] = {
                    "tenant": tenant,
                    "from": at - 600,
                    "to": at + 600,
                }
                while not self.done.is_set() and time.time() - at < 120:
                    try:
                        got = await client.get("/v1/query/latest/probe", params=params)
                        if got.status_code == 200 and got.json()["total"]["count"] >= sent:
                            self.latencies.append(time.time() - at)
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.05)
                await asyncio.sleep(2)

    async def main(self) -> dict[str, Any]:
        self.run.key = await demo.demo_key(self.settings)
        sender = asyncio.create_task(demo.produce(self.settings, self.run, self.rate,
                                                  self.seconds, 500))  # fmt: skip
        helpers = [asyncio.create_task(c) for c in (self.sample_rss(), self.probe())]
        faults = asyncio.create_task(self.inject())
        while not sender.done():
            await asyncio.sleep(15)
            status = demo.totals(await asyncio.to_thread(pipeline_status, self.settings))
            print(f"[{self.elapsed():6.0f} s] sent {self.run.sent:,}, lag {status['lag']:,}, "
                  f"workers alive {status['alive']}/{status['workers']}", flush=True)  # fmt: skip
        await sender
        await faults
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status = demo.totals(await asyncio.to_thread(pipeline_status, self.settings))
            if status["lag"] == 0:
                break
            await asyncio.sleep(1)
        await asyncio.sleep(5)
        self.done.set()
        await asyncio.gather(*helpers)
        return {"status": status}


def dead_letters(
    settings: Settings, start: dict[int, int], tag: str, t0: float
) -> tuple[Counter[str], Counter[int]]:
    """Dead letters of this run's tenants since ``start``, by reason; and the late ones
    by when the edge received them (30 s buckets from ``t0``), to tell which fault."""
    consumer = make_consumer(settings.kafka.bootstrap, f"soak-{uuid.uuid4()}")
    end = end_offsets(settings.kafka.bootstrap, settings.kafka.dlq_topic)
    consumer.assign([TopicPartition(settings.kafka.dlq_topic, p, o) for p, o in start.items()])
    reasons: Counter[str] = Counter()
    late_at: Counter[int] = Counter()
    remaining = sum(end.get(p, 0) - o for p, o in start.items())
    deadline = time.monotonic() + 60
    while remaining > 0 and time.monotonic() < deadline:
        for m in consumer.consume(10_000, 1.0):
            if m.error() is not None:
                continue
            remaining -= 1
            record = orjson.loads(m.value() or b"{}")
            if str(record.get("tenant", "")).endswith(tag):
                reason = dict(m.headers() or []).get("reason") or b"?"
                text = reason.decode() if isinstance(reason, bytes) else str(reason)
                reasons[text[:40]] += 1
                if text == "late":
                    late_at[int((record.get("received_at", 0) / 1000 - t0) // 30 * 30)] += 1
    consumer.close()
    return reasons, late_at


def report(
    soak: Soak,
    rows: list[tuple[str, str, int, int, int, float]],
    dlq: Counter[str],
    late_at: Counter[int],
) -> bool:
    sent = sum(r[2] for r in rows)
    counted = sum(r[3] for r in rows)
    ok = all(r[2] == r[3] and abs(r[4] - r[5]) < 1e-6 for r in rows)
    ok = ok and soak.run.failed_requests == 0
    print(f"\nsoak: {soak.seconds / 60:g} min at {soak.rate:,} events/s offered")
    print(f"sent {sent:,} ({sent / (soak.run.sent_for or 1):,.0f}/s), counted {counted:,}: "
          f"{'every event counted' if ok else 'COUNTS DO NOT ADD UP'}")  # fmt: skip
    print(f"failed / retried requests: {soak.run.failed_requests} / {soak.run.retried_requests}")
    print(f"dead-lettered by reason: {dict(dlq) or 'none'}")
    if late_at:
        spells = ", ".join(f"{at}-{at + 30} s: {n:,}" for at, n in sorted(late_at.items()))
        print(f"late, by when the edge received them: {spells}")
    lat = sorted(soak.latencies)
    if lat:
        p99 = lat[min(int(0.99 * len(lat)), len(lat) - 1)]
        print(f"event-to-queryable ({len(lat)} probes): p50 {statistics.median(lat):.2f} s, "
              f"p99 {p99:.2f} s, max {lat[-1]:.2f} s")  # fmt: skip
    print(f"event time to Kafka's ack: p50 {soak.run.age_quantile(0.5):.2f} s, "
          f"p99 {soak.run.age_quantile(0.99):.2f} s")  # fmt: skip
    print("faults: " + "; ".join(f"{at:.0f} s {what}" for at, what in soak.faults))
    for worker, samples in sorted(soak.rss.items()):
        marks = " ".join(
            f"{at / 60:.0f}m:{mb:,.0f}" for at, mb in samples[:: max(1, len(samples) // 12)]
        )
        print(f"worker {worker} RSS MB over time: {marks}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to send")
    parser.add_argument("--rate", type=int, default=10_000, help="events per second offered")
    args = parser.parse_args(argv)
    settings = load_settings()
    start = end_offsets(settings.kafka.bootstrap, settings.kafka.dlq_topic)
    with connected(settings):
        soak = Soak(settings, args.minutes, args.rate)
        asyncio.run(soak.main())
    rows = demo.check_counts(settings, soak.run)
    dlq, late_at = dead_letters(settings, start, soak.run.tag, soak.started_wall)
    return 0 if report(soak, rows, dlq, late_at) else 1


if __name__ == "__main__":
    raise SystemExit(main())
