"""Batch jobs' rows/s next to pyarrow.dataset reading the same files in one process.

Two figures, each with its reference from the same run:

* **Archive replay** (``rayline verify``'s Ray Data job): ``--events`` records are
  written as archive files (``--files`` Parquet files in one hour, through the
  archiver's own writer, under the prefix ``bench-archive`` so that the live archive is
  not touched); then the replay (read, the stream's pass, dead letters left out) is
  timed alone, and with verify's shuffle into 1-minute windows. References:
  ``pyarrow.dataset`` reading the same files' columns in this one process, and the same
  read followed by the stream's pass (``replay_rows``) in this one process, no Ray.
* **Historical upload**: an NDJSON file of ``--upload-rows`` events of three days ago
  goes through ``POST /v1/uploads``; every row is behind the watermark, so all go to the
  history job (Ray Data) and into ClickHouse, and the days' rollups are rebuilt. Timed
  from the request to the upload's ``done``. Reference: ``pyarrow.dataset`` (JSON
  format) reading the same S3 object in this one process.

Run by ``make bench`` on a running stack: ``python -m benchmarks.batch --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
import uuid

import httpx
import orjson
import pyarrow as pa
import pyarrow.dataset as pads

from adapters.archive import ArchiveWriter, KafkaRecord
from adapters.s3 import S3Config, S3Store, filesystem
from adapters.sources import Source, SourceCatalog
from cluster.deploy import base_url, connected, replay_config
from cluster.settings import Settings, load_settings
from data_jobs.replay import ReplayConfig, ReplayPass, archive_files, replay
from data_jobs.verify import run_verify

HOUR_MS, DAY_MS = 3_600_000, 86_400_000
_COLUMNS = ["payload", "key", "partition", "offset", "kafka_timestamp"]


def envelope(tenant: str, i: int, ts: float) -> bytes:
    """An event as Kafka holds it (``ts`` in epoch ms) or as a file has it (seconds)."""
    return orjson.dumps(
        {
            "event_id": f"b-{i}",
            "source": "bench",
            "tenant": tenant,
            "type": ("click", "view", "purchase", "signup")[i % 4],
            "ts": ts,
            "value": (i * 7) % 1000 / 10,
            "entity": f"user-{i % 5000}",
        }
    )


def rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:>12,.0f} rows/s ({rows:,} rows in {seconds:.2f} s)"


def write_archive(
    settings: Settings, store: S3Store, prefix: str, events: int, files: int, hour: int
) -> None:
    """``events`` records of one hour, ``files`` partitions of ``events.raw``, archived."""
    writer = ArchiveWriter(store, prefix, [settings.kafka.dlq_topic])
    topic = settings.kafka.raw_topic
    chunk = 100_000
    for first in range(0, events, chunk):
        batch = [
            KafkaRecord(
                topic,
                i % files,
                i // files,
                f"bench-batch:user-{i % 5000}".encode(),
                envelope("bench-batch", i, hour + (i * HOUR_MS) // events),
                [],
                hour + (i * HOUR_MS) // events,
            )
            for i in range(first, min(events, first + chunk))
        ]
        writer.write(batch)


def bench_replay(settings: Settings, events: int, files: int) -> None:
    prefix = f"bench-archive/{uuid.uuid4().hex[:8]}"  # this run's own, deleted at the end
    config = dataclasses.replace(replay_config(settings), archive_prefix=prefix)
    store = S3Store(config.history.s3)
    hour = (int(time.time() * 1000) - 2 * DAY_MS) // HOUR_MS * HOUR_MS
    try:
        write_archive(settings, store, prefix, events, files, hour)
        _replay_figures(config, store, hour, events)
    finally:
        for key in store.all_keys(f"{prefix}/"):
            store.delete(key)


def _replay_figures(config: ReplayConfig, store: S3Store, hour: int, events: int) -> None:
    keys = archive_files(store, config.archive_prefix, "raw", hour, hour + HOUR_MS)
    print(f"archive: {events:,} records in {len(keys)} file(s)")
    paths = [f"{store.bucket}/{key}" for key in keys]
    fs = filesystem(config.history.s3)

    started = time.monotonic()
    table = pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=_COLUMNS)
    read_s = time.monotonic() - started
    started = time.monotonic()
    one_process = ReplayPass(config, set(), (hour, hour + HOUR_MS), None)  # as Ray's actors
    passed = 0
    for batch in table.to_batches(max_chunksize=50_000):
        passed += one_process(pa.Table.from_batches([batch])).num_rows
    pass_s = read_s + time.monotonic() - started

    started = time.monotonic()
    found = replay(config, hour, hour + HOUR_MS)
    assert found.events is not None
    replayed = 0
    for batch in found.events.iter_batches(batch_format="pyarrow"):
        assert isinstance(batch, pa.Table)
        replayed += batch.num_rows
    replay_s = time.monotonic() - started
    started = time.monotonic()
    report = run_verify(config, hour, hour + HOUR_MS, "bench-batch")
    verify_s = time.monotonic() - started
    counts = (replayed, passed, report.replayed_events, events)
    assert len(set(counts)) == 1, f"replayed, passed, verified, written: {counts}"

    print(f"  reference, pyarrow.dataset read, 1 process   {rate(table.num_rows, read_s)}")
    print(f"  reference, read + stream's pass, 1 process   {rate(passed, pass_s)}")
    print(f"  replay on Ray Data (read + pass)             {rate(replayed, replay_s)}")
    print(f"  verify on Ray Data (+ shuffle by window)     {rate(events, verify_s)}")
    print(f"  ratio replay / pyarrow.dataset read: {read_s / replay_s:.2f}; "
          f"replay / one-process pass: {pass_s / replay_s:.2f}")  # fmt: skip


async def _upload_source(settings: Settings, tenant: str) -> tuple[str, str]:
    catalog = SourceCatalog(settings.postgres.dsn(), max_size=1)
    try:
        key = await catalog.create_key(tenant, "bench")
        name = f"{tenant}-files"
        await catalog.add_source(Source(name, "upload", tenant), replace=True)
        return key, name
    finally:
        await catalog.close()


def bench_upload(settings: Settings, rows: int) -> None:
    tenant = f"bench-up-{uuid.uuid4().hex[:6]}"
    key, source = asyncio.run(_upload_source(settings, tenant))
    start = int(time.time() * 1000) - 3 * DAY_MS
    body = b"\n".join(envelope(tenant, i, (start + i * 10) / 1000) for i in range(rows)) + b"\n"
    headers = {"authorization": f"Bearer {key}", "content-type": "application/x-ndjson"}
    with httpx.Client(base_url=base_url(settings), headers=headers, timeout=120) as client:
        started = time.monotonic()
        answer = client.post(
            "/v1/uploads", params={"source": source, "filename": "history.ndjson"}, content=body
        )
        assert answer.status_code == 202, answer.text
        status_url = answer.json()["status_url"]
        while True:
            status = client.get(status_url).json()
            if status["state"] in ("done", "failed"):
                break
            time.sleep(0.2)
        took = time.monotonic() - started
    assert status["state"] == "done", status
    assert status["history_written"] == rows, status

    store = S3Store(S3Config.of(settings.s3))
    started = time.monotonic()
    read = pads.dataset(
        f"{store.bucket}/{status['object_key']}", filesystem=filesystem(store.config), format="json"
    ).to_table()
    read_s = time.monotonic() - started
    print(f"historical upload: {len(body) / 1e6:.1f} MB of NDJSON, every row behind the watermark")
    print(f"  reference, pyarrow.dataset read, 1 process   {rate(read.num_rows, read_s)}")
    print(f"  upload to done (publish + history job)       {rate(rows, took)}")
    print(f"  ratio upload / pyarrow.dataset read: {read_s / took:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batch",
        description="Rows/s of the archive replay (verify) and of a historical upload, next "
        "to pyarrow.dataset reading the same files in one process.",
    )
    parser.add_argument("--events", type=int, default=1_000_000, help="archive records")
    parser.add_argument("--files", type=int, default=8, help="archive files they fill")
    parser.add_argument("--upload-rows", type=int, default=200_000, help="rows of the upload")
    args = parser.parse_args()
    settings = load_settings()
    with connected(settings):
        bench_replay(settings, args.events, args.files)
        bench_upload(settings, args.upload_rows)


if __name__ == "__main__":
    main()
