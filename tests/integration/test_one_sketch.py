"""One sketch family on the real stack: for a closed, sealed minute, `/latest` (the
workers' windows), `/series` at 1m, 1h and 1d, `/summary` and alerting's sealed windows
all give the same count, sum, min and max, and the same distinct count and quantiles,
and those equal Rayline's own HyperLogLog and DDSketch computed here over the values
that were sent.

The test stack seals nothing newer than an hour (its largest lateness), and the alerting
test seals minutes up to about 45 minutes back on purpose, so no recent minute is
sealed in time on its own: this test sends now-stamped events of a tenant with the
default lateness, waits for its minute to close and its raw events to be stored, then
seals it on purpose (``advance_rollups``, as an operator may). It runs after the other
tests, since the minutes before it are then sealed too (their later events would be
read from the aggregates, which no longer take them)."""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pytest
import ray

from actors.clickhouse_owner import OWNER_NAME
from cluster.settings import Settings
from core.sketches import DDSketch, HyperLogLog, hash64
from tests.integration.conftest import eventually
from tests.integration.test_processing import early_in_a_minute, post

MINUTE_S = 60
METRICS = ("count", "sum", "min", "max", "distinct", "p50", "p90", "p99")


def sent_events(tenant: str, minute_s: int) -> list[dict[str, Any]]:
    """300 events in one minute: 120 entities (on several partitions), values in
    quarters (so every sum is exact in any order), some negative, some zero."""
    rng = random.Random(13)
    events = []
    for i in range(300):
        value = round(rng.lognormvariate(2, 1.5) * 4) / 4 * (-1 if i % 10 == 0 else 1)
        events.append(
            {
                "event_id": f"s-{i}",
                "tenant": tenant,
                "type": "buy",
                "ts": minute_s + 1 + (i % 50) / 10,
                "value": 0.0 if i % 37 == 0 else value,
                "entity": f"u{i % 120}",
            }
        )
    return events


def expected(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What every endpoint must answer, computed with core.sketches."""
    values = np.array([e["value"] for e in events])
    hll = HyperLogLog()
    hll.add_hashes(hash64(pa.array([e["entity"] for e in events])))
    dd = DDSketch()
    dd.add_values(values)
    return {
        "count": len(events),
        "sum": float(values.sum()),
        "min": float(values.min()),
        "max": float(values.max()),
        "distinct": round(hll.estimate()),
        **{f"p{round(q * 100)}": dd.quantile(q) for q in (0.5, 0.9, 0.99)},
    }


def latest(http: httpx.Client, tenant: str, minute_s: int) -> dict[str, Any]:
    params: dict[str, str | int] = {
        "tenant": tenant,
        "window": "1m",
        "from": minute_s,
        "to": minute_s + MINUTE_S,
    }
    answer = http.get("/v1/query/latest/buy", params=params)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def series_point(
    http: httpx.Client, tenant: str, minute_s: int, resolution: str, metric: str
) -> tuple[Any, float]:
    """The one point of ``metric`` over the minute's bucket, and up to where the
    answer was read from the aggregate tables (its ``sealed_until``), epoch s."""
    span = {"1m": MINUTE_S, "1h": 3600, "1d": 86400}[resolution]
    start = minute_s // span * span
    params: dict[str, str | int] = {"tenant": tenant, "type": "buy", "metric": metric}
    params |= {"resolution": resolution, "from": start, "to": start + span}
    answer = http.get("/v1/query/series", params=params)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    [series] = body["series"]
    [(t, value)] = series["points"]
    assert t == start * 1000
    return value, epoch_s(body["sealed_until"])


def sealed_point(
    http: httpx.Client, tenant: str, minute_s: int, resolution: str, metric: str
) -> Any:
    """The point once the answer reads the minute from the aggregate tables: a replica
    reads the sealed point anew once a second, so its first answers may still read it
    from the raw events (right too, but not what is tested here)."""
    value, _sealed = eventually(
        lambda: series_point(http, tenant, minute_s, resolution, metric),
        lambda answer: answer[1] >= minute_s + MINUTE_S,
        timeout=30,
    )
    return value


def epoch_s(iso: str | None) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() if iso else 0.0


def sealed_minute_s(http: httpx.Client, tenant: str) -> float:
    health = http.get("/v1/query/healthz", params={"tenant": tenant}).json()
    return epoch_s(health.get("sealed_until"))


@pytest.mark.after_others
def test_every_endpoint_answers_a_sealed_minute_with_the_same_sketches(
    http: httpx.Client, stack: Settings, live_tenant: str
) -> None:
    # Every event of the minute is stamped before now (7 s into it at least) with 30 s
    # or more to spare, so the minute is the one the events arrive in.
    minute_s = int(early_in_a_minute(spare=30, behind=7)) // MINUTE_S * MINUTE_S
    assert sealed_minute_s(http, live_tenant) <= minute_s, "the minute is sealed already"
    events = sent_events(live_tenant, minute_s)
    post(http, events)
    want = expected(events)

    closed = eventually(
        lambda: latest(http, live_tenant, minute_s)["windows"],
        lambda w: len(w) == 1 and not w[0]["open"] and w[0]["count"] == len(events),
        timeout=180,
    )[0]
    live_answer = {m: closed[m] for m in ("count", "sum", "min", "max", "distinct")}
    assert live_answer | closed["quantiles"] == want

    # Unsealed, the minute is read from the raw events: once all are stored, seal it.
    eventually(
        lambda: series_point(http, live_tenant, minute_s, "1m", "count")[0],
        lambda count: count == len(events),
        timeout=60,
    )
    ray.init(address=stack.ray.address, namespace=stack.ray.namespace, log_to_driver=False)
    try:
        owner = ray.get_actor(OWNER_NAME, namespace=stack.ray.namespace)
        ray.get(owner.advance_rollups.remote((minute_s + MINUTE_S) * 1000), timeout=120)
    finally:
        ray.shutdown()
    assert sealed_minute_s(http, live_tenant) >= minute_s + MINUTE_S
    for resolution in ("1m", "1h", "1d"):
        got = {m: sealed_point(http, live_tenant, minute_s, resolution, m) for m in METRICS}
        assert got == want, resolution

    summary = http.get(
        "/v1/query/summary",
        params={
            "tenant": live_tenant,
            "type": "buy",
            "resolution": "1m",
            "from": minute_s,
            "to": minute_s + MINUTE_S,
        },
    )
    assert summary.status_code == 200, summary.text
    [group] = summary.json()["groups"]
    assert {m: group[m] for m in METRICS} == want

    ray.init(address=stack.ray.address, namespace=stack.ray.namespace, log_to_driver=False)
    try:
        owner = ray.get_actor(OWNER_NAME, namespace=stack.ray.namespace)
        ref: Any = owner.sealed_windows.remote(minute_s * 1000 - 1, 10_000)
        rows: list[dict[str, Any]] = ray.get(ref)
    finally:
        ray.shutdown()
    [window] = [r for r in rows if r["tenant"] == live_tenant]
    assert window["start"] == minute_s * 1000
    sealed = {m: window[m] for m in ("count", "sum", "min", "max", "distinct")}
    assert sealed | window["quantiles"] == want
