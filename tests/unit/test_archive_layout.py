from __future__ import annotations

import urllib.parse
from dataclasses import replace

import pytest

from core.archive_layout import (
    MAX_SOURCE_KEY_CHARS,
    FileEntry,
    HourDir,
    Manifest,
    event_time_ms,
    file_name,
    hours_between,
    source_key,
)
from core.exceptions import InvalidInputError

T0 = 1_795_928_400_000  # 2026-11-29T05:00:00Z
HOUR = 3_600_000


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("billing", "billing"),
        ("a.b-c_d", "a.b-c_d"),
        ("../x", "..%2Fx"),
        ("a/b", "a%2Fb"),
        ("a=b", "a%3Db"),
        ("a b%", "a%20b%25"),
        ("ünï", "%C3%BCn%C3%AF"),
        ("_unknown", "%5Funknown"),  # a real source never shares the sentinel directory
        ("x_y", "x_y"),
        ("", "_unknown"),
        (None, "_unknown"),
        (42, "_unknown"),
        ("\x00", "%00"),
    ],
)
def test_source_names_become_key_safe_and_one_to_one(source: object, expected: str) -> None:
    key = source_key(source)
    assert key == expected
    assert "/" not in key
    if isinstance(source, str) and source:
        assert urllib.parse.unquote(key) == source  # what Hive-partition readers decode


def test_a_huge_hostile_source_is_cut_with_a_hash_and_stays_distinct() -> None:
    a, b = "é" * 500 + "a", "é" * 500 + "b"
    assert len(source_key(a)) <= MAX_SOURCE_KEY_CHARS
    assert source_key(a) != source_key(b)
    head = source_key(a).split("~")[0]
    assert urllib.parse.unquote(head, errors="strict")  # no escape cut in half


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (T0, T0),
        ("2026-11-29T05:00:00Z", T0),
        ("2026-11-29T06:00:00+01:00", T0),
        (T0 // 1000, None),  # seconds where milliseconds belong: out of range
        (True, None),
        (None, None),
        ("yesterday", None),
        ("2026-11-29T05:00:00", None),  # no offset
        (1.5e12, None),
    ],
)
def test_event_time_reads_stored_milliseconds_and_rfc3339(ts: object, expected: int) -> None:
    assert event_time_ms(ts) == expected


@pytest.mark.parametrize(
    ("kind", "source", "time_ms", "prefix"),
    [
        ("raw", "billing", T0, "archive/raw/source=billing/date=2026-11-29/hour=05/"),
        ("raw", "billing", T0 + HOUR - 1, "archive/raw/source=billing/date=2026-11-29/hour=05/"),
        ("raw", "billing", T0 + 19 * HOUR, "archive/raw/source=billing/date=2026-11-30/hour=00/"),
        ("dlq", "a/b", T0, "archive/dlq/source=a%2Fb/date=2026-11-29/hour=05/"),
        ("raw", None, T0, "archive/raw/source=_unknown/date=2026-11-29/hour=05/"),
    ],
)
def test_hour_directories(kind: str, source: object, time_ms: int, prefix: str) -> None:
    directory = HourDir.at(kind, source, time_ms)  # type: ignore[arg-type]
    assert directory.prefix("archive") == prefix
    assert directory.prefix("/archive/") == prefix
    assert directory.manifest_key("archive") == prefix + "_manifest.json"
    assert directory.prefix("") == prefix.removeprefix("archive/")


@pytest.mark.parametrize(
    ("from_ms", "to_ms", "hours"),
    [
        (T0, T0 + 1, [5]),
        (T0, T0 + HOUR, [5]),  # the end is exclusive
        (T0 + 10, T0 + HOUR + 1, [5, 6]),
        (T0 - 1, T0 + 2 * HOUR, [4, 5, 6]),
        (T0, T0, []),
        (T0 + HOUR, T0, []),
    ],
)
def test_hours_between_visits_only_the_hours_of_the_range(
    from_ms: int, to_ms: int, hours: list[int]
) -> None:
    assert [d.hour for d in hours_between("raw", "s", from_ms, to_ms)] == hours


def test_file_names_are_deterministic_per_offset_range() -> None:
    assert file_name("events.raw", 3, 100, 199) == "events.raw-p3-100-199.parquet"
    assert file_name("events.raw", 3, 100, 199) == file_name("events.raw", 3, 100, 199)
    assert file_name("events.raw", 3, 100, 200) != file_name("events.raw", 3, 100, 199)
    assert file_name("a/b", 0, 1, 1) == "a%2Fb-p0-1-1.parquet"


DIR = HourDir.at("raw", "s", T0)


