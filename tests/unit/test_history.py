"""The history job's pure parts: which rows the stream can still take, and the stream's
own pass over historical rows (nothing late however old, dedup, filters, dead letters)."""

from __future__ import annotations

from dataclasses import replace

import orjson
import pyarrow as pa

from adapters.kafka import Record
from core.batch import Runtime
from core.event_time import Lateness
from core.partition_state import ProcessingConfig, parse_window
from core.transforms import parse_transforms
from data_jobs.history import (
    HISTORY_PARTITION,
    history_rows,
    not_stored,
    split_history,
    staged_key,
    stream_cutoff_ms,
)

S, MIN, DAY = 1000, 60_000, 86_400_000
NOW = 1_796_400_000_000

CONFIG = ProcessingConfig(
    windows=(parse_window("1m"), parse_window("5m/1m")),
    allowed_lateness_ms=5 * S,
    idle_timeout_ms=30 * S,
    dedup_horizon_ms=10 * MIN,
    distinct="entity",
    quantiles=True,
)


def envelope(event_id: str, ts: int, type_: str = "buy", value: float = 1.0) -> bytes:
    return orjson.dumps(
        {
            "event_id": event_id,
            "source": "upload-src",
            "tenant": "acme",
            "type": type_,
            "ts": ts,
            "value": value,
            "entity": f"u-{event_id}",
        }
    )


def test_the_cutoff_is_now_less_the_tenants_lateness_plus_the_margin() -> None:
    lateness = Lateness(5 * S, (("slow-*", 3600 * S),))
    assert stream_cutoff_ms("acme", NOW, lateness, 30 * S) == NOW + 25 * S
    assert stream_cutoff_ms("slow-1", NOW, lateness, 30 * S) == NOW - 3570 * S


def test_rows_older_than_the_cutoff_go_to_history_the_rest_to_the_stream() -> None:
    records: list[Record] = [(b"k", envelope(f"e{i}", NOW - i * MIN), []) for i in range(5)]
    stream, history = split_history(records, NOW - 2 * MIN)
    assert [orjson.loads(r[1])["event_id"] for r in stream] == ["e0", "e1", "e2"]
    assert [orjson.loads(r[1])["event_id"] for r in history] == ["e3", "e4"]
    # every record lands in exactly one list, in its order
    assert stream + history == records


def test_a_week_of_history_counts_in_one_pass_with_nothing_late() -> None:
    # Oldest last: in the stream, the newest event would make every older one late.
    values = [envelope(f"e{i}", NOW - i * DAY // 2, value=float(i)) for i in range(14)]
    rows, result = history_rows(values, CONFIG, Runtime())
    assert rows is not None
    assert sorted(rows["event_id"].to_pylist()) == sorted(f"e{i}" for i in range(14))
    assert result.rows == 14
    assert not result.rejected
    assert result.duplicates == 0
    assert set(rows["partition"].to_pylist()) == {HISTORY_PARTITION}
    assert rows["offset"].to_pylist() == list(range(14))  # the line in the staged part
    assert rows["payload"].to_pylist() == values  # the envelope bytes, as the stream stores
    ts = rows["ts"].cast(pa.int64()).to_pylist()
    assert ts == [NOW - i * DAY // 2 for i in range(14)]


def test_the_streams_dedup_filters_and_rejections_apply_to_history() -> None:
    config = replace(CONFIG, transforms=parse_transforms([{"filter": "type != 'debug'"}]))
    values = [
        envelope("a", NOW - DAY),
        envelope("a", NOW - DAY),  # the same (source, event_id): counted once
        envelope("b", NOW - DAY, type_="debug"),  # filtered, as the stream filters it
        b'{"event_id": "c", "tenant": "acme"',  # cut off: a dead letter with its reason
        envelope("d", NOW - 2 * DAY),
    ]
    rows, result = history_rows(values, config, Runtime())
    assert rows is not None
    assert rows["event_id"].to_pylist() == ["a", "d"]
    assert result.duplicates == 1
    assert result.filtered == 1
    assert [line for line, _reason in result.rejected] == [3]


def test_events_stored_already_are_not_written_again() -> None:
    rows, _result = history_rows([envelope("a", NOW), envelope("b", NOW)], CONFIG, Runtime())
    assert rows is not None
    assert not_stored(rows, {("upload-src", "a")})["event_id"].to_pylist() == ["b"]
    assert not_stored(rows, set()).num_rows == 2
    assert not_stored(rows, {("other-src", "a")}).num_rows == 2  # another source's "a"


def test_staged_parts_are_named_by_their_first_row_and_sort_in_its_order() -> None:
    assert staged_key("up-1", 5000) == "history/up-1/000000005000.ndjson"
    assert staged_key("up-1", 9) < staged_key("up-1", 10) < staged_key("up-1", 10**11)
