"""The deployed query API (`/v1/query`) over HTTP with tenant keys: a tenant reads only its
own rows by every endpoint, SQL-injection attempts through every parameter answer 4xx
and leak nothing, sealed answers come from the Redis cache, health reports the stores.

Each test's events go straight into the stack's ClickHouse through the owner actor, at
event times in the last few minutes: nothing the pipeline or the sealing does with
other tests' events can reach them, and the answers do not depend on sealing (the
unsealed tail is read from raw events).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import ray

from actors.clickhouse_owner import OWNER_NAME
from cluster.settings import Settings
from tests.integration.conftest import api_key
from tests.integration.query_data import MINUTE_MS, Event, events_table, make_events


class Tenant:
    def __init__(self, stack: Settings, name: str, start: int, events: list[Event]) -> None:
        self.name, self.start, self.events = name, start, events
        self.key = api_key(stack, name)
        base = f"http://{stack.serve.host}:{stack.serve.port}/v1/query"
        headers = {"authorization": f"Bearer {self.key}"}
        self.http = httpx.Client(base_url=base, headers=headers, timeout=30)

    def span(self) -> dict[str, str]:
        return {"from": str(self.start / 1000), "to": str((self.start + 6 * MINUTE_MS) / 1000)}


@pytest.fixture(scope="module")
def tenants(stack: Settings) -> Iterator[tuple[Tenant, Tenant]]:
    """Two tenants with five minutes of events each, the same types and regions."""
    start = (int(time.time() * 1000) - 8 * MINUTE_MS) // MINUTE_MS * MINUTE_MS
    names = [f"qa-{uuid.uuid4().hex[:8]}", f"qb-{uuid.uuid4().hex[:8]}"]
    made: list[Tenant] = []
    ray.init(address=stack.ray.address, namespace=stack.ray.namespace, log_to_driver=False)
    try:
        owner = ray.get_actor(OWNER_NAME, namespace=stack.ray.namespace)
        for seed, name in enumerate(names):
            events = make_events([name], start, minutes=5, per_minute=10, seed=seed)
            ray.get(owner.insert_events.remote(events_table(events)))
            made.append(Tenant(stack, name, start, events))
    finally:
        ray.shutdown()
    yield made[0], made[1]
    for t in made:
        t.http.close()


def all_reads(t: Tenant) -> list[tuple[str, str, dict[str, str]]]:
    """One read of every endpoint over the tenants' events."""
    base = {"type": "click", **t.span()}
    return [
        ("GET", "/series", {**base, "group_by": "region", "resolution": "1m"}),
        ("GET", "/series", {**base, "resolution": "raw"}),
        ("GET", "/summary", {**base, "group_by": "region"}),
        ("GET", "/top", {**base, "by": "region", "n": "5"}),
        ("GET", "/events", {**base, "limit": "1000"}),
        ("GET", "/latest/click", t.span()),
    ]


