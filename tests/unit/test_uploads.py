"""Uploads: object keys, file names, the job's row verdicts, the S3 part writer, and
what `rayline upload` prints and exits with."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.uploads import Upload
from cluster.cli_upload import FileFormat, content_type_for, exit_code, render_status
from core.formats import RecordError
from data_jobs.publish_upload import batches, event_id_for, split_batch
from serve_apps.upload_handler import object_key, safe_filename, status_body

UPLOAD = Upload("u1", "acme", "files", "a.csv", "csv", "uploads/acme/u1/a.csv", 10, "running")
GOOD = {"type": "click", "ts": "2026-01-01T00:00:00Z", "entity": "e1"}


@pytest.mark.parametrize(
    ("given_name", "expected"),
    [
        ("events.csv", "events.csv"),
        ("../../etc/passwd", "passwd"),
        ("C:\\data\\day 1.parquet", "day_1.parquet"),
        ("résumé (final).ndjson", "r_sum_final_.ndjson"),
    ],
)
def test_file_names_are_made_safe_for_object_keys(given_name: str, expected: str) -> None:
    assert safe_filename(given_name) == expected


@pytest.mark.parametrize("bad", ["", "..", "/", "???"])
def test_a_file_name_with_nothing_usable_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="no usable characters"):
        safe_filename(bad)


@given(st.text(min_size=1, max_size=300))
def test_safe_names_never_leave_the_upload_folder(name: str) -> None:
    try:
        cleaned = safe_filename(name)
    except ValueError:
        return
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,200}", cleaned)
    assert cleaned not in (".", "..")
    assert object_key("acme", "u1", name) == f"uploads/acme/u1/{cleaned}"


def test_status_says_where_rejected_rows_went() -> None:
    body = status_body(UPLOAD, "events.dlq")
    assert body["rejected_to"] == {"topic": "events.dlq", "headers": {"origin.upload": "u1"}}
    assert body["status_url"] == "/v1/uploads/u1"
    assert body["rows_read"] == 0
    assert body["state"] == "running"


def _headers(record: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in record[2]}


def test_rows_get_the_uploader_tenant_the_source_and_a_stable_id() -> None:
    batch = split_batch([(0, dict(GOOD)), (1, {**GOOD, "event_id": "own-id"})], UPLOAD, 1000)
    assert not batch.rejected
    first, second = (orjson.loads(r[1]) for r in batch.accepted)
    assert first["tenant"] == "acme"
    assert first["source"] == "files"
    assert first["event_id"] == event_id_for("u1", 0) == "u1-0"
    assert second["event_id"] == "own-id"
    assert batch.accepted[0][0] == b"acme:e1"


def test_rows_of_another_tenant_and_bad_rows_go_to_the_dead_letters() -> None:
    items: list[Any] = [
        (0, {**GOOD, "tenant": "other"}),
        (1, {**GOOD, "ts": "yesterday"}),
        RecordError(2, "line 3: expected 4 columns, got 2", b"a,b"),
        (3, "not an object"),
        (4, dict(GOOD)),
    ]
    batch = split_batch(items, UPLOAD, 1000)
    assert len(batch.accepted) == 1
    assert orjson.loads(batch.accepted[0][1])["event_id"] == "u1-4"
    by_index = {_headers(r)["origin.index"]: r for r in batch.rejected}
    assert sorted(by_index) == ["0", "1", "2", "3"]
    assert "tenant 'other'" in _headers(by_index["0"])["reason"]
    assert _headers(by_index["1"])["reason"].startswith("ts:")
    assert by_index["2"][1] == b"a,b"  # a parse error keeps the original bytes
    for record in batch.rejected:
        headers = _headers(record)
        assert headers["stage"] == "upload"
        assert headers["origin.upload"] == "u1"
        assert headers["origin.source"] == "files"
        assert headers["received_at"] == "1000"


@pytest.mark.parametrize(
    ("count", "size", "skip", "expected"),
    [
        (10, 4, 0, [4, 4, 2]),
        (10, 4, 4, [4, 2]),
        (10, 5, 10, []),
        (3, 5, 7, []),
        (0, 5, 0, []),
    ],
)
def test_batches_resume_after_the_rows_already_published(
    count: int, size: int, skip: int, expected: list[int]
) -> None:
    groups = list(batches(iter([(i, {}) for i in range(count)]), size, skip=skip))
    assert [len(g) for g in groups] == expected
    if groups:
        assert groups[0][0] == (skip, {})


@pytest.mark.parametrize(
    ("name", "fmt", "expected"),
    [
        ("a.csv", None, "text/csv"),
        ("a.JSONL", None, "application/x-ndjson"),
        ("a.avro", None, "application/vnd.apache.avro+container"),
        ("a.parquet", None, "application/vnd.apache.parquet"),
        ("a.bin", None, "application/octet-stream"),
        ("a.bin", FileFormat.csv, "text/csv"),
    ],
)
def test_cli_sends_the_content_type_of_the_format(
    name: str, fmt: FileFormat | None, expected: str
) -> None:
    assert content_type_for(Path(name), fmt) == expected


@pytest.mark.parametrize(
    ("state", "rejected", "code"),
    [("done", 0, 0), ("done", 3, 2), ("failed", 0, 1), ("failed", 3, 1)],
)
def test_cli_exit_code_says_how_the_upload_ended(state: str, rejected: int, code: int) -> None:
    body = {"id": "u1", "state": state, "rows_read": 10, "rows_accepted": 7}
    assert exit_code({**body, "rows_rejected": rejected}) == code


def test_cli_status_line_shows_the_counters() -> None:
    body = {"id": "u1", "state": "running", "rows_read": 12000, "rows_accepted": 11990}
    line = render_status({**body, "rows_rejected": 10})
    assert line == "upload u1: running · 12,000 rows read · 11,990 accepted · 10 rejected"


def test_cli_status_line_shows_the_parts_of_a_file_read_in_parts() -> None:
    body = {"id": "u1", "state": "running", "rows_read": 5, "rows_accepted": 5}
    body |= {"rows_rejected": 0, "parts": {"total": 8, "done": 3}}
    assert render_status(body).endswith("· 5 accepted · 0 rejected · parts 3/8 done")
    assert "parts" not in render_status({**body, "parts": None})


def test_cli_status_line_says_how_many_rows_the_history_job_counted() -> None:
    body = {"id": "u1", "state": "done", "rows_read": 3000, "rows_accepted": 3000}
    body |= {"rows_rejected": 0, "rows_historical": 2500, "history_written": 2400}
    line = render_status({**body, "history_stored": 100})
    assert line.endswith(
        "· 2,500 behind the stream, counted by the history job (2,400 written, 100 stored already)"
    )
