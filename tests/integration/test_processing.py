"""Event-time processing on the real stack: windows close into ClickHouse, late events
go to the dead-letter topic, duplicates count once, and a killed or rescaled worker
neither loses nor double-counts anything."""

from __future__ import annotations

import time
from typing import Any

import httpx
import ray

from adapters.kafka import end_offsets
from cluster.settings import Settings
from tests.integration.conftest import eventually, rayline, read_from, workers


def minute_now() -> int:
    return int(time.time()) // 60 * 60


def event(tenant: str, n: int, ts_s: float, value: float = 1, **extra: Any) -> dict[str, Any]:
    fields = {"event_id": f"p-{n}", "tenant": tenant, "type": "click", "ts": ts_s, "value": value}
    return {**fields, **extra}


def metric(http: httpx.Client, tenant: str, **params: Any) -> dict[str, Any]:
    now = time.time()
    query = {"tenant": tenant, "from": now - 3 * 3600, "to": now + 3600, **params}
    answer = http.get("/v1/query/latest/click", params=query)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def post(http: httpx.Client, events: list[dict[str, Any]]) -> None:
    answer = http.post("/v1/events", json=events)
    assert answer.status_code == 202, answer.text


def early_in_a_minute(spare: float = 25, behind: float = 1) -> float:
    """Now, once at least ``spare`` seconds are left in the current minute and at least
    ``behind`` seconds of it have passed (events stamped up to ``behind`` seconds before
    now still fall in it)."""
    into = time.time() % 60
    if 60 - into < spare:
        time.sleep(60 - into + behind)
    elif into < behind:
        time.sleep(behind - into)
    return time.time()


def test_windows_close_into_clickhouse_and_late_events_are_dead_lettered(
    http: httpx.Client, stack: Settings, live_tenant: str
) -> None:
    tenant = live_tenant  # the default lateness: its minute closes soon after it ends
    now = early_in_a_minute()
    post(http, [event(tenant, i, now - i * 0.1, i, entity="e") for i in range(6)])
    live = eventually(lambda: metric(http, tenant), lambda m: m["total"]["count"] == 6)
    assert [w["open"] for w in live["windows"]] == [True]
    # Once its tenant's watermark passes the minute's end (5 s of lateness, the broker's
    # time moved on by other traffic or an idle spell of 10 s), the minute is written
    # to ClickHouse; nothing else moves it.
    closed = eventually(
        lambda: metric(http, tenant),
        lambda m: len(m["windows"]) == 1 and not m["windows"][0]["open"],
        timeout=90,
    )
    assert [(w["count"], w["sum"]) for w in closed["windows"]] == [(6, 15.0)]
    assert time.time() >= now // 60 * 60 + 60 + 5  # not before the minute and lateness
    hopping = metric(http, tenant, window="5m/1m")
    assert sum(w["count"] for w in hopping["windows"]) == 5 * 6

    dlq_before = end_offsets(stack.kafka.bootstrap, stack.kafka.dlq_topic)
    # ten minutes old: every window that would hold it (1m, 5m/1m) has closed
    post(http, [event(tenant, 200, now - 600, 50, entity="e")])
    (letter,) = read_from(stack, stack.kafka.dlq_topic, dlq_before, 1)
    assert dict(letter.headers())["reason"] == b"late"
    assert f'"event_id":"p-200","source":"api","tenant":"{tenant}"' in letter.value().decode()
    time.sleep(1)
    assert metric(http, tenant)["total"] == {"count": 6, "sum": 15.0}


def test_an_event_stamped_far_ahead_is_refused_and_moves_nothing(
    http: httpx.Client, stack: Settings, live_tenant: str
) -> None:
    """A wrong clock (an hour ahead) is refused per record with reason `future`, and the
    tenant's events that follow, on time, still count."""
    now = time.time()
    dlq_before = end_offsets(stack.kafka.bootstrap, stack.kafka.dlq_topic)
    answer = http.post(
        "/v1/events",
        json=[event(live_tenant, 1, now + 3600, 1), event(live_tenant, 2, now, 2)],
    )
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert (body["accepted"], body["rejected"]) == (1, 1)
    (error,) = body["errors"]
    assert (error["index"], error["field"]) == (0, "ts")
    assert "ahead of the time it arrived" in error["message"]
    (letter,) = read_from(stack, stack.kafka.dlq_topic, dlq_before, 1)
    headers = dict(letter.headers())
    assert headers["reason"] == b"future"
    assert b"max_future_skew_seconds" in headers["detail"]
    post(http, [event(live_tenant, 3, time.time() - 1, 4)])
    done = eventually(lambda: metric(http, live_tenant), lambda m: m["total"]["count"] == 2)
    assert done["total"]["sum"] == 6.0


def test_a_repeated_event_counts_once(http: httpx.Client, tenant: str) -> None:
    batch = [event(tenant, i, minute_now() - 600 + i, 2) for i in range(20)]
    post(http, batch)
    post(http, batch[5:15])  # a sender's retry
    post(http, [batch[0], batch[0]])
    done = eventually(lambda: metric(http, tenant), lambda m: m["total"]["count"] >= 20)
    time.sleep(1.5)
    assert metric(http, tenant)["total"] == done["total"] == {"count": 20, "sum": 40.0}


def test_a_killed_worker_resumes_from_its_snapshot(
    http: httpx.Client, stack: Settings, tenant: str, driver: None
) -> None:
    now = minute_now()
    first = [event(tenant, i, now - 900 + i % 60, 1, entity=f"d{i % 50}") for i in range(500)]
    post(http, first)
    eventually(lambda: metric(http, tenant), lambda m: m["total"]["count"] >= 500)
    for handle in workers(stack):
        ray.kill(handle, no_restart=False)  # like SIGKILL; Ray restarts the actor
    second = [
        event(tenant, 1000 + i, now - 900 + i % 60, 1, entity=f"d{i % 50}") for i in range(500)
    ]
    post(http, second + first[:100])  # and some repeats across the restart
    answer = eventually(
        lambda: metric(http, tenant), lambda m: m["total"]["count"] >= 1000, timeout=120
    )
    time.sleep(2)
    assert answer["total"] == metric(http, tenant)["total"] == {"count": 1000, "sum": 1000.0}


def test_scaling_workers_keeps_every_count(
    http: httpx.Client, stack: Settings, tenant: str
) -> None:
    now = minute_now()
    post(http, [event(tenant, i, now - 300, 1, entity=f"s{i}") for i in range(300)])
    for count in (3, 1, stack.pipeline.workers):
        result = rayline("scale", "workers", str(count))
        assert result.returncode == 0, result.stdout + result.stderr
        assert f": {count} workers" in result.stdout
        more = [event(tenant, 1000 * count + i, now - 300, 1, entity=f"s{i}") for i in range(100)]
        post(http, more)
    expected = 300 + 3 * 100
    answer = eventually(
        lambda: metric(http, tenant), lambda m: m["total"]["count"] >= expected, timeout=120
    )
    time.sleep(2)
    assert answer["total"]["count"] == metric(http, tenant)["total"]["count"] == expected
