"""``rayline verify`` against the deployed stack: the archive's replay agrees with
ClickHouse for a tenant's minutes (repeats and a late event the stream dead-lettered
included), and once a stored event is deleted behind the pipeline's back, the one window
it was in is reported, with both sides' figures, and the exit code says so."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import ray

from actors.clickhouse_owner import OWNER_NAME
from adapters.kafka import end_offsets
from cluster.settings import Settings
from tests.integration.conftest import archived_events, eventually, rayline, read_from


def iso(ts_s: float) -> str:
    return datetime.fromtimestamp(ts_s, UTC).isoformat().replace("+00:00", "Z")


def post(http: httpx.Client, events: list[dict[str, Any]]) -> None:
    answer = http.post("/v1/events", json=events)
    assert answer.status_code == 202, answer.text


def verify(tenant: str, start: float, end: float) -> tuple[int, dict[str, Any]]:
    done = rayline(
        "verify", "--from", iso(start), "--to", iso(end), "--tenant", tenant, "--json", timeout=300
    )
    assert done.returncode in (0, 1), done.stdout + done.stderr
    try:
        return done.returncode, orjson.loads(done.stdout)
    except orjson.JSONDecodeError as exc:
        raise AssertionError(f"not a JSON report: {done.stdout!r}; stderr: {done.stderr}") from exc


def test_the_archive_replay_agrees_with_clickhouse_until_an_event_goes_missing(
    http: httpx.Client, stack: Settings, tenant: str, driver: None
) -> None:
    base = (int(time.time()) // 60 - 12) * 60  # three minutes, ten events each
    events = [
        {
            "event_id": f"v-{i}",
            "tenant": tenant,
            "type": "paid",
            "ts": base + (i % 3) * 60 + i / 10,
            "value": i,
            "entity": "e",  # one partition: the late event meets this watermark
        }
        for i in range(30)
    ]
    post(http, events)
    post(http, events[:5])  # a sender's retry: the stream counts them once
    dlq_before = end_offsets(stack.kafka.bootstrap, stack.kafka.dlq_topic)
    # two hours behind this tenant's watermark (it is allowed one): dead-lettered late
    late = {**events[0], "event_id": "v-late", "ts": base - 7200, "value": 1000}
    post(http, [late])
    (letter,) = read_from(stack, stack.kafka.dlq_topic, dlq_before, 1)
    assert dict(letter.headers())["reason"] == b"late"

    start, end = base - 7200 - 60, base + 180
    # The archiver writes every 2 s in the test stack; the replay agrees once it has
    # (36 records: the retried five twice, the late one) and the dead letter with them.
    eventually(
        lambda: archived_events(stack, tenant, start * 1000, end * 1000),
        lambda found: found >= 36,
        timeout=120,
    )
    code, report = eventually(
        lambda: verify(tenant, start, end),
        lambda found: found[0] == 0 and found[1]["replayed_events"] == 30,
        timeout=120,
    )
    assert report["stored_events"] == 30
    assert report["windows"] == 3
    assert report["dead_lettered"] >= 1
    assert report["differences"] == []

    # One stored event deleted behind the pipeline's back.
    owner = ray.get_actor(OWNER_NAME, namespace=stack.ray.namespace)
    ray.get(
        owner.execute.remote(
            f"DELETE FROM {stack.clickhouse.database}.events "
            "WHERE tenant = {tenant:String} AND event_id = 'v-4'",
            {"tenant": tenant},
        )
    )
    code, report = verify(tenant, start, end)
    assert code == 1
    (found,) = report["differences"]
    assert found["minute"] == iso(base + 60)  # v-4 is in the second minute
    assert found["replayed"] == {"events": 10, "sum": 145.0, "min": 1.0, "max": 28.0}
    assert found["stored"] == {"events": 9, "sum": 141.0, "min": 1.0, "max": 28.0}

    # The same check as a Ray job (the Ray Jobs API), its output in the job's logs.
    job = f"verify-{tenant}"
    submitted = rayline(
        "jobs", "submit", "--id", job, "--", "rayline", "verify",
        "--from", iso(start), "--to", iso(end), "--tenant", tenant,
    )  # fmt: skip
    assert submitted.returncode == 1, submitted.stdout + submitted.stderr
    assert "1 window(s) differ" in submitted.stdout  # the report as a user reads it
    assert f"{tenant} paid {iso(base + 60)}: 10 events, sum 145" in submitted.stdout
    assert f"{job}: FAILED" in submitted.stderr
    listed = rayline("jobs", "list")
    assert any(job in line and "FAILED" in line for line in listed.stdout.splitlines())
    assert "1 window(s) differ" in rayline("jobs", "logs", job).stdout


def test_a_job_can_be_stopped_and_an_unknown_one_is_named(stack: Settings) -> None:
    job = f"sleep-{uuid.uuid4().hex[:8]}"
    started = rayline("jobs", "submit", "--no-wait", "--id", job, "--", "sleep", "600")
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == job
    stopped = rayline("jobs", "stop", job)
    assert stopped.returncode == 0, stopped.stderr
    assert f"{job}: STOPPED" in stopped.stdout
    missing = rayline("jobs", "logs", "no-such-job")
    assert missing.returncode == 2
    assert "rayline jobs list" in missing.stderr
