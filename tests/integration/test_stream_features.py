"""Enrichment, group-by, sketches, transforms, live tiles, CEP rules, schemas and Avro
on the real stack (the test stack enriches from `dim_devices`, groups by `site` and
filters out `debug` events; see conftest)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml
from confluent_kafka import Producer

from adapters.kafka import end_offsets
from adapters.redis import LiveTiles
from cluster.settings import Settings
from core.avro import encode, parse_schema_text
from tests.integration.conftest import eventually, pg, rayline, read_from


def minute_now() -> int:
    return int(time.time()) // 60 * 60


def post(http: httpx.Client, events: list[dict[str, Any]]) -> None:
    answer = http.post("/v1/events", json=events)
    assert answer.status_code == 202, answer.text


def metric(http: httpx.Client, tenant: str, type_: str, **params: Any) -> dict[str, Any]:
    now = time.time()
    query = {"tenant": tenant, "from": now - 3 * 3600, "to": now + 3600, **params}
    answer = http.get(f"/v1/query/latest/{type_}", params=query)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def ev(
    tenant: str, eid: str, type_: str, ts: float, entity: str, value: float = 1
) -> dict[str, Any]:
    return {"event_id": eid, "tenant": tenant, "type": type_, "ts": ts, "entity": entity,
            "value": value}  # fmt: skip


def test_enrichment_splits_windows_by_site_and_follows_changes(
    http: httpx.Client, stack: Settings, tenant: str
) -> None:
    d = [f"{tenant}-d{i}" for i in range(4)]
    pg(stack, "INSERT INTO dim_devices VALUES ($1, 'paris'), ($2, 'paris'), ($3, 'lyon')", *d[:3])
    time.sleep(2.5)  # workers check the dimension once a second in the test stack
    t = minute_now() - 1500
    events = [ev(tenant, f"a{i}", "click", t + i, d[i % 2], value=i % 4 + 1) for i in range(8)]
    events += [ev(tenant, f"b{i}", "click", t + i, d[2], value=10) for i in range(2)]
    events += [ev(tenant, f"c{i}", "click", t + i, d[3], value=5) for i in range(2)]
    events += [ev(tenant, f"x{i}", "debug", t + i, d[0]) for i in range(3)]  # filtered out
    post(http, events)

    body = eventually(lambda: metric(http, tenant, "click"), lambda m: m["total"]["count"] >= 12)
    sites = {w["group"]["site"]: w for w in body["windows"]}
    assert {s: (w["count"], w["sum"]) for s, w in sites.items()} == {
        "paris": (8, 20.0),
        "lyon": (2, 20.0),
        "": (2, 10.0),  # no row in the dimension: enriched with nothing
    }
    paris = sites["paris"]
    assert paris["distinct"] == 2  # two devices
    assert abs(paris["quantiles"]["p50"] - 2.0) <= 0.02  # values 1..4 twice: median 2
    assert abs(paris["quantiles"]["p99"] - 4.0) <= 0.04
    assert metric(http, tenant, "debug")["total"]["count"] == 0

    # Live tiles: the open windows of every partition, in Redis (written after each
    # batch's sinks, so a moment after the query sees them).
    tiles = LiveTiles(stack.redis.url(), stack.kafka.raw_topic)

    def tiled() -> int:
        return sum(
            tile["count"]
            for p in range(stack.kafka.raw_partitions)
            for name, tile in tiles.read(p).items()
            if name.startswith(f"1m|{tenant}|click|")
        )

    try:
        assert eventually(tiled, lambda n: n >= 12, timeout=20) == 12
    finally:
        tiles.close()

    # A changed dimension row applies to the events that come after it.
    pg(stack, "UPDATE dim_devices SET site = 'nice' WHERE device = $1", d[2])
    time.sleep(2.5)
    post(http, [ev(tenant, f"n{i}", "click", t + 120 + i, d[2], value=1) for i in range(3)])
    later = eventually(lambda: metric(http, tenant, "click"), lambda m: m["total"]["count"] >= 15)
    groups = {(w["start"], w["group"]["site"]): w["count"] for w in later["windows"]}
    assert sorted(groups.values()) == [2, 2, 3, 8]
    assert [site for (_start, site), n in groups.items() if n == 3] == ["nice"]


def test_cep_rules_load_at_run_time_and_raise_alerts(
    http: httpx.Client, stack: Settings, live_tenant: str, tmp_path: Path
) -> None:
    # The default lateness (5 s): the rules' matches become final about half a minute
    # after these events, when the tenant's watermark has passed every deadline.
    tenant = live_tenant
    rules: list[dict[str, Any]] = [
        {"id": f"{tenant}-buys", "kind": "threshold", "tenant": tenant, "type": "purchase",
         "window": "10s", "agg": "count", "op": ">=", "value": 3},
        {"id": f"{tenant}-retry", "kind": "sequence", "tenant": tenant,
         "first": "login_failed", "then": "login_ok", "within": "30s"},
        {"id": f"{tenant}-silent", "kind": "absence", "tenant": tenant, "type": "heartbeat",
         "within": "10s"},
    ]  # fmt: skip
    file = tmp_path / "rules.yaml"
    file.write_text(yaml.safe_dump({"rules": rules}))
    result = rayline("rules", "apply", str(file))
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([{"id": "x", "kind": "threshold", "within": "soon"}]))
    refused = rayline("rules", "apply", str(bad))
    assert refused.returncode == 2
    assert "rule 'x'" in refused.stderr
    time.sleep(2.5)  # workers reload rules once a second in the test stack

    alerts_before = end_offsets(stack.kafka.bootstrap, stack.kafka.alerts_topic)
    b = -(-time.time() // 10) * 10  # the next 10 s boundary: one threshold window
    u1, u2, u3 = (f"{tenant}-u{i}" for i in range(3))
    post(
        http,
        [ev(tenant, f"p{i}", "purchase", b + 0.1 + i / 10, u1) for i in range(3)]
        + [ev(tenant, "p9", "purchase", b + 0.5, u2)]
        + [ev(tenant, "f1", "login_failed", b + 1, u1), ev(tenant, "o1", "login_ok", b + 2, u1)]
        + [ev(tenant, "o2", "login_ok", b + 2, u2)]
        + [ev(tenant, "h1", "heartbeat", b + 0.5, u3)],
    )
    records = read_from(stack, stack.kafka.alerts_topic, alerts_before, 3, timeout=120)
    alerts = {a["rule_id"]: a for a in (orjson.loads(r.value()) for r in records)}
    assert set(alerts) == {f"{tenant}-buys", f"{tenant}-retry", f"{tenant}-silent"}, rayline(
        "status", "--json"
    ).stdout
    assert sorted(alerts[f"{tenant}-buys"]["event_ids"]) == ["p0", "p1", "p2"]
    assert alerts[f"{tenant}-buys"]["key"] == u1
    assert alerts[f"{tenant}-retry"]["event_ids"] == ["f1", "o1"]
    assert alerts[f"{tenant}-silent"]["event_ids"] == ["h1"]
    assert {r.key().decode() for r in records} == {a["alert_id"] for a in alerts.values()}

    for rule in rules:
        assert rayline("rules", "delete", str(rule["id"])).returncode == 0


READING = {
    "type": "record",
    "name": "Reading",
    "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "tenant", "type": "string"},
        {"name": "type", "type": "string"},
        {"name": "source", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "entity", "type": "string"},
        {"name": "value", "type": "double"},
        {"name": "unit", "type": {"type": "enum", "name": "Unit", "symbols": ["C", "F"]}},
    ],
}


def test_registered_schemas_are_enforced_and_avro_records_count(
    http: httpx.Client, stack: Settings, tenant: str, tmp_path: Path
) -> None:
    source = f"sensors-{tenant}"
    schema = tmp_path / "reading.avsc"
    schema.write_text(orjson.dumps(READING).decode())
    result = rayline("schemas", "register", str(schema), "--source", source, "--type", "reading")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "version 1" in result.stdout
    schema_id = int(result.stdout.split("schema id")[1].split()[0])
    again = rayline("schemas", "register", str(schema), "--source", source, "--type", "reading")
    assert f"version 1, schema id {schema_id}" in again.stdout  # the same schema: no-op
    time.sleep(2.5)  # workers reload schemas once a second in the test stack

    t = (minute_now() - 900) * 1000
    dlq_before = end_offsets(stack.kafka.bootstrap, stack.kafka.dlq_topic)
    good = {"event_id": "j1", "tenant": tenant, "type": "reading", "source": source,
            "ts": t // 1000, "entity": "s1", "value": 21.5,
            "attributes": {"unit": "C"}}  # fmt: skip
    bad = dict(good, event_id="j2", attributes={"unit": "kelvin"})
    post(http, [good, bad])
    producer = Producer({"bootstrap.servers": stack.kafka.bootstrap})
    record = {"event_id": "a1", "tenant": tenant, "type": "reading", "source": source,
              "ts": t + 1000, "entity": "s1", "value": 22.5, "unit": "F"}  # fmt: skip
    value = encode(record, schema_id, parse_schema_text(orjson.dumps(READING).decode()))
    producer.produce(stack.kafka.raw_topic, value, f"{tenant}:s1".encode())
    assert producer.flush(10) == 0

    body = eventually(lambda: metric(http, tenant, "reading"), lambda m: m["total"]["count"] >= 2)
    assert body["total"] == {"count": 2, "sum": 44.0}  # j1 (JSON) and a1 (Avro)
    (letter,) = read_from(stack, stack.kafka.dlq_topic, dlq_before, 1)
    reason = dict(letter.headers())["reason"].decode()
    assert reason.startswith(f"schema '{source}.reading'")
    assert dict(letter.headers())["stage"] == b"ingest"  # refused at the edge
    assert "attributes.unit" in reason
    assert "kelvin" in reason
    assert orjson.loads(letter.value())["event_id"] == "j2"