def entry(partition: int, first: int, last: int, topic: str = "events.raw") -> FileEntry:
    return FileEntry(
        key=DIR.file_key("archive", file_name(topic, partition, first, last)),
        rows=last - first + 1,
        bytes=100,
        sha256="0" * 64,
        min_ts=T0,
        max_ts=T0 + 1,
        topic=topic,
        partition=partition,
        first_offset=first,
        last_offset=last,
    )


@pytest.mark.parametrize(
    ("stored", "written", "replayed", "kept", "dropped"),
    [
        # the same offsets written again: the entry is replaced, nothing to delete
        ([(0, 0, 9)], [(0, 0, 9)], {0: (0, 9)}, [(0, 0, 9)], []),
        # a replay cut into a smaller batch: the stale bigger file is dropped
        ([(0, 0, 9)], [(0, 0, 4)], {0: (0, 4)}, [(0, 0, 4)], [(0, 0, 9)]),
        # a replay cut into a bigger batch: the stale smaller file is dropped
        ([(0, 0, 4)], [(0, 0, 9)], {0: (0, 9)}, [(0, 0, 9)], [(0, 0, 4)]),
        # committed files (ending before the batch starts) are kept
        ([(0, 0, 9)], [(0, 10, 19)], {0: (10, 19)}, [(0, 0, 9), (0, 10, 19)], []),
        # the batch had no row of this hour before offset 15: stale file from 12 dropped
        ([(0, 12, 30)], [(0, 15, 20)], {0: (10, 20)}, [(0, 15, 20)], [(0, 12, 30)]),
        # a file that starts before the batch (a group rewound mid-file) is kept
        ([(0, 0, 30)], [(0, 15, 20)], {0: (10, 20)}, [(0, 0, 30), (0, 15, 20)], []),
        # other partitions are never touched
        ([(1, 0, 9)], [(0, 0, 9)], {0: (0, 9)}, [(0, 0, 9), (1, 0, 9)], []),
        # a late event lands in an older hour: its file joins the ones already there
        (
            [(0, 0, 9), (1, 0, 3)],
            [(0, 50, 50)],
            {0: (40, 60)},
            [(0, 0, 9), (0, 50, 50), (1, 0, 3)],
            [],
        ),
    ],
)
def test_manifest_merge_replaces_what_a_replay_makes_stale(
    stored: list[tuple[int, int, int]],
    written: list[tuple[int, int, int]],
    replayed: dict[int, tuple[int, int]],
    kept: list[tuple[int, int, int]],
    dropped: list[tuple[int, int, int]],
) -> None:
    manifest = Manifest(DIR, tuple(entry(*e) for e in stored))
    merged, gone = manifest.merge(
        [entry(*e) for e in written], {("events.raw", p): r for p, r in replayed.items()}
    )
    assert [(e.partition, e.first_offset, e.last_offset) for e in merged.files] == kept
    assert [(e.partition, e.first_offset, e.last_offset) for e in gone] == dropped
    assert merged.rows == sum(last - first + 1 for _, first, last in kept)


def test_manifest_entry_for_a_listed_file_replaces_it() -> None:
    old = entry(0, 0, 9)
    new = replace(old, sha256="1" * 64, bytes=120)
    merged, gone = Manifest(DIR, (old,)).merge([new], {("events.raw", 0): (0, 9)})
    assert merged.files == (new,)
    assert gone == []


def test_manifest_round_trips_through_json() -> None:
    manifest = Manifest(DIR, (entry(0, 0, 9), entry(1, 5, 7, topic="events.dlq")))
    text = manifest.to_json()
    assert Manifest.from_json(text, DIR, "m") == manifest
    assert b'"rows": 13' in text
    assert b'"schema_version": 1' in text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "is not valid JSON"),
        (b'{"schema_version": 2, "files": []}', "schema_version 2"),
        (b'{"schema_version": 1}', "with a list of files"),
        (b'{"schema_version": 1, "files": [{"key": "k"}]}', "exactly the fields"),
        (b"[]", "schema_version None"),
    ],
)
def test_unreadable_manifest_says_what_and_where(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as info:
        Manifest.from_json(data, DIR, "s3://bucket/m.json")
    assert "s3://bucket/m.json" in str(info.value)


def test_manifest_entry_field_of_the_wrong_type_is_named() -> None:
    raw = Manifest(DIR, (entry(0, 0, 9),)).to_json().replace(b'"rows": 10', b'"rows": "10"')
    with pytest.raises(InvalidInputError, match="'rows' expected int"):
        Manifest.from_json(raw, DIR, "m")
