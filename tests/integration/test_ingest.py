"""The ingest edge against the real Kafka, PostgreSQL and Redis: every class of bad
input gets its exact status, every accepted record is in ``events.raw`` and every
record rejected on its own is in ``events.dlq``; a request refused as a whole leaves
nothing in either.

The edge runs in-process (the same handler the Serve app runs), so each test can give
it the limits it needs; tests/integration/test_walking_skeleton.py covers the deployed
Serve app.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest
from confluent_kafka import Producer
from fastapi import FastAPI
from fastapi.testclient import TestClient

from adapters.kafka import end_offsets
from adapters.sources import Source
from cluster.settings import Settings
from core import avro, signatures
from core.exceptions import ConfigurationError
from serve_apps.edge import EdgeConfig, IngestEdge
from serve_apps.ingest_routes import add_routes
from tests.integration.conftest import (
    catalog_call,
    eventually,
    pg,
    rayline,
    read_from,
    read_matching,
)

NOW = time.time()


def _config(settings: Settings, **changes: Any) -> EdgeConfig:
    base = EdgeConfig(
        bootstrap=settings.kafka.bootstrap,
        topic=settings.kafka.raw_topic,
        dlq_topic=settings.kafka.dlq_topic,
        consumer_group=settings.kafka.consumer_group,
        dsn=settings.postgres.dsn(),
        redis_url=settings.redis.url(),
        max_consumer_lag=0,
    )
    return dataclasses.replace(base, **changes)


def _client(config: EdgeConfig) -> Iterator[TestClient]:
    edge = IngestEdge(config)
    api = FastAPI()
    add_routes(api, edge)
    with TestClient(api) as client:
        yield client
    edge.close()


@pytest.fixture(scope="module")
def client(services: Settings) -> Iterator[TestClient]:
    yield from _client(_config(services))


def _key(settings: Settings, tenant: str) -> dict[str, str]:
    key = catalog_call(settings, lambda c: c.create_key(tenant, "test"))
    return {"authorization": f"Bearer {key}"}


def _source(settings: Settings, **fields: Any) -> Source:
    name = f"src-{uuid.uuid4().hex[:10]}"
    source = Source(name=name, **fields)
    catalog_call(settings, lambda c: c.add_source(source))
    return source


def _register(subject: str, schema: dict[str, Any], folder: Path) -> None:
    source, type_ = subject.split(".", 1)
    path = folder / f"{subject}.avsc"
    path.write_text(json.dumps(schema))
    result = rayline("schemas", "register", str(path), "--source", source, "--type", type_)
    assert result.returncode == 0, result.stdout + result.stderr


class Topics:
    """End offsets of the raw and dead-letter topics before a test's request; the test's
    own records are told apart by its tenant (other components write to both topics in a
    full run: workers dead-letter late records while these tests run)."""

    def __init__(self, settings: Settings, marker: str) -> None:
        self.settings = settings
        self.marker = marker.encode()
        self.raw = end_offsets(settings.kafka.bootstrap, settings.kafka.raw_topic)
        self.dlq = end_offsets(settings.kafka.bootstrap, settings.kafka.dlq_topic)

    def _mine(self, topic: str, start: dict[int, int]) -> list[Any]:
        """This test's records among those written to ``topic`` since ``start``."""
        end = end_offsets(self.settings.kafka.bootstrap, topic)
        added = sum(end.values()) - sum(start.values())
        if added == 0:
            return []
        records = read_from(self.settings, topic, start, added, 20)
        return [r for r in records if self._is_mine(r)]

    def new_raw(self, count: int) -> list[Any]:
        s = self.settings
        return read_matching(s, s.kafka.raw_topic, self.raw, self._is_mine, count, 20)

    def new_dlq(self, count: int) -> list[Any]:
        s = self.settings
        return read_matching(s, s.kafka.dlq_topic, self.dlq, self._is_mine, count, 20)

    def _is_mine(self, record: Any) -> bool:
        headers = [value or b"" for _, value in record.headers() or []]
        return any(self.marker in part for part in [record.value() or b"", *headers])

    def added(self) -> tuple[int, int]:
        """This test's records written since (raw, dead letters): exact, since a 2xx
        follows the acks."""
        s = self.settings
        return (
            len(self._mine(s.kafka.raw_topic, self.raw)),
            len(self._mine(s.kafka.dlq_topic, self.dlq)),
        )

    def unchanged(self) -> bool:
        return self.added() == (0, 0)


