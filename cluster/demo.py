"""`rayline demo`: a synthetic source posts events at a steady rate while a live view
shows them travel through Kafka, the partition workers and ClickHouse; at the end the
query API is asked for every metric and the counts are checked against what was sent.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from cluster.deploy import base_url, pipeline_status
from cluster.settings import Settings

TENANTS = ("acme", "globex", "initech")
TYPES = ("page_view", "purchase", "signup")


@dataclass
class DemoRun:
    """What the synthetic source sent, and what came back."""

    key: str = ""
    """The platform key the demo sends and reads with."""
    sent: int = 0
    failed_requests: int = 0
    retried_requests: int = 0
    expected: dict[tuple[str, str], list[int]] = field(
        default_factory=lambda: defaultdict(lambda: [0, 0])
    )
    tag: str = field(default_factory=lambda: f"{random.getrandbits(16):04x}")
    """Suffix of this run's tenants, so that an earlier run's windows are not counted."""
    started_at: float = 0.0
    sent_for: float | None = None
    """Seconds the source sent for, once it is done."""
    first_ts_ms: int = 0
    last_error: str | None = None
    ages: list[float] = field(default_factory=list)
    """Per accepted request, seconds from its events' time stamp to Kafka's ack: the
    delay the ingest path adds, which the allowed lateness must cover."""

    def age_quantile(self, q: float) -> float:
        ordered = sorted(self.ages)
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else 0.0


def make_batch(rng: random.Random, run: DemoRun, size: int, seq: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC).isoformat()
    batch = []
    for i in range(size):
        tenant = f"{rng.choice(TENANTS)}-{run.tag}"
        type_ = rng.choice(TYPES)
        value = rng.randint(1, 100)
        batch.append(
            {
                "event_id": f"demo-{seq}-{i}",
                "tenant": tenant,
                "type": type_,
                "ts": now,
                "entity": f"user-{rng.randint(1, 10_000)}",
                "value": value,
                "source": "demo",
            }
        )
    return batch


def _count(run: DemoRun, batch: list[dict[str, Any]]) -> None:
    for event in batch:
        totals = run.expected[(event["tenant"], event["type"])]
        totals[0] += 1
        totals[1] += event["value"]
    run.sent += len(batch)


async def _post(
    client: httpx.AsyncClient, url: str, batch: list[dict[str, Any]], run: DemoRun
) -> None:
    """Post until accepted: 503 and 429 carry Retry-After; nothing is given up."""
    stamped = time.time()
    for _attempt in range(30):
        try:
            response = await client.post(url, json=batch)
        except httpx.HTTPError as exc:
            run.last_error = f"{type(exc).__name__}: {exc}"
            run.retried_requests += 1
            await asyncio.sleep(1)
            continue
        if response.status_code == 202:
            _count(run, batch)
            run.ages.append(time.time() - stamped)
            return
        run.last_error = f"HTTP {response.status_code}: {response.text[:200]}"
        if response.status_code in (429, 503):
            run.retried_requests += 1
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            continue
        break
    run.failed_requests += 1


async def demo_key(settings: Settings) -> str:
    """A platform key for the demo's sender, which writes several tenants' events."""
    from adapters.sources import SourceCatalog

    catalog = SourceCatalog(settings.postgres.dsn(), max_size=1)
    try:
        return await catalog.create_key("*", "rayline demo")
    finally:
        await catalog.close()


async def produce(
    settings: Settings, run: DemoRun, rate: int, duration: float, batch_size: int
) -> None:
    """Send ``rate`` events/s for ``duration`` seconds in batches of ``batch_size``."""
    rng = random.Random(7)
    url = f"{base_url(settings)}/v1/events"
    interval = batch_size / rate
    run.started_at = time.monotonic()
    run.first_ts_ms = int(time.time() * 1000)
    in_flight: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    run.key = await demo_key(settings)
    headers = {"authorization": f"Bearer {run.key}"}
    async with httpx.AsyncClient(timeout=30, limits=limits, headers=headers) as client:
        seq = 0
        while (elapsed := time.monotonic() - run.started_at) < duration:
            due = int(elapsed / interval) + 1
            while seq < due and len(in_flight) < 32:
                task = asyncio.create_task(
                    _post(client, url, make_batch(rng, run, batch_size, seq), run)
                )
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                seq += 1
            await asyncio.sleep(min(interval, 0.05))
        if in_flight:
            await asyncio.gather(*in_flight)
    run.sent_for = time.monotonic() - run.started_at


def totals(status: dict[str, Any] | None) -> dict[str, int]:
    workers = (status or {}).get("workers", [])
    return {
        "processed": sum(w.get("processed", 0) for w in workers),
        "windows": sum(w.get("windows_written", 0) for w in workers),
        "dead_lettered": sum(w.get("dead_lettered", 0) for w in workers),
        "lag": sum(sum(w.get("lag", {}).values()) for w in workers),
        "alive": sum(1 for w in workers if w.get("alive")),
        "workers": len(workers),
    }


def view(run: DemoRun, now: dict[str, int], base: dict[str, int], rate: int, phase: str) -> Table:
    elapsed = max(time.monotonic() - run.started_at, 1e-6) if run.started_at else 0.0
    sending = run.sent_for or elapsed
    table = Table(title=f"Rayline demo: {phase}", show_header=False, min_width=52)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("elapsed", f"{elapsed:,.1f} s")
    table.add_row(
        "events sent",
        f"{run.sent:,}  ({run.sent / sending if sending else 0:,.0f}/s, target {rate:,}/s)",
    )
    table.add_row("events processed", f"{now['processed'] - base['processed']:,}")
    table.add_row("consumer lag", f"{now['lag']:,}")
    table.add_row("window rows written", f"{now['windows'] - base['windows']:,}")
    table.add_row("dead-lettered", f"{now['dead_lettered'] - base['dead_lettered']:,}")
    table.add_row("workers alive", f"{now['alive']} / {now['workers']}")
    table.add_row("failed / retried requests", f"{run.failed_requests} / {run.retried_requests}")
    if run.last_error:
        table.add_row("last error", run.last_error[:80], style="red")
    return table


async def _status(settings: Settings) -> dict[str, int]:
    return totals(await asyncio.to_thread(pipeline_status, settings))


async def run_demo(
    settings: Settings,
    console: Console,
    rate: int,
    duration: float,
    batch_size: int,
    drain_timeout: float = 180.0,
) -> tuple[DemoRun, dict[str, int], dict[str, int]]:
    """Send, show, and wait until every sent event is processed and lag is back to 0."""
    run = DemoRun()
    base = await _status(settings)
    current = dict(base)
    with Live(
        view(run, current, base, rate, "sending"), console=console, refresh_per_second=4
    ) as live:
        sender = asyncio.create_task(produce(settings, run, rate, duration, batch_size))
        while not sender.done():
            current = await _status(settings)
            live.update(view(run, current, base, rate, "sending"))
            await asyncio.sleep(0.5)
        await sender
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline:
            current = await _status(settings)
            live.update(view(run, current, base, rate, "draining"))
            if current["processed"] - base["processed"] >= run.sent and current["lag"] == 0:
                break
            await asyncio.sleep(0.5)
        live.update(view(run, current, base, rate, "done"))
    return run, base, current


def check_counts(settings: Settings, run: DemoRun) -> list[tuple[str, str, int, int, int, float]]:
    """Ask the query API for every metric sent: (tenant, type, sent, counted, sum sent, sum)."""
    url = f"{base_url(settings)}/v1/query/latest"
    start = run.first_ts_ms / 1000 - 3600  # wide enough for any window kind
    rows = []
    headers = {"authorization": f"Bearer {run.key}"}
    with httpx.Client(timeout=30, headers=headers) as client:
        for (tenant, type_), (count, total) in sorted(run.expected.items()):
            answer = client.get(
                f"{url}/{type_}", params={"tenant": tenant, "from": start, "to": time.time() + 120}
            )
            answer.raise_for_status()
            got = answer.json()["total"]
            rows.append((tenant, type_, count, got["count"], total, got["sum"]))
    return rows
