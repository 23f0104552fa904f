"""An anomaly end to end on the stack: raw events in ClickHouse → 1-minute rollups →
sealed windows from the owner actor → the alerting engine → Slack and PagerDuty
receivers (real local HTTP servers), with the rule and the incident through the
deployed `/v1/alerts` API.

The events go straight into the stack's ClickHouse, a few minutes past the current
sealed point, and the test seals them on purpose (`advance_rollups`), up to about 45
minutes before now: a point the tests that read the newest minutes never reach. The
engine runs in this process (from its own cursor, just before the series) with the
deployed one paused, so that exactly one engine judges the series.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import ray

from actors.alerting import AlertEngine, ClickHouseSealedFeed, EngineConfig
from actors.clickhouse_owner import OWNER_NAME
from adapters.alert_store import AlertStore
from adapters.notifiers import ChannelConfig, build_senders
from cluster.settings import Settings
from core.incidents import RetryPolicy
from tests.integration.conftest import api_key, deployed_paused, eventually
from tests.integration.query_data import MINUTE_MS, Event, events_table
from tests.integration.test_alerting import ROUTING_KEY, Receivers


@pytest.fixture
def receivers() -> Iterator[Receivers]:
    r = Receivers()
    yield r
    r.close()


def steady_series_with_a_spike(tenant: str, base: int) -> list[Event]:
    """Orders per minute: ~30 for 12 minutes, 300 in minute 12, ~30 again after."""
    events = []
    for minute in range(16):
        count = 300 if minute == 12 else 30 + minute % 3
        for i in range(count):
            ts = base + minute * MINUTE_MS + i * (MINUTE_MS // count)
            events.append(
                Event(tenant, "orders", ts, f"{tenant}-{minute}-{i}", f"c{i % 7}", 1.0, "eu")
            )
    return events


def _engine(
    stack: Settings,
    receivers: Receivers,
    store: AlertStore,
    client: httpx.Client,
    first_cursor: int,
) -> AlertEngine:
    channels = ChannelConfig(
        slack_webhook_url=f"{receivers.url}/slack",
        pagerduty_routing_key=ROUTING_KEY,
        pagerduty_events_url=f"{receivers.url}/pd",
        policy=RetryPolicy(attempts=3, base_ms=10, max_ms=50),
    )
    return AlertEngine(
        store,
        ClickHouseSealedFeed(stack.ray.namespace),
        build_senders(channels, store, client),
        config=EngineConfig(first_cursor_ms=first_cursor, state_name=f"e2e-{uuid.uuid4().hex}"),
    )


def _mine(received: list[dict[str, Any]], tenant: str, dedup_keys: set[str]) -> list[Any]:
    return [r for r in received if tenant in repr(r) or r.get("dedup_key") in dedup_keys]


def test_an_injected_anomaly_fires_one_incident_that_resolves_with_one_page_each(
    stack: Settings, receivers: Receivers
) -> None:
    tenant = f"al-{uuid.uuid4().hex[:8]}"
    key = api_key(stack, tenant)
    with httpx.Client(
        base_url=f"http://{stack.serve.host}:{stack.serve.port}/v1/alerts",
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    ) as api:
        rule = {
            "id": "orders-spike",
            "type": "orders",
            "window": "1m",
            "metric": "count",
            "condition": {
                "kind": "anomaly",
                "detector": {"kind": "mad", "window": 30, "min_samples": 8},
            },
            "severity": "error",
        }
        created = api.post("/rules", json=rule)
        assert created.status_code == 201, created.text
        with deployed_paused(stack, "rayline-alerting"):
            ray.init(address=stack.ray.address, namespace=stack.ray.namespace, log_to_driver=False)
            try:
                owner = ray.get_actor(OWNER_NAME, namespace=stack.ray.namespace)

                # The first minute is sealed once every partition has reported a watermark,
                # which may be a little after the stack came up.
                def seal_status() -> dict[str, Any]:
                    ref: Any = owner.rollup_status.remote()
                    answer: dict[str, Any] = ray.get(ref)
                    return answer

                status = eventually(seal_status, lambda s: "windows_1m" in s["sealed"], timeout=180)
                sealed = int(status["sealed"]["windows_1m"])
                base = sealed + 3 * MINUTE_MS  # past what the sealing loop reaches meanwhile
                now = int(time.time() * 1000)
                assert base + 16 * MINUTE_MS < now - 20 * MINUTE_MS, (
                    f"sealed up to {sealed}, too close to now ({now}) for a 16-minute series"
                )
                ray.get(
                    owner.insert_events.remote(
                        events_table(steady_series_with_a_spike(tenant, base))
                    )
                )
                ray.get(owner.advance_rollups.remote(base + 16 * MINUTE_MS))
                store, client = AlertStore(stack.postgres.dsn()), httpx.Client(timeout=5)
                try:
                    engine = _engine(stack, receivers, store, client, first_cursor=base - 1)
                    for _ in range(20):
                        if not engine.step().more:
                            break
                finally:
                    store.close()
                    client.close()
            finally:
                ray.shutdown()

        incidents = api.get("/incidents").json()
        assert len(incidents["incidents"]) == 1, incidents
        [incident] = incidents["incidents"]
        assert incident["state"] == "resolved"
        assert incident["rule_id"] == "orders-spike"
        ids = {incident["id"]}
        pd = _mine(receivers.received.get("/pd", []), tenant, ids)
        assert [p["event_action"] for p in pd] == ["trigger", "resolve"]
        assert {p["dedup_key"] for p in pd} == ids
        assert {p["routing_key"] for p in pd} == {ROUTING_KEY}
        assert pd[0]["payload"]["custom_details"]["tenant"] == tenant
        slack = _mine(receivers.received.get("/slack", []), tenant, ids)
        assert [m["text"].split(":")[0] for m in slack] == ["Firing", "Resolved"]
        assert api.delete("/rules/orders-spike").status_code in (200, 204)
