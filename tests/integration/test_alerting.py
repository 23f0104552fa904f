"""Alerting against the real PostgreSQL and real local HTTP receivers: the engine runs
in-process on a list of sealed windows; the API runs through FastAPI's TestClient."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from actors.alerting import AlertEngine, EngineConfig
from adapters.alert_store import AlertStore
from adapters.notifiers import MASK, ChannelConfig, build_senders
from cluster.settings import Settings
from core.incidents import RetryPolicy
from core.sealed import MINUTE_MS, SealedWindow
from serve_apps.alerting import AlertsApiConfig, create_app
from tests.integration.conftest import api_key, deployed_paused, pg

T0 = 1_700_000_040_000 - 1_700_000_040_000 % MINUTE_MS
ROUTING_KEY = "R0UTINGKEY0123456789012345678901"


class Receivers:
    """A threaded HTTP server on a free local port recording every POST by path;
    ``fail_first[path]`` answers that many 500s before the 202s."""

    def __init__(self) -> None:
        self.received: dict[str, list[dict[str, Any]]] = {}
        self.fail_first: dict[str, int] = {}
        self._lock = threading.Lock()
        receivers = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with receivers._lock:
                    receivers.received.setdefault(self.path, []).append(body)
                    left = receivers.fail_first.get(self.path, 0)
                    receivers.fail_first[self.path] = max(0, left - 1)
                self.send_response(500 if left else 202)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Receivers]:
    r = Receivers()
    yield r
    r.close()


def window(tenant: str, minute: int, count: int) -> dict[str, Any]:
    return SealedWindow(
        tenant, "orders", T0 + minute * MINUTE_MS, "site=berlin", count, float(count),
        1.0, 1.0, None, None,
    ).to_row()  # fmt: skip


class ListFeed:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def sealed_windows(self, after_ms: int, limit: int) -> list[dict[str, Any]]:
        return sorted((r for r in self.rows if r["start"] > after_ms), key=lambda r: r["start"])[
            :limit
        ]


def rule_spec(tenant: str) -> dict[str, Any]:
    return {
        "id": "orders-spike",
        "tenant": tenant,
        "type": "orders",
        "window": "1m",
        "metric": "count",
        "condition": {
            "kind": "anomaly",
            "detector": {"kind": "mad", "window": 30, "min_samples": 10},
        },
        "severity": "error",
    }


class Engines:
    """Makes engines on the real store and real HTTP; closes their connections after."""

    def __init__(self, settings: Settings, receivers: Receivers) -> None:
        self._settings = settings
        self._receivers = receivers
        self._stores: list[AlertStore] = []
        self.client = httpx.Client(timeout=5)

    def make(self, feed: ListFeed, name: str) -> AlertEngine:
        store = AlertStore(self._settings.postgres.dsn())
        self._stores.append(store)
        url = self._receivers.url
        config = ChannelConfig(
            slack_webhook_url=f"{url}/slack",
            pagerduty_routing_key=ROUTING_KEY,
            pagerduty_events_url=f"{url}/pd",
            policy=RetryPolicy(attempts=3, base_ms=10, max_ms=50),
        )
        return AlertEngine(
            store,
            feed,
            build_senders(config, store, self.client),
            config=EngineConfig(first_cursor_ms=0, state_name=name),
        )

    def close(self) -> None:
        for store in self._stores:
            store.close()
        self.client.close()


@pytest.fixture
def engines(services: Settings, receivers: Receivers) -> Iterator[Engines]:
    # The deployed engine (full runs) shares the outbox and acknowledge tables: paused,
    # it cannot deliver what the in-process engines queued.
    with deployed_paused(services, "rayline-alerting"):
        made = Engines(services, receivers)
        yield made
        made.close()


def incidents_of(settings: Settings, tenant: str) -> list[Any]:
    return list(pg(settings, "SELECT * FROM incidents WHERE tenant = $1", tenant))


def test_an_anomaly_pages_once_survives_a_restart_and_resolves(
    services: Settings, receivers: Receivers, engines: Engines, tenant: str
) -> None:
    pg(
        services,
        "INSERT INTO alert_rules (tenant, id, spec) VALUES ($1, 'orders-spike', $2::jsonb)",
        tenant,
        json.dumps(rule_spec(tenant)),
    )
    feed = ListFeed([window(tenant, m, 100 + m % 3) for m in range(20)])
    feed.rows.append(window(tenant, 20, 900))
    receivers.fail_first["/slack"] = 1
    name = f"test-{uuid.uuid4().hex[:8]}"
    engines.make(feed, name).step()

    [incident] = incidents_of(services, tenant)
    assert (incident["state"], incident["last_value"]) == ("firing", 900.0)
    [trigger] = receivers.received["/pd"]
    assert trigger["routing_key"] == ROUTING_KEY
    assert trigger["event_action"] == "trigger"
    assert trigger["dedup_key"] == incident["id"]
    assert trigger["payload"]["custom_details"]["tenant"] == tenant
    slack = receivers.received["/slack"]
    assert len(slack) == 2, "the 500 was not retried"
    assert slack[1]["text"].startswith("Firing: orders-spike (site=berlin)")
    assert [b["type"] for b in slack[1]["blocks"]] == ["header", "section", "section"]

    # A restart resumes from the snapshot in PostgreSQL: no second page.
    restarted = engines.make(feed, name)
    restarted.step()
    assert len(receivers.received["/pd"]) == 1
    assert [i.id for i in restarted.open_incidents()] == [incident["id"]]

    feed.rows.extend(window(tenant, m, 100) for m in range(21, 23))
    restarted.step()
    [resolved] = incidents_of(services, tenant)
    assert resolved["state"] == "resolved"
    assert resolved["resolved_at"] is not None
    assert receivers.received["/pd"][1] == {
        "routing_key": ROUTING_KEY,
        "event_action": "resolve",
        "dedup_key": incident["id"],
    }
    assert receivers.received["/slack"][2]["text"].startswith("Resolved")

    log = pg(
        services,
        "SELECT channel, action, attempt, status_code, delivered, payload FROM notification_log "
        "WHERE incident_id = $1 ORDER BY id",
        incident["id"],
    )
    rows = sorted((r["channel"], r["action"], r["attempt"], r["status_code"]) for r in log)
    assert rows == [
        ("pagerduty", "resolve", 1, 202),
        ("pagerduty", "trigger", 1, 202),
        ("slack", "resolve", 1, 202),
        ("slack", "trigger", 1, 500),
        ("slack", "trigger", 2, 202),
    ]
    assert all(
        json.loads(r["payload"])["routing_key"] == MASK for r in log if r["channel"] == "pagerduty"
    ), "the routing key was written to the log"


def test_an_acknowledge_through_the_api_reaches_pagerduty(
    services: Settings, receivers: Receivers, engines: Engines, tenant: str
) -> None:
    pg(
        services,
        "INSERT INTO alert_rules (tenant, id, spec) VALUES ($1, 'orders-spike', $2::jsonb)",
        tenant,
        json.dumps(rule_spec(tenant)),
    )
    feed = ListFeed([window(tenant, m, 100 + m % 3) for m in range(20)] + [window(tenant, 20, 900)])
    engine = engines.make(feed, f"test-{uuid.uuid4().hex[:8]}")
    engine.step()
    [incident] = incidents_of(services, tenant)
    key = api_key(services, tenant)
    with TestClient(create_app(AlertsApiConfig(services.postgres.dsn()))) as client:
        answer = client.post(
            f"/incidents/{incident['id']}/acknowledge",
            json={"by": "alice"},
            headers={"authorization": f"Bearer {key}"},
        )
    assert answer.status_code == 202, answer.text
    assert answer.json()["state"] == "acknowledged"
    engine.step()
    assert receivers.received["/pd"][-1] == {
        "routing_key": ROUTING_KEY,
        "event_action": "acknowledge",
        "dedup_key": incident["id"],
    }
    assert "by alice" in receivers.received["/slack"][-1]["text"]
    [row] = incidents_of(services, tenant)
    assert (row["state"], row["acked_by"]) == ("acknowledged", "alice")


def test_the_api_keeps_tenants_apart(services: Settings) -> None:
    a, b = f"t-{uuid.uuid4().hex[:12]}", f"t-{uuid.uuid4().hex[:12]}"
    key_a, key_b = api_key(services, a), api_key(services, b)
    incident_id = uuid.uuid4().hex[:16]
    pg(
        services,
        "INSERT INTO incidents (id, tenant, rule_id, group_key, state, opened_at) "
        "VALUES ($1, $2, 'orders-spike', '', 'firing', now())",
        incident_id,
        a,
    )
    as_a = {"authorization": f"Bearer {key_a}"}
    as_b = {"authorization": f"Bearer {key_b}"}
    with TestClient(create_app(AlertsApiConfig(services.postgres.dsn()))) as client:
        assert client.get("/rules").status_code == 401
        made = client.post("/rules", json=rule_spec(a), headers=as_a)
        assert made.status_code == 201, made.text
        assert client.post("/rules", json=rule_spec(a), headers=as_a).status_code == 409

        bad = client.post(
            "/rules",
            json={**rule_spec(a), "condition": {"kind": "threshold", "op": "~", "value": 1}},
            headers=as_a,
        )
        assert bad.status_code == 422
        assert bad.json()["errors"][0]["field"] == "condition.op"
        wide = client.post("/rules", json={**rule_spec(a), "window": "5m"}, headers=as_a)
        assert (wide.status_code, wide.json()["errors"][0]["field"]) == (422, "window")

        assert client.get("/rules", headers=as_b).json() == {"rules": []}
        for method, path in (
            ("GET", "/rules/orders-spike"),
            ("PUT", "/rules/orders-spike"),
            ("DELETE", "/rules/orders-spike"),
            ("GET", f"/incidents/{incident_id}"),
            ("POST", f"/incidents/{incident_id}/acknowledge"),
        ):
            body = rule_spec(b) if method == "PUT" else None
            answer = client.request(method, path, json=body, headers=as_b)
            assert answer.status_code == 404, (method, path, answer.text)
        assert client.get("/incidents", headers=as_b).json() == {"incidents": []}
        assert client.get("/rules", headers=as_b, params={"tenant": a}).status_code == 403

        seen = client.get(f"/incidents/{incident_id}", headers=as_a).json()
        assert (seen["tenant"], seen["notifications"]) == (a, [])
        firing = client.get("/incidents", headers=as_a, params={"state": "firing"}).json()
        assert [i["id"] for i in firing["incidents"]] == [incident_id]

        changed = client.put(
            "/rules/orders-spike", json={**rule_spec(a), "enabled": False}, headers=as_a
        )
        assert (changed.status_code, changed.json()["enabled"]) == (200, False)

        silence = client.post("/silences", json={"duration_minutes": 30}, headers=as_a)
        assert silence.status_code == 201, silence.text
        silence_id = silence.json()["id"]
        assert client.delete(f"/silences/{silence_id}", headers=as_b).status_code == 404
        assert client.delete(f"/silences/{silence_id}", headers=as_a).status_code == 204
        assert client.delete("/rules/orders-spike", headers=as_a).status_code == 204
        assert "/rules/{rule_id}" in client.get("/openapi.json").json()["paths"]
