"""One sketch family on the real stack: for a closed, sealed minute, `/latest` (the
workers' windows), `/series` at 1m, 1h and 1d, `/summary` and alerting's sealed windows
all give the same count, sum, min and max, and the same distinct count and quantiles,
and those equal Rayline's own HyperLogLog and DDSketch computed here over the values
that were sent."""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
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
) -> Any:
    span = {"1m": MINUTE_S, "1h": 3600, "1d": 86400}[resolution]
    start = minute_s // span * span
    params: dict[str, str | int] = {"tenant": tenant, "type": "buy", "metric": metric}
    params |= {"resolution": resolution, "from": start, "to": start + span}
    answer = http.get("/v1/query/series", params=params)
    assert answer.status_code == 200, answer.text
    [series] = answer.json()["series"]
    [(t, value)] = series["points"]
    assert t == start * 1000
    return value


def sealed_minute_s(http: httpx.Client, tenant: str) -> float:
    health = http.get("/v1/query/healthz", params={"tenant": tenant}).json()
    sealed = health.get("sealed_until")
    return datetime.fromisoformat(sealed.replace("Z", "+00:00")).timestamp() if sealed else 0.0


def test_every_endpoint_answers_a_sealed_minute_with_the_same_sketches(
    http: httpx.Client, stack: Settings, tenant: str
) -> None:
    # The test stack allows some tenants an hour of lateness, so nothing newer than an
    # hour is sealed: the minute is the one 59 minutes before this one, which a tenant
    # with that lateness (``tenant``) may still send (30 s or more to spare), and which
    # closes and is sealed about two minutes from now.
    minute_s = int(early_in_a_minute(spare=30)) // MINUTE_S * MINUTE_S - 59 * MINUTE_S
    live_tenant = tenant
    events = sent_events(live_tenant, minute_s)
    post(http, events)
    want = expected(events)

    closed = eventually(
        lambda: latest(http, live_tenant, minute_s)["windows"],
        lambda w: len(w) == 1 and not w[0]["open"] and w[0]["count"] == len(events),
        timeout=240,
    )[0]
    live_answer = {m: closed[m] for m in ("count", "sum", "min", "max", "distinct")}
    assert live_answer | closed["quantiles"] == want

    eventually(
        lambda: sealed_minute_s(http, live_tenant),
        lambda sealed: sealed >= minute_s + MINUTE_S,
        timeout=240,
    )
    for resolution in ("1m", "1h", "1d"):
        got = {m: series_point(http, live_tenant, minute_s, resolution, m) for m in METRICS}
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
