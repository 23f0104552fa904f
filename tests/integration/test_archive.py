"""The S3 raw archive against the real local Kafka and S3 server (moto over HTTP).

Each test archives uuid-named topics under a uuid key prefix, with an Archiver run
in-process on a uuid consumer group.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from actors.archiver import Archiver, ArchiverActor, ArchiverConfig
from adapters.kafka import Headers, TopicSpec, end_offsets, ensure_topics
from adapters.s3 import S3Config, S3Store
from cluster.settings import Settings
from core.archive_layout import HourDir
from core.dead_letters import dead_letter_headers
from data_jobs.read_archive import ArchiveLocation, read_archive

HOUR = 3_600_000
NOW = int(time.time() * 1000)
H1 = NOW - NOW % HOUR - 3 * HOUR  # two past hours: late events land in older hours
H2 = H1 + HOUR
UNDECODABLE = b"\xff\x00 not an envelope"


@dataclass(frozen=True)
class Produced:
    raw_topic: str
    dlq_topic: str
    raw: int  # records produced to each topic
    dlq: int
    billing_h1: frozenset[str]  # event ids of source billing in hour 1
    billing_h2: frozenset[str]

    @property
    def total(self) -> int:
        return self.raw + self.dlq


def _envelope(event_id: str, source: str, ts: int) -> bytes:
    return orjson.dumps(
        {
            "event_id": event_id,
            "source": source,
            "tenant": "acme",
            "type": "paid",
            "ts": ts,
            "entity": event_id,
            "value": 1,
            "attributes": {"n": event_id},
            "received_at": ts + 5,
        }
    )


def _raw_events() -> list[tuple[int, bytes]]:
    """(partition, value): several sources, a hostile name, two hours, one bad value."""
    events = [(i % 2, _envelope(f"b1-{i}", "billing", H1 + 600_000 + i)) for i in range(4)]
    events += [(i % 2, _envelope(f"b2-{i}", "billing", H2 + 600_000 + i)) for i in range(3)]
    events += [(0, _envelope(f"x-{i}", "../x", H1 + 60_000 + i)) for i in range(2)]
    events += [(1, _envelope("u-0", "ünï", H2 + 1)), (0, _envelope("ab-0", "a/b", H1 + 2))]
    events.append((1, UNDECODABLE))
    return events


def _dead_letters() -> list[tuple[bytes, Headers, int]]:
    """(value, headers, Kafka timestamp): an edge rejection and a late event."""
    edge: Headers = [
        *dead_letter_headers("ingest", "field 'ts' is required", H2, source="billing", index=0)
    ]
    late: Headers = [("reason", b"late"), ("stage", b"process"), ("origin.offset", b"3")]
    return [
        (b'{"event_id": "broken"', edge, H2 + 300_000),
        (_envelope("late-0", "../x", H1 - HOUR), late, H1 + 1_200_000),
    ]


@pytest.fixture
def produced(services: Settings) -> Produced:
    run = uuid.uuid4().hex[:10]
    raw_topic, dlq_topic = f"archive-raw-{run}", f"archive-dlq-{run}"
    bootstrap = services.kafka.bootstrap
    ensure_topics(bootstrap, [TopicSpec(raw_topic, 2), TopicSpec(dlq_topic, 1)])
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    raw = _raw_events()
    for partition, value in raw:
        producer.produce(raw_topic, value, b"k", partition=partition)
    dead = _dead_letters()
    for value, headers, ts in dead:
        producer.produce(dlq_topic, value, None, partition=0, headers=headers, timestamp=ts)
    assert producer.flush(30) == 0
    return Produced(
        raw_topic,
        dlq_topic,
        len(raw),
        len(dead),
        frozenset(f"b1-{i}" for i in range(4)),
        frozenset(f"b2-{i}" for i in range(3)),
    )


@pytest.fixture
def store(services: Settings) -> S3Store:
    return S3Store(S3Config.of(services.s3))


@pytest.fixture
def config(services: Settings, produced: Produced) -> ArchiverConfig:
    return ArchiverConfig(
        bootstrap=services.kafka.bootstrap,
        raw_topic=produced.raw_topic,
        dlq_topic=produced.dlq_topic,
        s3=S3Config.of(services.s3),
        prefix=f"test-archive-{uuid.uuid4().hex[:10]}",
        group_id=f"test-archiver-{uuid.uuid4().hex[:10]}",
        flush_seconds=600,  # with max_rows = every record: one batch, known boundaries
        max_rows=produced.total,
        poll_seconds=0.2,
        retry_base_seconds=0.2,
        retry_max_seconds=1.0,
    )


@pytest.fixture
def archivers() -> Iterator[list[Archiver]]:
    made: list[Archiver] = []
    yield made
    for archiver in made:
        archiver.close()


def archive(made: list[Archiver], config: ArchiverConfig, rows: int) -> dict[str, Any]:
    """Run a fresh Archiver until it wrote ``rows`` rows; leave the group; its status."""
    archiver = Archiver(config)
    made.append(archiver)
    deadline = time.monotonic() + 90
    while archiver.status(lag=False)["rows_written"] < rows and time.monotonic() < deadline:
        archiver.step()
    status = archiver.status()
    made.remove(archiver)
    archiver.close()
    assert status["rows_written"] == rows, status
    return status


def committed(config: ArchiverConfig, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": config.bootstrap, "group.id": config.group_id})
    try:
        parts = [TopicPartition(topic, p) for p in end_offsets(config.bootstrap, topic)]
        return {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)}
    finally:
        consumer.close()


def crash_before_commit(config: ArchiverConfig, produced: Produced) -> None:
    """What Kafka holds after a crash between the S3 write and the commit: the group's
    offsets from before the batch (here the very start)."""
    consumer = Consumer({"bootstrap.servers": config.bootstrap, "group.id": config.group_id})
    try:
        offsets = [TopicPartition(produced.raw_topic, p, 0) for p in (0, 1)]
        offsets.append(TopicPartition(produced.dlq_topic, 0, 0))
        consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()


def manifests(store: S3Store, root: str) -> dict[str, dict[str, Any]]:
    """Every stored manifest under ``root``, by its directory."""
    found = {}
    for key in store.keys(root + "/"):
        if key.endswith("/_manifest.json"):
            with store.open(key) as stream:
                found[key.removesuffix("_manifest.json")] = orjson.loads(stream.read())
    return found


def listed(store: S3Store, root: str) -> dict[str, dict[str, Any]]:
    """Every file entry of every manifest, by key."""
    return {f["key"]: f for m in manifests(store, root).values() for f in m["files"]}


def parquet(store: S3Store, key: str) -> tuple[bytes, pq.ParquetFile]:
    with store.open(key) as stream:
        data = stream.read()
    return data, pq.ParquetFile(pa.BufferReader(data))


def archived_offsets(store: S3Store, root: str) -> list[tuple[str, int, int]]:
    rows: list[tuple[str, int, int]] = []
    for key in listed(store, root):
        table = parquet(store, key)[1].read(columns=["topic", "partition", "offset"])
        rows += zip(*(table[c].to_pylist() for c in ("topic", "partition", "offset")), strict=True)
    return sorted(rows)


def expected_directories(root: str) -> set[str]:
    def d(kind: str, source: object, at: int) -> str:
        return HourDir.at(kind, source, at).prefix(root)  # type: ignore[arg-type]

    return {
        d("raw", "billing", H1),
        d("raw", "billing", H2),
        d("raw", "../x", H1),
        d("raw", "ünï", H2),
        d("raw", "a/b", H1),
        d("dlq", "billing", H2),
        d("dlq", "../x", H1),
    }


def test_batch_lands_as_zstd_parquet_under_its_keys_with_manifests_and_commits(
    produced: Produced, config: ArchiverConfig, store: S3Store, archivers: list[Archiver]
) -> None:
    root = config.prefix
    status = archive(archivers, config, produced.total)

    files = listed(store, root)
    directories = {key.rsplit("/", 1)[0] + "/" for key in files}
    unknown = {d for d in directories if "/source=_unknown/" in d}
    assert directories - unknown == expected_directories(root)
    assert len(unknown) == 1  # the undecodable value, placed by its Kafka timestamp
    assert status["files_written"] == len(files)
    assert "source=..%2Fx" in " ".join(files)
    assert all(k.endswith(".parquet") and "/../" not in k for k in files)

    total = 0
    for key, entry in files.items():
        data, pf = parquet(store, key)
        meta = pf.metadata
        assert {meta.row_group(0).column(i).compression for i in range(meta.num_columns)} == {
            "ZSTD"
        }
        assert entry["rows"] == meta.num_rows
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        name = f"p{entry['partition']}-{entry['first_offset']}-{entry['last_offset']}.parquet"
        assert key.endswith(name)
        total += meta.num_rows
    assert total == produced.total

    unknown_file = next(k for k in files if "/source=_unknown/" in k)
    assert parquet(store, unknown_file)[1].read()["payload"].to_pylist() == [UNDECODABLE]
    dlq_file = next(k for k in files if "/dlq/source=billing/" in k)
    dead = parquet(store, dlq_file)[1].read().to_pylist()[0]
    assert (dead["reason"], dead["stage"]) == ("field 'ts' is required", "ingest")
    assert orjson.loads(dead["origin"]) == {"index": "0", "source": "billing"}

    assert committed(config, produced.raw_topic) == end_offsets(
        config.bootstrap, produced.raw_topic
    )
    assert committed(config, produced.dlq_topic) == {0: produced.dlq}
    assert status["lag"] == {produced.raw_topic: 0, produced.dlq_topic: 0}


def test_replay_after_a_crash_before_the_commit_rewrites_the_same_keys(
    produced: Produced, config: ArchiverConfig, store: S3Store, archivers: list[Archiver]
) -> None:
    root = config.prefix
    archive(archivers, config, produced.total)
    first = {key: store.head(key) for key in listed(store, root)}
    time.sleep(1.1)  # S3 times have second resolution: a rewrite must show

    crash_before_commit(config, produced)
    archive(archivers, config, produced.total)  # a fresh archiver on the same group

    again = {key: store.head(key) for key in listed(store, root)}
    assert again.keys() == first.keys()
    for key, head in again.items():
        assert head is not None
        assert head["LastModified"] > first[key]["LastModified"]  # type: ignore[index]
    assert sum(m["rows"] for m in manifests(store, root).values()) == produced.total
    assert len(archived_offsets(store, root)) == produced.total


def test_replay_cut_into_other_batches_replaces_the_stale_files_without_duplicates(
    produced: Produced, config: ArchiverConfig, store: S3Store, archivers: list[Archiver]
) -> None:
    root = config.prefix
    archive(archivers, config, produced.total)
    first = set(listed(store, root))

    crash_before_commit(config, produced)
    small = replace(config, max_rows=3, flush_seconds=0.3)
    status = archive(archivers, small, produced.total)

    files = listed(store, root)
    offsets = archived_offsets(store, root)
    assert len(offsets) == len(set(offsets)) == produced.total
    assert sum(m["rows"] for m in manifests(store, root).values()) == produced.total
    assert status["replaced_files"] > 0
    assert first - set(files)  # the big stale files are gone ...
    stored = {k for k in store.keys(root + "/") if not k.endswith("/_manifest.json")}
    assert stored == set(files)  # ... from the bucket too: no object outside a manifest


def test_read_archive_returns_exactly_the_rows_of_the_range(
    services: Settings,
    produced: Produced,
    config: ArchiverConfig,
    store: S3Store,
    archivers: list[Archiver],
) -> None:
    archive(archivers, config, produced.total)
    where = ArchiveLocation(config.s3, config.prefix)

    def ids(source: str | None, start: int, end: int, kind: str = "raw") -> list[str | None]:
        table = read_archive(where, source, start, end, kind=kind)  # type: ignore[arg-type]
        return sorted(table["event_id"].to_pylist(), key=str)

    assert set(ids("billing", H1, H2)) == produced.billing_h1
    assert set(ids("billing", H1, H2 + HOUR)) == produced.billing_h1 | produced.billing_h2
    assert set(ids("billing", H1 + 600_001, H2 + 600_001)) == {"b1-1", "b1-2", "b1-3", "b2-0"}
    assert ids("billing", H2 + HOUR, H2 + 5 * HOUR) == []
    assert ids("../x", H1, H2) == ["x-0", "x-1"]
    assert ids("ünï", H1, H2 + HOUR) == ["u-0"]
    assert ids("a/b", H1, H1 + 3) == ["ab-0"]
    dead = read_archive(where, "billing", H2, H2 + HOUR, kind="dlq")
    assert dead["reason"].to_pylist() == ["field 'ts' is required"]
    unknown = read_archive(where, None, NOW - HOUR, int(time.time() * 1000) + HOUR)
    assert unknown["payload"].to_pylist() == [UNDECODABLE]

    # The settings object works as well as a location (the same bucket, another prefix).
    archive_part = services.archive.model_copy(update={"prefix": config.prefix})
    settings = services.model_copy(update={"archive": archive_part})
    assert read_archive(settings, "billing", H1, H2).num_rows == len(produced.billing_h1)


def test_an_s3_outage_is_retried_and_reported_then_archived(
    produced: Produced, config: ArchiverConfig, archivers: list[Archiver]
) -> None:
    # A bucket that does not exist yet: every write fails until it is created.
    missing = replace(config.s3, bucket=f"rl-archive-{uuid.uuid4().hex[:12]}")
    down = replace(config, s3=missing)
    archiver = Archiver(down)
    archivers.append(archiver)
    deadline = time.monotonic() + 60
    while archiver.status(lag=False)["failures"] < 2 and time.monotonic() < deadline:
        archiver.step()
    status = archiver.status()
    assert status["state"] == "retrying"
    assert missing.bucket in status["last_error"]
    assert status["rows_written"] == 0
    assert status["lag"] == {produced.raw_topic: produced.raw, produced.dlq_topic: produced.dlq}

    S3Store(missing).ensure_bucket()  # the store is back
    while archiver.status(lag=False)["rows_written"] < produced.total:
        assert time.monotonic() < deadline + 30, archiver.status()
        archiver.step()
    assert archiver.status()["state"] == "running"
    assert committed(down, produced.dlq_topic) == {0: produced.dlq}


def test_the_actor_body_archives_on_its_thread_pauses_resumes_and_stops(
    produced: Produced, config: ArchiverConfig
) -> None:
    actor = ArchiverActor(replace(config, flush_seconds=0.5, max_rows=1000))
    try:
        deadline = time.monotonic() + 60
        while actor.status().get("rows_written", 0) < produced.total:
            assert time.monotonic() < deadline, actor.status()
            time.sleep(0.2)
        assert actor.pause(timeout=30)
        assert actor.status()["state"] == "paused"
        actor.resume()
        assert eventually_state(actor, "running")
    finally:
        actor.stop()
    assert actor.status()["running"] is False
    assert committed(config, produced.dlq_topic) == {0: produced.dlq}


def eventually_state(actor: ArchiverActor, state: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while actor.status()["state"] != state and time.monotonic() < deadline:
        time.sleep(0.1)
    return bool(actor.status()["state"] == state)
