"""The archive replay's pure parts: the stream's pass over archived records, what it
leaves out (dead-lettered records, other tenants, the range's outside, no source),
one row per raw-events key, and the comparison of windows."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pyarrow as pa
import pytest

from adapters.s3 import S3Config, filesystem
from core.archive_layout import hours_of_key, source_keys_of
from core.batch import Runtime
from core.transforms import parse_transforms
from data_jobs.history import HistoryConfig
from data_jobs.replay import ReplayConfig, dead_letter_origins, replay_rows
from data_jobs.verify import Totals, Window, compare, window_totals, windows_of
from tests.unit.test_history import CONFIG

MIN = 60_000
T0 = 1_796_400_000_000 - 1_796_400_000_000 % MIN  # a minute's start
S3 = S3Config("http://127.0.0.1:29000", "us-east-1", "b", "id", "secret")
VERIFY = ReplayConfig(
    HistoryConfig(CONFIG, S3, "postgresql://x", "127.0.0.1:1", "dlq", "ns", "owner", "db"),
    "archive",
    "events.raw",
)


def envelope(event_id: str, ts: int, **fields: Any) -> bytes:
    body = {
        "event_id": event_id,
        "source": "billing",
        "tenant": "acme",
        "type": "paid",
        "ts": ts,
        "value": 2.0,
        "entity": "u1",
    }
    return orjson.dumps(body | fields)


def archive_batch(values: list[bytes]) -> pa.Table:
    """Archive rows as the replay reads them: payload, key, partition, offset, time."""
    return pa.table(
        {
            "payload": pa.array(values, pa.binary()),
            "key": pa.array([None] * len(values), pa.binary()),
            "partition": pa.array([i % 2 for i in range(len(values))], pa.int32()),
            "offset": pa.array([100 + i for i in range(len(values))], pa.int64()),
            "kafka_timestamp": pa.array([T0] * len(values), pa.timestamp("ms", "UTC")),
        }
    )


def test_the_replay_counts_what_the_stream_counts_and_leaves_out_the_rest() -> None:
    values = [
        envelope("a", T0 + 1000, value=1.5),
        envelope("b", T0 + 61_000, value=4.0),
        envelope("late", T0 + 2000),  # offset 102: the stream dead-lettered it
        envelope("other", T0 + 3000, tenant="globex"),
        envelope("outside", T0 + 10 * MIN),
        envelope("anon", T0 + 4000, source=None),
        b"\xff not an envelope",
        envelope("a", T0 + 1000, value=1.5),  # a duplicate, same key
    ]
    rows = replay_rows(
        archive_batch(values), Runtime(), VERIFY, {(0, 102)}, (T0, T0 + 2 * MIN), "acme"
    )
    assert sorted(rows["event_id"].to_pylist()) == ["a", "b"]  # one copy per batch: dedup
    assert sorted(rows["minute"].to_pylist()) == [T0, T0 + MIN]
    windows = windows_of(window_totals(rows))
    assert windows == {
        Window("acme", "paid", T0): Totals(1, 1.5, 1.5, 1.5),
        Window("acme", "paid", T0 + MIN): Totals(1, 4.0, 4.0, 4.0),
    }


def test_the_replay_runs_the_streams_transforms() -> None:
    processing = replace(CONFIG, transforms=parse_transforms([{"filter": "type != 'debug'"}]))
    config = replace(VERIFY, history=replace(VERIFY.history, processing=processing))
    values = [envelope("a", T0 + 1), envelope("d", T0 + 2, type="debug")]
    rows = replay_rows(archive_batch(values), Runtime(), config, set(), (T0, T0 + MIN), None)
    assert rows["event_id"].to_pylist() == ["a"]


def test_duplicates_across_batches_count_once_per_raw_events_key() -> None:
    first = replay_rows(
        archive_batch([envelope("a", T0 + 1), envelope("b", T0 + 2, value=5.0)]),
        Runtime(),
        VERIFY,
        set(),
        (T0, T0 + MIN),
        None,
    )
    again = replay_rows(
        archive_batch([envelope("a", T0 + 1)]), Runtime(), VERIFY, set(), (T0, T0 + MIN), None
    )
    totals = windows_of(window_totals(pa.concat_tables([first, again])))
    assert totals == {Window("acme", "paid", T0): Totals(2, 7.0, 2.0, 5.0)}


def test_compare_reports_each_window_that_differs_or_is_missing_on_one_side() -> None:
    same, off, only_replayed, only_stored = (Window("t", "x", T0 + i * MIN) for i in range(4))
    replayed = {
        same: Totals(3, 1.0 + 2.0 + 3.1, 1.0, 3.1),
        off: Totals(2, 2.0, 1.0, 1.0),
        only_replayed: Totals(1, 1.0, 1.0, 1.0),
    }
    stored = {
        same: Totals(3, 3.1 + 2.0 + 1.0, 1.0, 3.1),  # another order of additions
        off: Totals(1, 1.0, 1.0, 1.0),
        only_stored: Totals(1, 9.0, 9.0, 9.0),
    }
    found = compare(replayed, stored)
    assert [d.window for d in found] == [off, only_replayed, only_stored]
    assert found[1].stored is None
    assert found[2].replayed is None
    assert found[0].as_dict()["minute"].endswith("Z")
    assert compare(replayed, dict(replayed)) == []


@pytest.mark.parametrize(
    ("change", "differs"),
    [({"sum": 6.1 + 1e-6}, True), ({"min": 0.5}, True), ({"max": 3.2}, True), ({}, False)],
)
def test_a_window_agrees_only_when_every_figure_does(change: dict[str, Any], differs: bool) -> None:
    base = Totals(3, 6.1, 1.0, 3.1)
    assert (not base.agrees(replace(base, **change))) is differs


def test_dead_letters_name_the_records_of_the_raw_topic_only() -> None:
    origins = [
        orjson.dumps({"topic": "events.raw", "partition": "3", "offset": "17"}).decode(),
        orjson.dumps({"topic": "other", "partition": "3", "offset": "18"}).decode(),
        orjson.dumps({"upload": "u1", "index": "4"}).decode(),  # an upload's rejection
        "not json",
        None,
    ]
    table = pa.table({"origin": pa.array(origins, pa.string())})
    assert dead_letter_origins(table, "events.raw") == {(3, 17)}


def test_listed_source_folders_and_their_hours() -> None:
    folders = ["archive/raw/source=billing/", "archive/raw/source=a%2Fb/", "archive/raw/x/"]
    assert source_keys_of(folders) == ["billing", "a%2Fb"]
    hours = hours_of_key("raw", "a%2Fb", T0, T0 + 2 * 3_600_000)
    assert [h.source for h in hours] == ["a%2Fb"] * len(hours)
    assert hours[0].prefix("archive").startswith("archive/raw/source=a%2Fb/date=")


def test_the_filesystem_speaks_to_the_configured_endpoint() -> None:
    fs = filesystem(S3)
    assert fs.region == "us-east-1"
    assert "127.0.0.1:29000" in repr(fs.__reduce__())


def test_a_job_carries_the_rayline_settings_but_no_secret() -> None:
    from cluster.cli_jobs import job_environment

    environ = {
        "RAYLINE_ARCHIVE__PREFIX": "archive",
        "RAYLINE_POSTGRES__PASSWORD": "hunter2",
        "RAYLINE_S3__SECRET_ACCESS_KEY": "s3cr3t",
        "RAYLINE_RAY__AUTH_TOKEN": "tok",
        "HOME": "/root",
    }
    assert job_environment(environ) == {"RAYLINE_ARCHIVE__PREFIX": "archive"}
