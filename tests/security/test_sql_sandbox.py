"""Attacks on ``POST /v1/query/sql`` over HTTP with a tenant's key, against the running
stack: every attack class of issue 12 (item 1) answers 400 with the reason and leaks
nothing, while ordinary SELECTs still answer and see only the caller's rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.clickhouse_owner import OWNER_NAME
from cluster.settings import Settings
from tests.integration.test_query_api import Tenant, tenants

__all__ = ["tenants"]  # the fixture, shared with the query API tests

ATTACKS = [
    ("1) UNION ALL SELECT name FROM system.tables --", "could not be parsed"),
    ("SELECT 1) UNION ALL SELECT name, engine FROM system.tables --", "could not be parsed"),
    ("SELECT 1; DROP TABLE events", "exactly one statement"),
    ("DROP TABLE events", "only a SELECT"),
    ("SELECT * FROM events INTO /**/ OUTFILE '/tmp/rayline-leak'", "could not be parsed"),
    ("SELECT * FROM events FORMAT JSONEachRow", "FORMAT"),
    ("SELECT tenant FROM events SETTINGS additional_table_filters = {}", "SETTINGS"),
    ("SELECT count() FROM events SETTINGS readonly = 0", "SETTINGS"),
    ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "file"),
    ("SELECT * FROM url('http://127.0.0.1:1/x', CSV, 'a String')", "url"),
    ("SELECT * FROM postgresql('127.0.0.1:5432', 'postgres', 'x', 'postgres', '')", "postgresql"),
    ("SELECT * FROM s3('http://127.0.0.1:1/b/k', 'CSV')", "s3"),
    ("SELECT * FROM executable('id', 'LineAsString', 'a String')", "executable"),
    ("SELECT * FROM remote('127.0.0.1', system.users)", "remote"),
    ("SELECT * FROM numbers(10)", "numbers"),
    ("SELECT name FROM system.tables", "system.tables"),
    ("SELECT * FROM events JOIN system.users AS u ON 1 = 1", "system.users"),
    ("SELECT entity FROM events WHERE entity IN (SELECT name FROM system.tables)", "system"),
    ("WITH t AS (SELECT * FROM file('/etc/passwd')) SELECT * FROM t", "file"),
    ("SELECT dictGet('d', 'a', toUInt64(1)) FROM events", "dictGet"),
    ("SELECT joinGet('j', 'v', 1) FROM events", "joinGet"),
    ("SELECT getSetting('readonly')", "getSetting"),
    ("SELECT entity FROM events WHERE tenant IN system.users", "names a table"),
    ("SELECT " + "(" * 500 + "1" + ")" * 500, "deep"),
]


@pytest.fixture(scope="module")
def platform(stack: Settings) -> list[str]:
    """The tables the attacks aim at exist: what a leak would have shown."""
    ray.init(address=stack.ray.address, namespace=stack.ray.namespace, log_to_driver=False)
    try:
        owner = ray.get_actor(OWNER_NAME, namespace=stack.ray.namespace)
        answer: Any = ray.get(owner.run_query.remote("SELECT name FROM system.tables", {}))
    finally:
        ray.shutdown()
    return [str(r[0]) for r in answer[1]]


@pytest.mark.parametrize(("sql", "reason"), ATTACKS)
def test_each_attack_answers_400_with_the_reason_and_leaks_nothing(
    tenants: tuple[Tenant, Tenant], platform: list[str], sql: str, reason: str
) -> None:
    a, b = tenants
    assert "tables" in platform, "system tables exist: a leak would show them"
    assert Path("/etc/passwd").exists()
    answer = a.http.post("/sql", json={"sql": sql})
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert set(body) == {"error"}, "a refusal carries no data"
    assert reason in body["error"], body
    assert b.name not in answer.text
    assert "root:" not in answer.text
    assert "DB::Exception" not in answer.text


def test_b_still_has_its_rows_and_the_tables_stand(tenants: tuple[Tenant, Tenant]) -> None:
    a, b = tenants
    for sql in ("SELECT 1; DROP TABLE events", "DROP TABLE events"):
        assert a.http.post("/sql", json={"sql": sql}).status_code == 400
    own = b.http.post("/sql", json={"sql": "SELECT count() FROM events"})
    assert own.status_code == 200, own.text
    assert own.json()["rows"] == [[len(b.events)]]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT tenant, count() FROM events GROUP BY tenant",
        "SELECT tenant, count() FROM events GROUP BY tenant -- a trailing comment",
        "SELECT tenant, count() FROM events WHERE tenant != '' OR 1 = 1 GROUP BY tenant",
        "SELECT tenant FROM (SELECT tenant FROM events) GROUP BY tenant",
        "WITH x AS (SELECT tenant FROM events) SELECT tenant FROM x GROUP BY tenant",
        "SELECT e.tenant FROM events AS e JOIN events AS f ON e.event_id = f.event_id "
        "GROUP BY e.tenant",
        "SELECT tenant FROM events GROUP BY tenant UNION ALL SELECT tenant FROM rollup_1h "
        "GROUP BY tenant",
    ],
)
def test_ordinary_selects_answer_with_only_the_callers_rows(
    tenants: tuple[Tenant, Tenant], sql: str
) -> None:
    a, b = tenants
    answer = a.http.post("/sql", json={"sql": sql})
    assert answer.status_code == 200, answer.text
    rows = answer.json()["rows"]
    assert rows, sql
    assert {row[0] for row in rows} == {a.name}, sql
    assert b.name not in answer.text


def test_the_result_row_limit_answers_400_naming_it(
    stack: Settings, tenants: tuple[Tenant, Tenant]
) -> None:
    a, _b = tenants
    assert len(a.events) ** 3 > stack.query.sql_max_rows
    answer = a.http.post("/sql", json={"sql": "SELECT * FROM events, events, events"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["limit"] == "query.sql_max_rows"


HOSTILE = st.sampled_from(
    [
        "SELECT",
        "FROM",
        "events",
        "system.tables",
        "file('/etc/passwd')",
        "(",
        ")",
        ";",
        "'",
        "\\",
        "--",
        "/*",
        "*/",
        "#",
        "INTO OUTFILE",
        "FORMAT",
        "SETTINGS",
        "UNION ALL",
        "WITH",
        "IN",
        "dictGet(",
        "count()",
        "*",
        "1",
        "JOIN",
        "WHERE",
        "\n",
        "`",
        '"',
        "{x:String}",
        "[",
        "]",
        "é",
        "\x00",
    ]
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.one_of(st.lists(HOSTILE, max_size=25).map(" ".join), st.text(max_size=120)))
def test_hostile_bodies_never_answer_5xx(tenants: tuple[Tenant, Tenant], sql: str) -> None:
    a, b = tenants
    answer = a.http.post("/sql", json={"sql": sql})
    assert answer.status_code < 500, (sql, answer.text)
    assert b.name not in answer.text