def _event(tenant: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"event_id": f"e-{n}", "tenant": tenant, "type": "order", "ts": NOW, "value": n, **extra}


# --- the batch events API -----------------------------------------------------------


def test_a_batch_is_acknowledged_after_kafka_has_every_record(
    client: TestClient, services: Settings, tenant: str
) -> None:
    topics = Topics(services, tenant)
    events = [_event(tenant, n) for n in range(50)]
    answer = client.post("/v1/events", json=events, headers=_key(services, tenant))
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"accepted": 50, "rejected": 0}
    records = topics.new_raw(50)
    assert sorted(orjson.loads(r.value())["event_id"] for r in records) == sorted(
        e["event_id"] for e in events
    )
    assert all(
        r.key() == f"{tenant}:e-{orjson.loads(r.value())['value']}".encode() for r in records
    )


def test_ndjson_with_a_bad_line_accepts_the_rest_and_dead_letters_the_line(
    client: TestClient, services: Settings, tenant: str
) -> None:
    topics = Topics(services, tenant)
    broken = b"{not json " + tenant.encode()
    lines = [orjson.dumps(_event(tenant, 1)), broken, orjson.dumps(_event(tenant, 2))]
    answer = client.post(
        "/v1/events",
        content=b"\n".join(lines),
        headers={**_key(services, tenant), "content-type": "application/x-ndjson"},
    )
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert (body["accepted"], body["rejected"]) == (2, 1)
    assert [e["index"] for e in body["errors"]] == [1]
    assert len(topics.new_raw(2)) == 2
    (dead,) = topics.new_dlq(1)
    assert dead.value() == broken
    headers = dict(dead.headers())
    assert headers["stage"] == b"ingest"
    assert headers["origin.index"] == b"1"


def test_schema_invalid_records_are_listed_and_dead_lettered(
    client: TestClient, services: Settings, tenant: str, tmp_path: Path
) -> None:
    subject = f"api.typed-{uuid.uuid4().hex[:8]}"
    kind = subject.split(".", 1)[1]
    schema = {
        "type": "record",
        "name": "Typed",
        "fields": [
            {"name": "event_id", "type": "string"},
            {"name": "tenant", "type": "string"},
            {"name": "type", "type": "string"},
            {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "value", "type": "double"},
            {"name": "attributes", "type": {"type": "map", "values": "string"}},
        ],
    }
    _register(subject, schema, tmp_path)
    topics = Topics(services, tenant)
    good = _event(tenant, 1, type=kind, attributes={"sku": "A-1"})
    bad = _event(tenant, 2, type=kind, attributes={"sku": 17})
    answer = client.post("/v1/events", json=[good, bad], headers=_key(services, tenant))
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert (body["accepted"], body["rejected"]) == (1, 1)
    assert body["errors"][0]["index"] == 1
    assert "attributes.sku" in body["errors"][0]["message"]
    (record,) = topics.new_raw(1)
    assert avro.is_framed(record.value())  # enforced subjects travel as Avro
    assert dict(record.headers())["schema.subject"] == subject.encode()
    (dead,) = topics.new_dlq(1)
    assert orjson.loads(dead.value())["event_id"] == "e-2"


def test_every_record_rejected_is_422_and_all_are_dead_lettered(
    client: TestClient, services: Settings, tenant: str
) -> None:
    topics = Topics(services, tenant)
    answer = client.post(
        "/v1/events",
        json=[{"event_id": "x", "tenant": tenant}, {"tenant": tenant}],
        headers=_key(services, tenant),
    )
    assert answer.status_code == 422
    assert answer.json()["rejected"] == 2
    assert len(topics.new_dlq(2)) == 2


