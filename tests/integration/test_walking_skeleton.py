"""One batch travels the whole way: HTTP -> Kafka -> PartitionWorker -> ClickHouse -> query."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from confluent_kafka import Producer

from adapters.kafka import end_offsets
from cluster.settings import Settings
from tests.integration.conftest import eventually, raw_offsets, read_from

# Event times half an hour back, on a minute boundary: on time for the test stack's
# allowed lateness of an hour (see conftest), so the windows are open and read live.
BASE_MS = (int(time.time()) // 60 * 60 - 1800) * 1000
RANGE = {"from": str(BASE_MS / 1000 - 3600), "to": str(BASE_MS / 1000 + 3600)}


def at(seconds: float, offset: str = "Z") -> str:
    """RFC 3339 time ``seconds`` after BASE_MS, written with the given offset."""
    moment = datetime.fromtimestamp(BASE_MS / 1000 + seconds, tz=UTC)
    if offset == "+01:00":
        return (moment + timedelta(hours=1)).isoformat().replace("+00:00", "+01:00")
    return moment.isoformat().replace("+00:00", "Z")


def window(seconds: int, count: int, total: float) -> dict[str, Any]:
    return {"start": at(seconds), "count": count, "sum": total}


def shape(windows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"start": w["start"], "count": w["count"], "sum": w["sum"]} for w in windows]


def event(tenant: str, n: int, type_: str, ts: str, value: float, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": f"e-{n}",
        "tenant": tenant,
        "type": type_,
        "ts": ts,
        "value": value,
        **extra,
    }


def metric(http: httpx.Client, tenant: str, type_: str) -> dict[str, Any]:
    answer = http.get(f"/v1/query/latest/{type_}", params={"tenant": tenant, **RANGE})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_events_travel_from_http_to_query(http: httpx.Client, tenant: str) -> None:
    batch = [
        event(tenant, 1, "click", at(1), 1),
        event(tenant, 2, "click", at(30.5), 2),
        event(tenant, 3, "click", at(59.999), 3),
        event(tenant, 4, "click", at(60), 10),
        event(tenant, 5, "click", at(61, "+01:00"), 20),
        event(tenant, 6, "view", at(10), 7, entity="page-1"),
    ]
    answer = http.post("/v1/events", json=batch)
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"accepted": 6, "rejected": 0}

    clicks = eventually(lambda: metric(http, tenant, "click"), lambda m: m["total"]["count"] >= 5)
    assert shape(clicks["windows"]) == [window(0, 3, 6.0), window(60, 2, 30.0)]
    first = clicks["windows"][0]
    assert (first["min"], first["max"], first["avg"], first["open"]) == (1, 3, 2.0, True)
    assert clicks["total"] == {"count": 5, "sum": 36.0}
    views = eventually(lambda: metric(http, tenant, "view"), lambda m: m["total"]["count"] >= 1)
    assert shape(views["windows"]) == [window(0, 1, 7.0)]
    # Another tenant's query sees none of it.
    assert metric(http, tenant + "x", "click")["total"] == {"count": 0, "sum": 0}


def test_kafka_record_carries_key_envelope_and_trace(
    http: httpx.Client, stack: Settings, tenant: str
) -> None:
    before = raw_offsets(stack)
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    answer = http.post(
        "/v1/events",
        json=[event(tenant, 1, "click", at(0), 4, entity="dev-9")],
        headers={"traceparent": trace},
    )
    assert answer.status_code == 202, answer.text
    (record,) = read_from(stack, stack.kafka.raw_topic, before, 1)
    assert record.key() == f"{tenant}:dev-9".encode()
    headers = dict(record.headers())
    assert headers["traceparent"] == trace.encode()
    assert headers["schema"] == b"rayline.envelope/v1"
    envelope = orjson.loads(record.value())
    assert envelope["ts"] == BASE_MS
    assert envelope["source"] == "api"
    assert envelope["received_at"] > envelope["ts"]


def test_malformed_json_is_400_and_writes_nothing(
    http: httpx.Client, stack: Settings, tenant: str
) -> None:
    before = raw_offsets(stack)
    good = orjson.dumps([event(tenant, 1, "click", at(0), 1)])
    answer = http.post(
        "/v1/events", content=good[:-2], headers={"content-type": "application/json"}
    )
    assert answer.status_code == 400
    assert answer.json()["error"].startswith("body is not a JSON document: ")
    assert "line 1 column" in answer.json()["error"]
    assert raw_offsets(stack) == before


def test_invalid_events_are_listed_each_dead_lettered_and_the_rest_written(
    http: httpx.Client, stack: Settings, tenant: str
) -> None:
    before = raw_offsets(stack)
    dlq_before = end_offsets(stack.kafka.bootstrap, stack.kafka.dlq_topic)
    batch = [
        event(tenant, 1, "click", at(0), 1),
        {"event_id": "e-2", "tenant": tenant, "ts": at(0)},
        event(tenant, 3, "click", "yesterday", "12,5"),  # type: ignore[arg-type]
    ]
    answer = http.post("/v1/events", json=batch)
    assert answer.status_code == 202
    body = answer.json()
    assert (body["accepted"], body["rejected"]) == (1, 2)
    assert [(e["index"], e["field"]) for e in body["errors"]] == [
        (1, "type"),
        (2, "ts"),
        (2, "value"),
    ]
    assert sum(raw_offsets(stack).values()) == sum(before.values()) + 1
    dead = read_from(stack, stack.kafka.dlq_topic, dlq_before, 2)
    assert sorted(orjson.loads(d.value())["event_id"] for d in dead) == ["e-2", "e-3"]
    clicks = eventually(lambda: metric(http, tenant, "click"), lambda m: m["total"]["count"] >= 1)
    assert clicks["total"]["count"] == 1


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (b"[" + b" " * (9 * 1024 * 1024) + b"]", "application/json", 413, "over the limit"),
        (b'{"not": "an array"}', "application/json", 422, "rejected"),
        (b"<events/>", "application/xml", 415, "application/json"),
        (b"", "application/json", 400, "not a JSON document"),
        (b"[1e999]", "application/json", 400, "not a JSON document"),
        (b'[{"event_id": "\xff\xfe"}]', "application/json", 400, "not a JSON document"),
    ],
)
def test_hostile_bodies_are_refused_and_write_nothing(
    http: httpx.Client, stack: Settings, body: bytes, content_type: str, status: int, message: str
) -> None:
    before = raw_offsets(stack)
    answer = http.post("/v1/events", content=body, headers={"content-type": content_type})
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]
    assert raw_offsets(stack) == before


def test_too_many_events_in_one_request_is_413(http: httpx.Client, stack: Settings) -> None:
    limit = stack.serve.max_events_per_request
    answer = http.post(
        "/v1/events",
        content=b"[" + b",".join([b"{}"] * (limit + 1)) + b"]",
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 413
    assert f"the limit is {limit}" in answer.json()["error"]


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/v1/query/latest/click", {"tenant": "a' OR '1'='1"}, "tenant"),
        ("/v1/query/latest/click", {"tenant": "acme", "window": "7m' --"}, "window"),
        ("/v1/query/latest/click;DROP TABLE x", {"tenant": "acme"}, "type"),
        ("/v1/query/latest/click", {"tenant": "acme", "from": "1) OR (1=1"}, "from"),
        ("/v1/query/latest/click", {"tenant": "acme", "to": "2026-13-45T00:00:00Z"}, "to"),
        (
            "/v1/query/latest/click",
            {"tenant": "acme", "from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
            "from",
        ),
    ],
)
def test_query_rejects_bad_parameters(
    http: httpx.Client, path: str, params: dict[str, str], field: str
) -> None:
    answer = http.get(path, params=params)
    assert answer.status_code == 422, answer.text
    assert [e["field"] for e in answer.json()["errors"]] == [field]


def test_query_without_tenant_is_422(http: httpx.Client) -> None:
    assert http.get("/v1/query/latest/click").status_code == 422


def test_a_record_no_envelope_goes_to_the_dlq_and_the_worker_goes_on(
    http: httpx.Client, stack: Settings, tenant: str
) -> None:
    k = stack.kafka
    dlq_before = end_offsets(k.bootstrap, k.dlq_topic)
    raw_before = raw_offsets(stack)
    producer = Producer({"bootstrap.servers": k.bootstrap})
    producer.produce(k.raw_topic, b"not json{\x00", b"hostile", partition=3)
    producer.produce(
        k.raw_topic, orjson.dumps({"event_id": "h", "tenant": tenant, "type": "x"}), partition=3
    )
    # Avro in the Confluent wire format, naming a schema id nobody registered
    producer.produce(k.raw_topic, b"\x00\x00\x0f\x42\x40\x02ab", partition=3)
    assert producer.flush(10) == 0

    records = read_from(stack, k.dlq_topic, dlq_before, 3)
    assert len(records) == 3
    reasons = [dict(r.headers()) for r in records]
    assert reasons[0]["reason"].startswith(b"not JSON")
    assert b"'ts'" in reasons[1]["reason"]
    assert b"unknown schema id 1000000" in reasons[2]["reason"]
    offsets = [raw_before[3] + i for i in range(3)]
    for headers, offset in zip(reasons, offsets, strict=True):
        assert headers["stage"] == b"process"
        assert headers["origin.topic"] == k.raw_topic.encode()
        assert headers["origin.partition"] == b"3"
        assert headers["origin.offset"] == str(offset).encode()
    assert records[0].value() == b"not json{\x00"

    answer = http.post("/v1/events", json=[event(tenant, 1, "click", at(0), 5)])
    assert answer.status_code == 202
    after = eventually(lambda: metric(http, tenant, "click"), lambda m: m["total"]["count"] >= 1)
    assert after["total"] == {"count": 1, "sum": 5.0}
