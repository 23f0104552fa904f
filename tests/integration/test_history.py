"""History through the deployed stack: an uploaded file of last week's events plus a few
of the last minutes. The recent rows go through the stream; last week's, far behind
every watermark, are counted by the history job (Ray Data) straight into the raw events
table and the rollups of their days are recomputed. Every row counts once, in its own
hour and day, through the public query API; uploading the same file again adds nothing."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from adapters.s3 import S3Config, S3Store
from cluster.settings import Settings
from tests.integration.conftest import api_key, eventually, pg, rayline

HOUR_S, DAY_S = 3600, 86_400
WEEK_ROWS = 2000
RECENT_ROWS = 40


@pytest.fixture
def uploader(stack: Settings, tenant: str) -> tuple[str, str]:
    """(API key, upload source) of ``tenant`` (an hour of lateness: rows of the last
    minutes still go through the stream)."""
    key = api_key(stack, tenant)
    source = f"{tenant}-files"
    pg(stack, "INSERT INTO sources (name, kind, tenant) VALUES ($1, 'upload', $2)", source, tenant)
    return key, source


def history_file(now_s: int) -> tuple[bytes, dict[int, int], int]:
    """A CSV of last week (WEEK_ROWS rows over 7 days, 8 days to 1 day back) and of the
    last minutes (RECENT_ROWS rows); the expected count of each hour of last week, and
    the start of the recent rows."""
    start = (now_s - 8 * DAY_S) // DAY_S * DAY_S
    lines = ["event_id,type,ts,entity"]
    hours: dict[int, int] = {}
    for i in range(WEEK_ROWS):
        ts = start + i * (7 * DAY_S // WEEK_ROWS) + 17
        hours[ts // HOUR_S * HOUR_S] = hours.get(ts // HOUR_S * HOUR_S, 0) + 1
        lines.append(f"w{i},buy,{iso(ts)},u{i % 37}")
    recent = now_s - 300
    for i in range(RECENT_ROWS):
        lines.append(f"r{i},buy,{iso(recent + i)},u{i % 37}")
    return ("\n".join(lines) + "\n").encode(), hours, recent


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def upload(http: httpx.Client, key: str, source: str, data: bytes) -> dict[str, Any]:
    auth = {"authorization": f"Bearer {key}"}
    answer = http.post(
        "/v1/uploads",
        params={"source": source, "filename": "week.csv"},
        headers={**auth, "content-type": "text/csv"},
        content=data,
    )
    assert answer.status_code == 202, answer.text
    status_url = answer.json()["status_url"]

    def status() -> dict[str, Any]:
        got = http.get(status_url, headers=auth)
        assert got.status_code == 200, got.text
        body: dict[str, Any] = got.json()
        return body

    body = eventually(status, lambda b: b["state"] in ("done", "failed"), timeout=300)
    assert body["state"] == "done", body
    return body


def series(
    http: httpx.Client, tenant: str, resolution: str, from_s: int, to_s: int
) -> dict[int, float]:
    params: dict[str, str | int] = {"tenant": tenant, "type": "buy", "metric": "count"}
    params |= {"resolution": resolution, "from": from_s, "to": to_s}
    answer = http.get("/v1/query/series", params=params)
    assert answer.status_code == 200, answer.text
    found = answer.json()["series"]
    return {} if not found else {t // 1000: v for t, v in found[0]["points"]}


def test_an_upload_of_last_week_counts_every_row_once_in_its_hour_and_day(
    http: httpx.Client, stack: Settings, tenant: str, uploader: tuple[str, str]
) -> None:
    key, source = uploader
    now_s = int(time.time())
    data, hours, recent = history_file(now_s)
    days: dict[int, int] = {}
    for hour, count in hours.items():
        days[hour // DAY_S * DAY_S] = days.get(hour // DAY_S * DAY_S, 0) + count
    first_day, last_day = min(days), max(days) + DAY_S

    body = upload(http, key, source, data)
    assert body["rows_read"] == body["rows_accepted"] == WEEK_ROWS + RECENT_ROWS
    assert (body["rows_historical"], body["history_written"]) == (WEEK_ROWS, WEEK_ROWS)
    assert body["rows_rejected"] == 0

    # Last week, counted by the history job, in the right hours and days.
    assert series(http, tenant, "1d", first_day, last_day) == days
    assert series(http, tenant, "1h", first_day, last_day) == hours
    # The recent rows, through the stream (read from the raw events, not sealed yet).
    eventually(
        lambda: series(http, tenant, "1m", recent // 60 * 60, now_s + 60),
        lambda points: sum(points.values()) == RECENT_ROWS,
        timeout=60,
    )

    # The same file again: every row is stored already, nothing counts twice.
    again = upload(http, key, source, data)
    assert (again["rows_historical"], again["history_written"]) == (WEEK_ROWS, 0)
    assert again["history_stored"] == WEEK_ROWS
    assert series(http, tenant, "1d", first_day, last_day) == days
    time.sleep(5)  # the second copy of the recent rows went through the stream's dedup
    points = series(http, tenant, "1m", recent // 60 * 60, now_s + 60)
    assert sum(points.values()) == RECENT_ROWS


def test_a_backfill_of_files_in_s3_counts_them_and_says_what_it_did(
    http: httpx.Client, stack: Settings, tenant: str, uploader: tuple[str, str]
) -> None:
    _key, source = uploader
    store = S3Store(S3Config.of(stack.s3))
    now_s = int(time.time())
    data, hours, _recent = history_file(now_s)
    prefix = f"imports/{tenant}/"
    half = data.index(b"\nw1000,") + 1  # two files: the header, then rows, in each
    header = data[: data.index(b"\n") + 1]
    for name, body in (("a.csv", data[:half]), ("b.csv", header + data[half:])):
        with store.writer(prefix + name, "text/csv") as out:
            out.write(body)
            out.complete()
    with store.writer(prefix + "notes.txt", "text/plain") as out:
        out.write(b"not a data file")
        out.complete()

    refused = rayline("backfill", prefix, "--source", source, timeout=120)
    assert refused.returncode == 1
    assert "unknown format" in refused.stderr
    assert "notes.txt" in refused.stderr
    store.delete(prefix + "notes.txt")

    done = rayline("backfill", prefix, "--source", source, "--poll-seconds", "0.5", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "a.csv" in done.stdout
    assert "b.csv" in done.stdout
    days: dict[int, int] = {}
    for hour, count in hours.items():
        days[hour // DAY_S * DAY_S] = days.get(hour // DAY_S * DAY_S, 0) + count
    assert series(http, tenant, "1d", min(days), max(days) + DAY_S) == days
    stats = pg(
        stack,
        "SELECT sum(rows_accepted), sum(rows_historical), sum(history_written) FROM uploads "
        "WHERE source = $1",
        source,
    )
    assert tuple(stats[0]) == (WEEK_ROWS + RECENT_ROWS, WEEK_ROWS, WEEK_ROWS)