@pytest.mark.parametrize(
    ("headers", "status", "words"),
    [
        ({}, 401, "no API key"),
        ({"authorization": "Bearer rl_not-a-key"}, 401, "unknown API key"),
        ({"x-api-key": "x" * 300}, 401, "too long"),
    ],
)
def test_requests_without_a_valid_key_are_refused_whole(
    client: TestClient,
    services: Settings,
    tenant: str,
    headers: dict[str, str],
    status: int,
    words: str,
) -> None:
    topics = Topics(services, tenant)
    answer = client.post("/v1/events", json=[_event(tenant, 1)], headers=headers)
    assert answer.status_code == status
    assert words in answer.json()["error"]
    assert topics.unchanged()


def test_a_revoked_key_is_403(client: TestClient, services: Settings, tenant: str) -> None:
    key = catalog_call(services, lambda c: c.create_key(tenant, "soon revoked"))
    catalog_call(services, lambda c: c.revoke_key(key))
    answer = client.post(
        "/v1/events", json=[_event(tenant, 1)], headers={"authorization": f"Bearer {key}"}
    )
    assert answer.status_code == 403
    assert "revoked" in answer.json()["error"]


def test_another_tenants_events_are_403_and_nothing_is_written(
    client: TestClient, services: Settings, tenant: str
) -> None:
    topics = Topics(services, tenant)
    answer = client.post(
        "/v1/events",
        json=[_event(tenant, 1), _event("someone-else", 2)],
        headers=_key(services, tenant),
    )
    assert answer.status_code == 403
    assert "someone-else" in answer.json()["error"]
    assert topics.unchanged()


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b"[" + b" " * (9 * 1024 * 1024) + b"]", "application/json", 413),
        (b'[{"event_id": "e", ', "application/json", 400),
        (b"", "application/json", 400),
        (b"<events/>", "application/xml", 415),
    ],
)
def test_hostile_bodies_are_refused_whole(
    client: TestClient,
    services: Settings,
    tenant: str,
    content: bytes,
    content_type: str,
    status: int,
) -> None:
    topics = Topics(services, tenant)
    answer = client.post(
        "/v1/events",
        content=content,
        headers={**_key(services, tenant), "content-type": content_type},
    )
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]
    assert topics.unchanged()


# --- webhooks ---------------------------------------------------------------------

GITHUB_MAPPING = {
    "event_id": "sha256:$",
    "type": "const:push",
    "ts": "now",
    "entity": "$.repository.full_name",
}


def _push(n: int) -> bytes:
    return orjson.dumps({"ref": "refs/heads/main", "repository": {"full_name": f"acme/r{n}"}})


def test_with_redis_down_events_and_webhooks_still_flow_and_health_says_so(
    services: Settings, tenant: str
) -> None:
    topics = Topics(services, tenant)
    source = _source(
        services,
        kind="webhook",
        tenant=tenant,
        auth="hmac",
        scheme="github",
        secrets=(signatures.new_secret("github"),),
        mapping=GITHUB_MAPPING,
    )
    dead_redis = _config(services, redis_url="redis://127.0.0.1:9/0")  # nothing listens on 9
    for client in _client(dead_redis):
        answer = client.post("/v1/events", json=[_event(tenant, 1)], headers=_key(services, tenant))
        assert answer.status_code == 202, answer.text
        body = _push(2)
        signed = signatures.sign(
            "github", source.secrets[0], body, now_s=time.time(), delivery_id=str(uuid.uuid4())
        )
        hook = client.post(f"/v1/sources/{source.name}/webhook", content=body, headers=signed)
        assert hook.status_code == 202, hook.text
        health = client.get("/healthz").json()
        assert health["redis"].startswith("unavailable, rate limits and replay ids not enforced")
    assert len(topics.new_raw(2)) == 2


