"""The sessions job end to end: events in through the API, the archive replayed, the
sessions cut by the example PySpark job on Spark executors that are Ray actors (RayDP)
and by Ray Data, equal to each other and to the definition, and served by the query
API (tests/unit/test_batch_cli.py has the refusals of bad arguments)."""

from __future__ import annotations

import math
import random
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

from cluster.settings import Settings
from tests.integration.conftest import api_key, archived_events, eventually, rayline

MIN = 60
GAP_S = 5 * MIN


def iso(ts_s: float) -> str:
    return datetime.fromtimestamp(ts_s, UTC).isoformat().replace("+00:00", "Z")


def events_of(tenant: str, start: int) -> list[dict[str, Any]]:
    """Three entities' visits: steps of 10 s to 12 min, so some 5-minute gaps are passed."""
    rng = random.Random(14)
    made = []
    for entity in ("u1", "u2", "u3"):
        ts = start + rng.randrange(60)
        for i in range(rng.randrange(15, 30)):
            ts += rng.choice([10, 45, 120, 240, 299, 301, 360, 720])
            if ts >= start + 40 * MIN:
                break
            made.append(
                {
                    "event_id": f"{entity}-{i}",
                    "tenant": tenant,
                    "type": "view",
                    "ts": ts + 0.25,
                    "value": rng.randrange(1, 50),
                    "entity": entity,
                }
            )
    return made


def expected_sessions(events: list[dict[str, Any]]) -> list[tuple[str, int, int, int, float]]:
    """(entity, start ms, end ms, events, value sum) straight from the definition."""
    found = []
    for entity in sorted({e["entity"] for e in events}):
        times = sorted((round(e["ts"] * 1000), e["value"]) for e in events if e["entity"] == entity)
        run = [times[0]]
        for ts, value in times[1:]:
            if ts - run[-1][0] > GAP_S * 1000:
                found.append(
                    (entity, run[0][0], run[-1][0], len(run), float(sum(v for _, v in run)))
                )
                run = []
            run.append((ts, value))
        found.append((entity, run[0][0], run[-1][0], len(run), float(sum(v for _, v in run))))
    return found


def sessions(tenant: str, start: float, end: float, *extra: str) -> dict[str, Any]:
    done = rayline(
        "sessions", "--from", iso(start), "--to", iso(end), "--tenant", tenant,
        "--gap", "5m", "--json", "--limit", "1000", *extra, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return orjson.loads(done.stdout)


def rows_of(report: dict[str, Any]) -> list[tuple[str, int, int, int, float]]:
    def ms(text: str) -> int:
        return round(datetime.fromisoformat(text).timestamp() * 1000)

    return [
        (r["entity"], ms(r["session_start"]), ms(r["session_end"]), r["events"], r["value_sum"])
        for r in report["rows"]
    ]


def same(found: list[tuple[Any, ...]], expected: list[tuple[Any, ...]]) -> bool:
    return len(found) == len(expected) and all(
        f[:4] == e[:4] and math.isclose(f[4], e[4], rel_tol=1e-9)
        for f, e in zip(found, expected, strict=True)
    )


def test_the_pyspark_job_on_ray_and_ray_data_cut_the_same_sessions_and_the_api_serves_them(
    http: httpx.Client, stack: Settings, tenant: str
) -> None:
    start = (int(time.time()) // 60 - 45) * 60
    events = events_of(tenant, start)
    noise = [
        {**events[0], "event_id": "no-entity", "entity": ""},  # in no session
        {**events[1], "event_id": "dropped", "type": "debug"},  # the stream's filter drops it
    ]
    for chunk in (events, events[:7], noise):  # events[:7] again: a sender's retry
        answer = http.post("/v1/events", json=chunk)
        assert answer.status_code == 202, answer.text
    expected = expected_sessions(events)
    end = start + 45 * MIN

    # The archiver writes every 2 s in the test stack: every record, the retried seven
    # twice, and of the noise the debug event (the edge refuses an empty entity).
    eventually(
        lambda: archived_events(stack, tenant, start * 1000, end * 1000),
        lambda found: found == len(events) + 7 + 1,
        timeout=120,
    )
    by_ray = sessions(tenant, start, end, "--engine", "ray", "--dry-run")
    assert same(rows_of(by_ray), expected), (rows_of(by_ray), expected)
    assert by_ray["events"] == len(events)
    assert by_ray["written"] is False

    # The user's PySpark job, unchanged, on Spark executors that are Ray actors, as a
    # Ray job (the Ray Jobs API): Spark runs in the job's driver on the head.
    job = f"sessions-{tenant}"
    submitted = rayline(
        "jobs", "submit", "--id", job, "--", "rayline", "sessions", "--from", iso(start),
        "--to", iso(end), "--tenant", tenant, "--gap", "5m", "--engine", "spark",
        timeout=400,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert f"{job}: SUCCEEDED" in submitted.stderr
    assert f"engine spark: {len(expected)} session(s) of 3 entit(ies)" in submitted.stdout

    # What the job stored, through the query API, as the tenant sees it.
    base = f"http://{stack.serve.host}:{stack.serve.port}"
    key = api_key(stack, tenant)
    sql = {
        "sql": "SELECT entity, toUnixTimestamp64Milli(session_start) AS s, "
        "toUnixTimestamp64Milli(session_end) AS e, events, value_sum "
        "FROM sessions ORDER BY entity, s"
    }

    def served(key: str = key) -> list[tuple[Any, ...]]:
        headers = {"authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            answer = client.post("/v1/query/sql", json=sql)
        assert answer.status_code == 200, answer.text
        return [tuple(row) for row in answer.json()["rows"]]

    assert same(served(), expected)
    assert served(api_key(stack, f"t-{uuid.uuid4().hex[:12]}")) == []  # others see none
    # Ray Data's run replaces the range's sessions (Spark's): none is stored twice.
    assert sessions(tenant, start, end, "--engine", "ray")["written"] is True
    assert same(served(), expected)