def test_a_tenant_reads_its_own_events_exactly(tenants: tuple[Tenant, Tenant]) -> None:
    a, _b = tenants
    answer = a.http.get("/summary", params={"type": "click", "group_by": "region", **a.span()})
    assert answer.status_code == 200, answer.text
    want = Counter(e.region for e in a.events if e.type == "click")
    assert {g["group"]["region"]: g["count"] for g in answer.json()["groups"]} == dict(want)
    series = a.http.get("/series", params={"type": "view", "resolution": "1m", **a.span()})
    points = series.json()["series"][0]["points"]
    per_minute = Counter(e.ts // MINUTE_MS * MINUTE_MS for e in a.events if e.type == "view")
    assert dict(points) == dict(per_minute)


def test_tenant_a_never_reads_b_by_any_endpoint(tenants: tuple[Tenant, Tenant]) -> None:
    a, b = tenants
    b_ids = {e.event_id for e in b.events}
    for method, path, params in all_reads(b):  # b's own query shapes, with a's key
        answer = a.http.request(method, path, params=params)
        assert answer.status_code == 200, (path, answer.text)
        assert b.name not in answer.text, path
        assert not b_ids & set(answer.text.split('"')), path
        asked = a.http.request(method, path, params={**params, "tenant": b.name})
        assert asked.status_code == 403, (path, asked.text)
        assert set(asked.json()) == {"error"}, "a refusal carries no data"
    for sql in (
        "SELECT tenant, count() FROM events GROUP BY tenant",
        f"SELECT count() FROM events WHERE tenant = '{b.name}'",
        "SELECT DISTINCT tenant FROM window_results",
        "SELECT tenant FROM rollup_1h UNION ALL SELECT tenant FROM windows_1m",
    ):
        answer = a.http.post("/sql", json={"sql": sql})
        assert answer.status_code == 200, (sql, answer.text)
        assert b.name not in answer.text, sql
    assert a.http.post("/sql", json={"sql": "SELECT count() FROM events"}).json()["rows"] == [
        [len(a.events)]
    ]


INJECTIONS = [
    "' OR '1'='1",
    "1); DROP TABLE events; --",
    "click' UNION SELECT tenant, event_id FROM events --",
    "\\' OR 1=1 --",
    "${jndi:ldap://x}",
    "\x00",
]


@pytest.mark.parametrize(
    "param",
    ["type", "from", "to", "resolution", "metric", "group_by", "top", "limit", "cursor",
     "tenant", "where.region' OR '1'='1"],
)  # fmt: skip
@pytest.mark.parametrize("attempt", INJECTIONS)
def test_injection_through_any_parameter_is_4xx_and_leaks_nothing(
    tenants: tuple[Tenant, Tenant], param: str, attempt: str
) -> None:
    a, b = tenants
    for path in ("/series", "/summary", "/events"):
        params = {"type": "click", **a.span(), param: attempt}
        answer = a.http.get(path, params=params)
        assert 400 <= answer.status_code < 500, (path, param, answer.status_code, answer.text)
        assert b.name not in answer.text
        assert "DB::Exception" not in answer.text, "a SQL error reached the caller"


@pytest.mark.parametrize("attempt", INJECTIONS)
def test_a_filter_value_is_data_matching_nothing(
    tenants: tuple[Tenant, Tenant], attempt: str
) -> None:
    """A filter value has no grammar (it is compared to stored values), so an injection
    string there is bound as a value: the answer is empty, never anyone's rows."""
    a, b = tenants
    for path in ("/series", "/summary", "/events"):
        params = {"type": "click", **a.span(), "where.region": attempt}
        answer = a.http.get(path, params=params)
        assert answer.status_code == 200, (path, answer.text)
        body = answer.json()
        assert not body.get("series"), (path, body)
        assert not body.get("events"), (path, body)
        assert all(g["count"] == 0 for g in body.get("groups", [])), body
        assert b.name not in answer.text


def test_no_key_or_a_bad_key_reads_nothing(stack: Settings) -> None:
    base = f"http://{stack.serve.host}:{stack.serve.port}/v1/query"
    with httpx.Client(base_url=base, timeout=30) as anonymous:
        assert anonymous.get("/summary", params={"type": "click"}).status_code == 401
        bad = {"authorization": "Bearer rl_not_a_key"}
        assert anonymous.get("/events", params={"type": "click"}, headers=bad).status_code == 401
        assert anonymous.post("/sql", json={"sql": "SELECT 1"}).status_code == 401


def test_sealed_answers_come_from_the_cache_the_second_time(
    tenants: tuple[Tenant, Tenant], stack: Settings
) -> None:
    a, _b = tenants
    health = a.http.get("/healthz").json()
    sealed = health["sealed_until"]
    assert health == {"clickhouse": "ok", "cache": "ok", "sealed_until": sealed}
    # A range that ends before the sealed point: its answer is final, hence cached.
    params = {"type": "click", "to": sealed, "resolution": "1m", "metric": "p99"}
    first = a.http.get("/series", params=params)
    second = a.http.get("/series", params=params)
    assert first.status_code == second.status_code == 200
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert first.json() == second.json()
    # A range reaching the unsealed tail is never cached.
    live = a.http.get("/series", params={"type": "click", "resolution": "1m", **a.span()})
    assert live.headers["x-cache"] == "bypass"


def test_the_openapi_schema_lists_every_endpoint(tenants: tuple[Tenant, Tenant]) -> None:
    a, _b = tenants
    schema = a.http.get("/openapi.json").json()
    assert set(schema["paths"]) >= {
        "/series", "/summary", "/top", "/events", "/sql", "/latest/{metric_type}", "/healthz",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"SELECT 1", 400, "not JSON"),
        (b"[1, 2]", 422, '{"sql": "SELECT ..."}'),
        (b'{"sql": 5}', 422, '{"sql": "SELECT ..."}'),
        (b'{"query": "SELECT 1"}', 422, '{"sql": "SELECT ..."}'),
        (b'{"sql": "' + b"x" * 70_000 + b'"}', 413, "16 KiB"),
        (b'{"sql": "SELECT ' + b"1," * 9_000 + b'1"}', 400, "more than 16,384"),
    ],
)
def test_a_bad_sql_body_is_refused_with_the_reason(
    tenants: tuple[Tenant, Tenant], body: bytes, status: int, says: str
) -> None:
    a, _b = tenants
    answer = a.http.post("/sql", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert says in answer.json()["error"]