def test_github_signed_webhook_is_accepted_once_and_a_replay_is_not_applied(
    client: TestClient, services: Settings, tenant: str
) -> None:
    source = _source(
        services,
        kind="webhook",
        tenant=tenant,
        auth="hmac",
        scheme="github",
        secrets=(signatures.new_secret("github"),),
        mapping=GITHUB_MAPPING,
    )
    body = _push(1)
    delivery = str(uuid.uuid4())
    headers = signatures.sign(
        "github", source.secrets[0], body, now_s=time.time(), delivery_id=delivery
    )
    topics = Topics(services, tenant)
    url = f"/v1/sources/{source.name}/webhook"
    first = client.post(url, content=body, headers={**headers, "content-type": "application/json"})
    assert first.status_code == 202, first.text
    again = client.post(url, content=body, headers={**headers, "content-type": "application/json"})
    assert again.status_code == 200
    assert again.json()["duplicate"] is True
    (record,) = topics.new_raw(1)
    envelope = orjson.loads(record.value())
    digest = hashlib.sha256(orjson.dumps(orjson.loads(body), option=orjson.OPT_SORT_KEYS))
    assert (envelope["event_id"], envelope["tenant"], envelope["source"]) == (
        digest.hexdigest(),
        tenant,
        source.name,
    )
    assert envelope["entity"] == "acme/r1"
    assert envelope["attributes"]["ref"] == "refs/heads/main"
    assert topics.added() == (1, 0)


@pytest.mark.parametrize("scheme", ["stripe", "standard"])
def test_timestamped_schemes_accept_fresh_and_refuse_stale_deliveries(
    client: TestClient, services: Settings, tenant: str, scheme: str
) -> None:
    mapping = {"event_id": "$.id", "type": "$.type", "ts": "$.created"}
    source = _source(
        services,
        kind="webhook",
        tenant=tenant,
        auth="hmac",
        scheme=scheme,
        secrets=(signatures.new_secret(scheme),),
        mapping=mapping,
    )
    url = f"/v1/sources/{source.name}/webhook"
    topics = Topics(services, tenant)
    body = orjson.dumps({"id": "evt_1", "type": "charge.succeeded", "created": int(NOW)})
    fresh = signatures.sign(scheme, source.secrets[0], body, now_s=time.time(), delivery_id="d1")
    assert client.post(url, content=body, headers=fresh).status_code == 202
    stale_body = orjson.dumps({"id": "evt_2", "type": "charge.succeeded", "created": int(NOW)})
    stale = signatures.sign(
        scheme, source.secrets[0], stale_body, now_s=time.time() - 301, delivery_id="d2"
    )
    answer = client.post(url, content=stale_body, headers=stale)
    assert answer.status_code == 401
    assert answer.json()["reason"] == "stale"
    (record,) = topics.new_raw(1)
    assert orjson.loads(record.value())["event_id"] == "evt_1"
    assert topics.added() == (1, 0)


def test_a_bad_signature_is_401_and_writes_nothing(
    client: TestClient, services: Settings, tenant: str
) -> None:
    source = _source(
        services,
        kind="webhook",
        tenant=tenant,
        auth="hmac",
        scheme="github",
        secrets=(signatures.new_secret("github"),),
        mapping=GITHUB_MAPPING,
    )
    body = _push(2)
    headers = signatures.sign("github", "not-the-secret", body, now_s=time.time(), delivery_id="d")
    topics = Topics(services, tenant)
    answer = client.post(f"/v1/sources/{source.name}/webhook", content=body, headers=headers)
    assert answer.status_code == 401
    assert answer.json()["reason"] == "mismatch"
    tampered = signatures.sign(
        "github", source.secrets[0], body, now_s=time.time(), delivery_id="d"
    )
    answer = client.post(
        f"/v1/sources/{source.name}/webhook", content=body + b" ", headers=tampered
    )
    assert answer.status_code == 401
    assert topics.unchanged()


def test_a_rotated_secret_keeps_the_old_one_working_for_the_grace_period(
    client: TestClient, services: Settings, tenant: str
) -> None:
    old = signatures.new_secret("github")
    source = _source(
        services,
        kind="webhook",
        tenant=tenant,
        auth="hmac",
        scheme="github",
        secrets=(old,),
        mapping=GITHUB_MAPPING,
    )
    new = signatures.new_secret("github")
    catalog_call(services, lambda c: c.rotate_secret(source.name, new, 3600))
    time.sleep(5.5)  # the edge caches sources for 5 s
    url = f"/v1/sources/{source.name}/webhook"
    for number, secret in enumerate((old, new)):
        body = _push(3 + number)  # an identical body would be a replay
        headers = signatures.sign(
            "github", secret, body, now_s=time.time(), delivery_id=str(uuid.uuid4())
        )
        assert client.post(url, content=body, headers=headers).status_code == 202


