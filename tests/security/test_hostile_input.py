"""Attacks with hostile input on every edge of the deployed stack.

Before: ``{"ts": 1e306}`` and attributes nested 255 to 1024 levels deep (they parse,
but orjson cannot write them back) answered 500 on ``POST /v1/events``; the same
payloads over MQTT crashed the bridge, which restarted, got the QoS 1 message again
and looped, so MQTT ingest stopped for every tenant; a NUL in an upload id or a source
name reached PostgreSQL, which refuses it (503). Now every edge answers 2xx or 4xx
with a JSON reason, and a record that can never be processed becomes one dead letter.

Each edge gets hostile bodies from hypothesis; after each hostile batch a valid event
(a *canary*) goes in, and the last test checks that every canary was counted (it is
in the raw-event table the workers write), so nothing valid was lost on the way.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
import ray
from confluent_kafka import Producer
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from actors.mqtt_bridge import BRIDGE_NAME
from adapters.kafka import end_offsets
from adapters.sources import Source
from cluster.settings import Settings
from tests.integration.conftest import api_key, catalog_call, eventually, read_from
from tests.integration.test_mqtt import add_device, publish

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TENANT = f"t-hostile-{uuid.uuid4().hex[:8]}"
"""One tenant for the module (``t-*`` tenants are allowed an hour of lateness)."""
CANARIES: list[str] = []
"""Event ids of the valid events sent after hostile ones; each must be counted."""


@pytest.fixture(scope="module")
def key(stack: Settings) -> str:
    return api_key(stack, TENANT, "hostile input")


@pytest.fixture(scope="module")
def client(stack: Settings, key: str) -> Iterator[httpx.Client]:
    base = f"http://{stack.serve.host}:{stack.serve.port}"
    with httpx.Client(
        base_url=base, timeout=60, headers={"authorization": f"Bearer {key}"}
    ) as http:
        yield http


def valid_event(event_id: str, **change: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "tenant": TENANT,
        "type": "canary",
        "ts": time.time() - 5,
        "value": 1,
        "attributes": {"region": "eu"},
        **change,
    }


def send_canary(client: httpx.Client, edge: str) -> None:
    """A valid event right after hostile ones: it must be taken (and, later, counted)."""
    event_id = f"canary-{edge}-{uuid.uuid4().hex[:8]}"
    answer = client.post("/v1/events", json=[valid_event(event_id)])
    assert answer.status_code == 202, answer.text
    assert answer.json()["accepted"] == 1
    CANARIES.append(event_id)


def assert_answered(answer: httpx.Response, what: Any) -> None:
    """2xx or 4xx, never 5xx, and a JSON body that says what happened."""
    assert answer.status_code < 500, (what, answer.status_code, answer.text[:500])
    body = answer.json()
    assert isinstance(body, dict), (what, body)
    if answer.status_code >= 400:
        reason = body.get("error") or body.get("errors") or body.get("detail")
        assert reason, (what, answer.status_code, body)


# Hostile material ------------------------------------------------------------------


def deep(depth: int, opener: bytes = b'{"a":', closer: bytes = b"}") -> bytes:
    return opener * depth + b"1" + closer * depth


HUGE_NUMBERS = [b"1e306", b"-1e306", b"1e999", b"1" * 400, b"18446744073709551616", b"-0"]
LITERALS = [b"NaN", b"Infinity", b"-Infinity", b"null", b"true", b'"\\ud800"', b'"\\u0000"']

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["", "\x00", "\ud800", "a" * 5_000]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=15,
)


def _encode(value: Any) -> bytes:
    # The standard library writes NaN, Infinity and integers of any size, like a sender
    # that does not care; lone surrogates go out as \\ud800 escapes.
    return json.dumps(value).encode()


def _one_field_wrong(field_values: tuple[str, Any]) -> bytes:
    field, value = field_values
    return _encode([{**valid_event("h-" + uuid.uuid4().hex[:6]), field: value}])


def _raw_field(field_raw: tuple[str, bytes]) -> bytes:
    field, raw = field_raw
    event = orjson.dumps({**valid_event("h-" + uuid.uuid4().hex[:6]), field: 0})
    return b"[" + event.replace(f'"{field}":0'.encode(), f'"{field}":'.encode() + raw) + b"]"


fields = st.sampled_from(
    ["event_id", "tenant", "type", "ts", "source", "entity", "value", "attributes", "extra"]
)
hostile_bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(_one_field_wrong, st.tuples(fields, json_values)),
    st.builds(
        _raw_field,
        st.tuples(
            fields,
            st.sampled_from(HUGE_NUMBERS + LITERALS)
            | st.integers(1, 1_100).map(deep)
            | st.integers(1, 1_100).map(lambda n: deep(n, b"[", b"]")),
        ),
    ),
    # truncated, duplicated and oversized documents
    st.integers(0, 150).map(lambda n: orjson.dumps([valid_event("trunc")])[:n]),
    st.just(b'[{"event_id":"d","event_id":"e","tenant":"x"}]'),
    st.just(b'[{"' + b"k" * 100_000 + b'":1}]'),
    st.just(_encode([valid_event("big", attributes={"blob": "x" * 600_000})])),
)
content_types = st.sampled_from(
    ["application/json", "application/x-ndjson", "text/csv", "text/plain", "image/png", ""]
)


# The edges -------------------------------------------------------------------------


def test_the_reported_payloads_are_4xx_with_the_field(client: httpx.Client) -> None:
    overflow = client.post("/v1/events", json=[valid_event("of", ts=1e306)])
    assert overflow.status_code == 422, overflow.text
    assert overflow.json()["errors"][0]["field"] == "ts"
    nested = b'[{"event_id":"n","type":"c","ts":1790000000,"attributes":' + deep(300) + b"}]"
    answer = client.post("/v1/events", content=nested)
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"][0] == {
        "index": 0,
        "field": "attributes",
        "message": "nest more than 64 levels deep; flatten them",
    }
    send_canary(client, "reported")


@FUZZ
@given(body=hostile_bodies, content_type=content_types, batch=st.booleans())
def test_events_edge_answers_hostile_bodies_with_4xx(
    client: httpx.Client, body: bytes, content_type: str, batch: bool
) -> None:
    if not batch and body.startswith(b"[") and body.endswith(b"]"):
        body = body[1:-1]  # a single event instead of an array
    answer = client.post("/v1/events", content=body, headers={"content-type": content_type})
    assert_answered(answer, (body[:200], content_type))


def test_after_the_events_fuzz_a_valid_event_is_taken(client: httpx.Client) -> None:
    send_canary(client, "events")


@pytest.fixture(scope="module")
def webhook_source(stack: Settings) -> str:
    name = f"hook-{uuid.uuid4().hex[:8]}"
    mapping = {"event_id": "$.id", "type": "$.type", "ts": "$.created", "value": "$.amount"}
    source = Source(name=name, kind="webhook", tenant=TENANT, mapping=mapping)
    catalog_call(stack, lambda c: c.add_source(source))
    return name


webhook_payloads = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda id_, type_, created, amount: _encode(
            {"id": id_, "type": type_, "created": created, "amount": amount}
        ),
        json_values,
        json_values,
        json_values | st.sampled_from([1e306, 10**30, "9999-12-31T00:00:00Z"]),
        json_values,
    ),
    st.integers(1, 1_100).map(
        lambda n: b'{"id":"x","type":"t","created":1790000000,"d":' + deep(n) + b"}"
    ),
)


@FUZZ
@given(payload=webhook_payloads, name=st.sampled_from(["", "\x00", "a/b", "..", "x" * 300]))
def test_webhook_edge_answers_hostile_payloads_and_names_with_4xx(
    client: httpx.Client, webhook_source: str, payload: bytes, name: str
) -> None:
    answer = client.post(f"/v1/sources/{webhook_source}/webhook", content=payload)
    assert_answered(answer, payload[:200])
    hostile = client.post(f"/v1/sources/{quote(name, safe='')}x/webhook", content=payload)
    assert_answered(hostile, name)
    assert hostile.status_code == 404


def test_after_the_webhook_fuzz_a_valid_event_is_taken(client: httpx.Client) -> None:
    send_canary(client, "webhook")


hostile_text = st.text(max_size=40) | st.sampled_from(
    ["\x00", "%00", "../../etc/passwd", "a" * 10_000, "1e306", "-1", "NaN", "' OR 1=1 --"]
)


@FUZZ
@given(upload_id=hostile_text, source=hostile_text, filename=hostile_text)
def test_uploads_edge_answers_hostile_ids_and_parameters_with_4xx(
    client: httpx.Client, upload_id: str, source: str, filename: str
) -> None:
    assume(upload_id not in (".", ".."))  # the client resolves dot segments away
    status = client.get(f"/v1/uploads/{quote(upload_id, safe='')}")
    assert_answered(status, upload_id)
    assert status.status_code in (404, 405, 400), status.text
    posted = client.post(
        "/v1/uploads",
        params={"source": source, "filename": filename},
        content=b"a,b\n1,2\n",
        headers={"content-type": "text/csv"},
    )
    assert_answered(posted, (source, filename))
    assert posted.status_code >= 400  # no upload source of this tenant has that name


QUERY_PARAMS = ["type", "from", "to", "resolution", "metric", "group_by", "by", "n", "limit",
                "cursor", "tenant", "where.region"]  # fmt: skip


@FUZZ
@given(
    path=st.sampled_from(["/series", "/summary", "/top", "/events", "/latest/canary"]),
    values=st.dictionaries(st.sampled_from(QUERY_PARAMS), hostile_text, max_size=4),
    metric_type=hostile_text,
)
def test_query_parameters_answer_4xx(
    client: httpx.Client, path: str, values: dict[str, str], metric_type: str
) -> None:
    assume(metric_type not in (".", ".."))
    params = {"type": "canary", "from": str(time.time() - 600), **values}
    answer = client.get("/v1/query" + path, params=params)
    assert_answered(answer, (path, values))
    latest = client.get(f"/v1/query/latest/{quote(metric_type, safe='')}", params=values)
    assert_answered(latest, (metric_type, values))


def rule(**change: Any) -> dict[str, Any]:
    return {
        "id": f"r-{uuid.uuid4().hex[:8]}",
        "type": "canary",
        "window": "1m",
        "metric": "count",
        "condition": {"kind": "threshold", "op": ">", "value": 1},
        "severity": "error",
        **change,
    }


rule_fields = st.sampled_from(
    ["id", "type", "window", "metric", "condition", "severity", "tenant", "enabled", "for"]
)


@FUZZ
@given(
    field_value=st.tuples(rule_fields, json_values | st.sampled_from([1e306, 10**30])),
    silence=st.dictionaries(
        st.sampled_from(["starts_at", "ends_at", "duration_minutes", "rule_id", "comment"]),
        json_values | st.sampled_from([10**18, 1e306, "9999-12-31T23:59:59Z", "\x00"]),
        max_size=4,
    ),
    path_id=hostile_text,
)
def test_alerting_api_answers_hostile_bodies_with_4xx(
    client: httpx.Client, field_value: tuple[str, Any], silence: dict[str, Any], path_id: str
) -> None:
    # "" would be the list route, which redirects /rules/ to /rules (no body)
    assume(path_id not in ("", ".", ".."))
    field, value = field_value
    body = _encode(rule(**{field: value}))
    made = client.post("/v1/alerts/rules", content=body)
    assert_answered(made, body[:300])
    if made.status_code == 201:
        client.delete(f"/v1/alerts/rules/{quote(made.json()['id'], safe='')}")
    silenced = client.post("/v1/alerts/silences", content=_encode(silence))
    assert_answered(silenced, silence)
    for path in ("/v1/alerts/rules/", "/v1/alerts/incidents/"):
        answer = client.get(path + quote(path_id, safe=""))
        assert_answered(answer, (path, path_id))


def test_after_the_api_fuzz_a_valid_event_is_taken(client: httpx.Client) -> None:
    send_canary(client, "apis")


# Records behind the edges: MQTT and a raw Kafka record ------------------------------


def dead_letters(settings: Settings, start: dict[int, int], marker: bytes) -> list[Any]:
    records = read_from(settings, settings.kafka.dlq_topic, start, 100_000, timeout=5)
    return [r for r in records if marker in (r.value() or b"")]


def bridge_status(stack: Settings) -> dict[str, Any]:
    ray.init(address=stack.ray.address, namespace=stack.ray.namespace, log_to_driver=False)
    try:
        actor = ray.get_actor(BRIDGE_NAME, namespace=stack.ray.namespace)
        ref: Any = actor.status.remote()
        return dict(ray.get(ref, timeout=60))
    finally:
        ray.shutdown()


def test_mqtt_poison_is_dead_lettered_once_and_valid_messages_keep_flowing(
    stack: Settings,
) -> None:
    device = add_device(TENANT)
    marker = uuid.uuid4().hex
    poison = [
        b'{"m":"' + marker.encode() + b'-ts","ts":1e306}',
        b'{"m":"' + marker.encode() + b'-value","value":1e300,"ts":1e306}',
        b'{"m":"' + marker.encode() + b'-deep","x":' + deep(300) + b"}",
        b'{"m":"' + marker.encode() + b'-deeper","x":' + deep(1_100) + b"}",
        b'{"m":"' + marker.encode() + b'-big","ts":' + b"9" * 400 + b"}",
        b'{"m":"' + marker.encode() + b'-nan","ts":NaN}',
        b"not json " + marker.encode(),
    ]
    before = bridge_status(stack)
    start = end_offsets(stack.kafka.bootstrap, stack.kafka.dlq_topic)
    good = [f"mqtt-{marker}-{i}" for i in range(5)]
    publish(stack, device, poison)
    publish(stack, device, [{"event_id": i, "type": "canary", "value": 1} for i in good])
    CANARIES.extend(good)
    eventually(
        lambda: dead_letters(stack, start, marker.encode()),
        lambda records: len(records) >= len(poison),
        timeout=60,
    )
    time.sleep(5)  # a looping bridge would send them again meanwhile
    found = dead_letters(stack, start, marker.encode())
    assert sorted(r.value() for r in found) == sorted(poison), "each poison once, no more"
    for record in found:
        headers = dict(record.headers())
        assert headers["stage"] == b"mqtt"
        assert headers["origin.device"] == device.id.encode()
        assert headers["reason"]
    after = bridge_status(stack)
    assert after["restarts"] == before["restarts"], after
    assert after["running"], after


def test_a_poison_record_in_the_raw_topic_is_dead_lettered_once(stack: Settings) -> None:
    marker = uuid.uuid4().hex.encode()
    key = f"{TENANT}:poison".encode()
    now_ms = int(time.time() * 1000)
    envelope = {"event_id": "p", "tenant": TENANT, "type": "canary", "source": "api"}

    def record(**change: Any) -> bytes:
        return orjson.dumps({**envelope, "ts": now_ms, "value": 1, "m": marker.decode(), **change})

    poison = [
        b"not json " + marker,
        record(ts=1e306),
        record(ts=2**64 - 1),
        record(ts=9 * 10**18),
        record(value=1e300),
        record(source=5),  # was an ArrowTypeError that restarted the worker's loop forever
        b'{"m":"' + marker + b'","x":' + deep(1_100) + b"}",
        b'{"m":"' + marker + b'","ts":NaN}',
    ]
    good = f"raw-{marker.decode()}"
    start = end_offsets(stack.kafka.bootstrap, stack.kafka.dlq_topic)
    producer = Producer({"bootstrap.servers": stack.kafka.bootstrap})
    for value in [*poison, record(event_id=good)]:
        producer.produce(stack.kafka.raw_topic, value, key)  # one partition: the same key
    assert producer.flush(30) == 0
    CANARIES.append(good)
    eventually(
        lambda: dead_letters(stack, start, marker),
        lambda records: len(records) >= len(poison),
        timeout=90,
    )
    time.sleep(5)
    found = dead_letters(stack, start, marker)
    assert sorted(r.value() for r in found) == sorted(poison)
    assert {dict(r.headers())["stage"] for r in found} == {b"process"}


def test_every_valid_event_sent_between_hostile_ones_was_counted(
    stack: Settings, client: httpx.Client
) -> None:
    assert CANARIES, "the canaries are sent by the tests above"
    span = {"type": "canary", "from": str(time.time() - 3_600), "limit": "1000"}

    def counted() -> set[str]:
        answer = client.get("/v1/query/events", params=span)
        assert answer.status_code == 200, answer.text
        return {e["event_id"] for e in answer.json()["events"]}

    seen = eventually(counted, lambda ids: set(CANARIES) <= ids, timeout=120)
    assert set(CANARIES) <= seen
