"""The S3 store against the local S3 server: objects written in parts through Arrow's
S3 client and read back by ranged reads; what a failed write leaves (nothing)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from adapters.archive import ArchiveWriter, KafkaRecord
from adapters.exceptions import StoreUnavailable
from adapters.s3 import MultipartWriter, S3Config, S3Store
from cluster.settings import Settings
from data_jobs.replay import archive_read

MB = 1024 * 1024


@pytest.fixture(scope="module")
def store(services: Settings) -> S3Store:
    made = S3Store(S3Config.of(services.s3))
    made.ensure_bucket()
    return made


@pytest.fixture
def prefix(store: S3Store) -> Iterator[str]:
    name = f"store-tests/{uuid.uuid4().hex[:12]}/"
    yield name
    for key in store.all_keys(name):
        store.delete(key)


@pytest.mark.parametrize(
    ("chunks", "part_bytes"),
    [
        ([b"abc"], 5 * MB),  # smaller than a part
        ([b""], 5 * MB),  # an empty object
        ([os.urandom(3 * MB), os.urandom(4 * MB), os.urandom(MB + 7)], 5 * MB),  # 2 parts
        ([os.urandom(11 * MB)], 5 * MB),  # one chunk of several parts
    ],
)
def test_what_is_written_in_parts_reads_back_whole(
    store: S3Store, prefix: str, chunks: list[bytes], part_bytes: int
) -> None:
    key = f"{prefix}object"
    with MultipartWriter(store, key, "text/csv", part_bytes=part_bytes) as writer:
        for chunk in chunks:
            writer.write(chunk)
            assert len(writer._buffer) < part_bytes  # never more than a part held
        assert store.head(key) is None  # nothing visible before complete()
        size = writer.complete()
    body = b"".join(chunks)
    assert size == len(body)
    head = store.head(key)
    assert head is not None
    assert head["ContentLength"] == len(body)
    assert head["ContentType"] == "text/csv"
    with store.open(key) as stream:
        assert stream.read() == body


def test_a_reader_seeks_and_reads_ranges_and_a_missing_object_is_named(
    store: S3Store, prefix: str
) -> None:
    key = f"{prefix}ranges"
    body = os.urandom(3 * MB + 5)
    with store.writer(key) as writer:
        writer.write(body)
        writer.complete()
    with store.open(key, buffer_bytes=64 * 1024) as stream:
        stream.seek(-8, os.SEEK_END)  # as Parquet reads its footer
        assert stream.read() == body[-8:]
        stream.seek(MB)
        assert stream.read(10) == body[MB : MB + 10]
        assert stream.tell() == MB + 10
    with pytest.raises(StoreUnavailable, match="is not in bucket"):
        store.open(f"{prefix}missing")


def test_a_write_that_fails_midway_leaves_no_object_and_no_unfinished_upload(
    store: S3Store, prefix: str
) -> None:
    key = f"{prefix}interrupted"

    def interrupted() -> None:
        with MultipartWriter(store, key, "text/csv", part_bytes=5 * MB) as writer:
            writer.write(os.urandom(6 * MB))  # a part is uploaded
            raise RuntimeError("the client went away")

    with pytest.raises(RuntimeError):
        interrupted()
    assert store.head(key) is None
    assert store.keys(prefix) == []
    assert store.multipart_uploads(prefix) == []

    never = MultipartWriter(store, f"{prefix}never", "text/csv")
    never.write(b"abc")
    never.abort()  # before a part: nothing was sent at all
    assert store.keys(prefix) == []


def test_the_replay_reads_hour_directories_less_the_files_no_manifest_lists(
    store: S3Store, prefix: str
) -> None:
    root = prefix.rstrip("/")
    hour = 1_796_400_000_000 - 1_796_400_000_000 % 3_600_000
    records = [
        KafkaRecord(
            "events.raw", partition, offset, None,
            b'{"event_id": "e%d", "source": "web", "tenant": "t", "type": "v", "ts": %d}'
            % (offset, hour + offset * 60_000),
            [], hour,
        )
        for partition in (0, 1) for offset in range(3)
    ]  # fmt: skip
    ArchiveWriter(store, root, ["events.dlq"]).write(records)
    directory = f"{root}/raw/source=web/date=2026-12-04/hour="
    (listed_dir,) = {key.rsplit("/", 1)[0] for key in store.all_keys(directory)}
    orphan = f"{listed_dir}/events.raw-p7-0-9.parquet"  # an interrupted write's file
    with store.writer(orphan) as writer:
        writer.write(b"PAR1")
        writer.complete()

    found = archive_read(store, root, hour, hour + 3_600_000)
    assert found.directories == [f"{store.bucket}/{listed_dir}"]
    assert found.files == 2
    assert found.skip == [f"{store.bucket}/{orphan}"]
    # a range that only the first minute's rows fall in still reads both files
    assert archive_read(store, root, hour, hour + 60_000).files == 2
    assert archive_read(store, root, hour + 3_600_000, hour + 7_200_000).files == 0