def test_a_source_with_an_unusable_stored_mapping_is_500_and_writes_nothing(
    client: TestClient, services: Settings, tenant: str
) -> None:
    bad = {"event_id": "$.a[[[", "bogus": "$"}
    with pytest.raises(ConfigurationError, match=r"mapping field 'event_id'"):
        _source(services, kind="webhook", tenant=tenant, mapping=bad)
    name = f"src-{uuid.uuid4().hex[:10]}"  # so written around the catalog, with SQL
    pg(services, "INSERT INTO tenants (id) VALUES ($1) ON CONFLICT DO NOTHING", tenant)
    pg(
        services,
        "INSERT INTO sources (name, kind, tenant, mapping) VALUES ($1, 'webhook', $2, $3::jsonb)",
        name,
        tenant,
        json.dumps(bad),
    )
    topics = Topics(services, tenant)
    url = f"/v1/sources/{name}/webhook"
    answer = client.post(url, json={"tenant": tenant}, headers=_key(services, tenant))
    assert answer.status_code == 500
    assert "rayline sources add" in answer.json()["error"]
    assert topics.unchanged()


def test_unknown_source_is_404(client: TestClient, services: Settings, tenant: str) -> None:
    topics = Topics(services, tenant)
    answer = client.post("/v1/sources/no-such-source/webhook", json={"tenant": tenant})
    assert answer.status_code == 404
    assert "rayline sources add" in answer.json()["error"]
    assert topics.unchanged()


def test_a_keyed_source_refuses_another_tenants_key(
    client: TestClient, services: Settings, tenant: str
) -> None:
    source = _source(
        services,
        kind="webhook",
        tenant=tenant,
        mapping={"event_id": "$.id", "type": "const:ping", "ts": "now"},
    )
    url = f"/v1/sources/{source.name}/webhook"
    topics = Topics(services, tenant)
    answer = client.post(url, json={"id": "p1"}, headers=_key(services, f"{tenant}-other"))
    assert answer.status_code == 403
    assert topics.unchanged()
    answer = client.post(url, json={"id": "p1"}, headers=_key(services, tenant))
    assert answer.status_code == 202, answer.text
    assert orjson.loads(topics.new_raw(1)[0].value())["tenant"] == tenant


def test_a_source_over_its_rate_limit_gets_429_with_retry_after(
    client: TestClient, services: Settings, tenant: str
) -> None:
    source = _source(
        services,
        kind="webhook",
        tenant=tenant,
        events_per_second=0.5,
        burst=3,
        mapping={"event_id": "$.id", "type": "const:ping", "ts": "now"},
    )
    url = f"/v1/sources/{source.name}/webhook"
    key = _key(services, tenant)
    topics = Topics(services, tenant)
    statuses = [client.post(url, json={"id": f"p{n}"}, headers=key).status_code for n in range(4)]
    assert statuses == [202, 202, 202, 429]
    limited = client.post(url, json={"id": "p9"}, headers=key)
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 3
    assert f"source:{source.name}" in limited.json()["error"]
    assert topics.added() == (3, 0)
    too_big = client.post(url, json=[{"id": f"q{n}"} for n in range(4)], headers=key)
    assert too_big.status_code == 413
    assert "split the batch" in too_big.json()["error"]


def test_csv_bodies_are_typed_by_the_sources_schema(
    client: TestClient, services: Settings, tenant: str, tmp_path: Path
) -> None:
    subject = f"csv.typed-{uuid.uuid4().hex[:8]}"
    schema = {
        "type": "record",
        "name": "Row",
        "fields": [
            {"name": "id", "type": "string"},
            {"name": "amount", "type": "double"},
            {"name": "paid", "type": "boolean"},
        ],
    }
    _register(subject, schema, tmp_path)
    source = _source(
        services,
        kind="webhook",
        tenant=tenant,
        schema_subject=subject,
        mapping={"event_id": "$.id", "type": "const:row", "ts": "now", "value": "$.amount"},
    )
    topics = Topics(services, tenant)
    answer = client.post(
        f"/v1/sources/{source.name}/webhook",
        content=f"id,amount,paid\n{tenant}-1,12.5,true\n{tenant}-2,twelve,false\n".encode(),
        headers={**_key(services, tenant), "content-type": "text/csv"},
    )
    assert answer.status_code == 202, answer.text
    assert (answer.json()["accepted"], answer.json()["rejected"]) == (1, 1)
    envelope = orjson.loads(topics.new_raw(1)[0].value())
    assert envelope["value"] == 12.5
    assert envelope["attributes"]["paid"] is True
    (dead,) = topics.new_dlq(1)
    assert b"twelve" in dead.value()


def test_an_avro_body_in_the_wire_format_is_decoded_with_its_registered_schema(
    client: TestClient, services: Settings, tenant: str, tmp_path: Path
) -> None:
    subject = f"api.avro-{uuid.uuid4().hex[:8]}"
    schema = {
        "type": "record",
        "name": "Ev",
        "fields": [
            {"name": "event_id", "type": "string"},
            {"name": "tenant", "type": "string"},
            {"name": "type", "type": "string"},
            {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "value", "type": "double"},
        ],
    }
    _register(subject, schema, tmp_path)
    schema_id = int(
        pg(services, "SELECT schema_id FROM subject_versions WHERE subject = $1", subject)[0][
            "schema_id"
        ]
    )
    record = {
        "event_id": "av-1",
        "tenant": tenant,
        "type": subject.split(".", 1)[1],
        "ts": int(NOW * 1000),
        "value": 2.5,
    }
    body = avro.encode(record, schema_id, fastavro.parse_schema(schema))
    topics = Topics(services, tenant)
    answer = client.post(
        "/v1/events",
        content=body,
        headers={**_key(services, tenant), "content-type": "application/vnd.apache.avro+binary"},
    )
    assert answer.status_code == 202, answer.text
    (stored,) = topics.new_raw(1)
    assert avro.is_framed(stored.value())


# --- backpressure -----------------------------------------------------------------


def test_consumer_lag_over_the_limit_is_503_with_retry_after(
    services: Settings, tenant: str
) -> None:
    group = f"lagging-{uuid.uuid4().hex[:8]}"  # a group that never committed: all is lag
    producer = Producer({"bootstrap.servers": services.kafka.bootstrap})
    producer.produce(services.kafka.raw_topic, b"{}")
    producer.flush(10)
    config = _config(services, consumer_group=group, max_consumer_lag=1, lag_check_s=0.2)
    for client in _client(config):
        key = _key(services, tenant)
        client.post("/v1/events", json=[_event(tenant, 1)], headers=key)  # starts the watch
        deadline = time.monotonic() + 20
        answer = client.post("/v1/events", json=[_event(tenant, 2)], headers=key)
        while answer.status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.3)
            answer = client.post("/v1/events", json=[_event(tenant, 2)], headers=key)
        assert answer.status_code == 503
        assert "behind" in answer.json()["error"]
        assert int(answer.headers["retry-after"]) >= 1


def test_a_full_producer_queue_is_503_and_nothing_half_written(
    services: Settings, tenant: str
) -> None:
    config = _config(services, queue_max_messages=1000, max_events_per_request=5000)
    for client in _client(config):
        topics = Topics(services, tenant)
        events = [_event(tenant, n) for n in range(1001)]
        answer = client.post("/v1/events", json=events, headers=_key(services, tenant))
        assert answer.status_code == 503
        assert int(answer.headers["retry-after"]) >= 1
        assert topics.unchanged()


def test_each_source_reports_its_counts_and_last_success_in_status(
    client: TestClient, services: Settings, tenant: str
) -> None:
    source = _source(
        services,
        kind="webhook",
        tenant=tenant,
        mapping={"event_id": "$.id", "type": "const:ping", "ts": "now"},
    )
    url = f"/v1/sources/{source.name}/webhook"
    key = _key(services, tenant)
    assert client.post(url, json=[{"id": "s1"}, {"id": "s2"}, {}], headers=key).status_code == 202

    def status() -> dict[str, Any]:
        result = rayline("status", "--json")
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout)["sources"].get(source.name, {}))

    row = eventually(status, lambda r: r.get("accepted") == 2, timeout=15)  # written each 1 s
    assert (row["accepted"], row["rejected"]) == (2, 1)
    assert abs(row["last_success_ms"] / 1000 - time.time()) < 60
