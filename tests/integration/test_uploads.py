"""Uploads end to end on the local services: the uploads app under uvicorn (no Serve),
its job on a Ray instance started in this process, files of every format through S3
into Kafka, and the refusals (401, 404, 413, 415)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fastavro
import httpx
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import uvicorn

from adapters.kafka import end_offsets
from adapters.s3 import S3Config, S3Store
from cluster.settings import Settings
from data_jobs import publish_upload
from serve_apps.upload_handler import UploadsConfig, standalone_app
from tests.integration.conftest import eventually, pg, rayline, read_matching

SMALL_LIMIT = 9 * 1024 * 1024  # over one 8 MiB part, so a refused upload had a part to abort
AVRO = "application/vnd.apache.avro+container"
PART_BYTES = 64 * 1024
TS = "2026-01-01T00:00:{:02d}+00:00"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _serve(config: UploadsConfig) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            standalone_app(config),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start the uploads app within 30 s"
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def job(services: Settings) -> publish_upload.UploadJobConfig:
    """The upload job's settings: NDJSON and Parquet files over 64 KiB come in parts."""
    s = services
    return publish_upload.UploadJobConfig(
        s3=S3Config.of(s.s3),
        dsn=s.postgres.dsn(),
        bootstrap=s.kafka.bootstrap,
        raw_topic=s.kafka.raw_topic,
        dlq_topic=s.kafka.dlq_topic,
        redis_url=s.redis.url(),
        batch_rows=3000,
        part_bytes=PART_BYTES,
    )


@pytest.fixture(scope="module")
def apis(
    services: Settings, local_ray: None, job: publish_upload.UploadJobConfig
) -> Iterator[dict[str, httpx.Client]]:
    """Clients of two uploads apps: the default limit and :data:`SMALL_LIMIT`."""
    s = services
    base = UploadsConfig(
        dsn=s.postgres.dsn(),
        s3=S3Config.of(s.s3),
        dlq_topic=s.kafka.dlq_topic,
        start_job=functools.partial(publish_upload.start, job),
    )
    small = dataclasses.replace(base, max_upload_bytes=SMALL_LIMIT)
    running = [_serve(base), _serve(small)]
    clients = {
        "default": httpx.Client(base_url=running[0][2], timeout=60),
        "small": httpx.Client(base_url=running[1][2], timeout=60),
    }
    yield clients
    for client in clients.values():
        client.close()
    for server, thread, _ in running:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def store(services: Settings) -> S3Store:
    return S3Store(S3Config.of(services.s3))


def _tenant_with_key(settings: Settings) -> tuple[str, str, str]:
    """(tenant, API key, upload source) made with SQL, as `rayline` would make them."""
    tenant = f"t-{uuid.uuid4().hex[:12]}"
    key = f"rl_{uuid.uuid4().hex}"
    pg(settings, "INSERT INTO tenants (id) VALUES ($1)", tenant)
    pg(
        settings,
        "INSERT INTO api_keys (key_hash, tenant) VALUES ($1, $2)",
        hashlib.sha256(key.encode()).hexdigest(),
        tenant,
    )
    source = f"{tenant}-files"
    pg(
        settings,
        "INSERT INTO sources (name, kind, tenant) VALUES ($1, 'upload', $2)",
        source,
        tenant,
    )
    return tenant, key, source


@pytest.fixture
def owner(services: Settings) -> tuple[str, str, str]:
    return _tenant_with_key(services)


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _upload(
    client: httpx.Client, key: str, source: str, filename: str, content_type: str, data: bytes
) -> httpx.Response:
    return client.post(
        "/v1/uploads",
        params={"source": source, "filename": filename},
        headers={**_auth(key), "content-type": content_type},
        content=data,
    )


def _finished(client: httpx.Client, key: str, status_url: str) -> dict[str, Any]:
    def probe() -> dict[str, Any]:
        answer = client.get(status_url, headers=_auth(key))
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    body = eventually(probe, lambda b: b["state"] in ("done", "failed"), timeout=240)
    assert body["state"] == "done", body
    return body


def _sha256(store: S3Store, object_key: str) -> str:
    digest = hashlib.sha256()
    with store.open(object_key) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _publish_and_check(
    settings: Settings,
    client: httpx.Client,
    store: S3Store,
    owner: tuple[str, str, str],
    filename: str,
    content_type: str,
    data: bytes,
    good_ids: set[str],
    bad_indexes: set[int],
) -> dict[str, Any]:
    """Upload ``data``; check S3, both topics and the status counters; return the status."""
    tenant, key, source = owner
    raw_start = end_offsets(settings.kafka.bootstrap, settings.kafka.raw_topic)
    dlq_start = end_offsets(settings.kafka.bootstrap, settings.kafka.dlq_topic)
    answer = _upload(client, key, source, filename, content_type, data)
    assert answer.status_code == 202, answer.text
    sent = answer.json()
    assert sent["size_bytes"] == len(data)
    assert sent["object_key"] == f"uploads/{tenant}/{sent['id']}/{filename}"
    assert _sha256(store, sent["object_key"]) == hashlib.sha256(data).hexdigest()

    status = _finished(client, key, sent["status_url"])
    total = len(good_ids) + len(bad_indexes)
    assert (status["rows_read"], status["rows_accepted"], status["rows_rejected"]) == (
        total,
        len(good_ids),
        len(bad_indexes),
    )
    assert status["rejected_to"] == {
        "topic": settings.kafka.dlq_topic,
        "headers": {"origin.upload": sent["id"]},
    }

    raw = read_matching(
        settings,
        settings.kafka.raw_topic,
        raw_start,
        lambda m: orjson.loads(m.value()).get("source") == source,
        len(good_ids),
    )
    events = [orjson.loads(m.value()) for m in raw]
    assert {e["event_id"] for e in events} == good_ids
    assert {(e["tenant"], e["source"]) for e in events} == {(tenant, source)}

    dead = read_matching(
        settings,
        settings.kafka.dlq_topic,
        dlq_start,
        lambda m: dict(m.headers() or []).get("origin.upload") == sent["id"].encode(),
        len(bad_indexes),
    )
    headers = [{k: v.decode() for k, v in m.headers()} for m in dead]
    assert {h["origin.upload"] for h in headers} == {sent["id"]}
    assert {int(h["origin.index"]) for h in headers} == bad_indexes
    assert all(h["stage"] == "upload" and h["reason"] for h in headers)
    return status


def test_csv_of_20k_rows_lands_in_s3_and_kafka_with_its_bad_rows_dead_lettered(
    services, apis, store, owner
):
    lines = ["event_id,type,ts,entity"]
    good, bad = set(), set()
    for i in range(20_000):
        if i % 1000 == 7:
            lines.append(f"c{i},click,not-a-time,dev{i % 50}")
            bad.add(i)
        else:
            lines.append(f"c{i},click,{TS.format(i % 60)},dev{i % 50}")
            good.add(f"c{i}")
    data = ("\n".join(lines) + "\n").encode()
    status = _publish_and_check(
        services, apis["default"], store, owner, "day.csv", "text/csv", data, good, bad
    )
    assert status["parts"] is None  # CSV: one pass


def test_ndjson_rows_of_another_tenant_or_broken_are_rejected(services, apis, store, owner):
    rows: list[bytes] = []
    good, bad = set(), set()
    for i in range(500):
        row: dict[str, Any] = {"type": "view", "ts": TS.format(i % 60), "entity": f"p{i % 7}"}
        if i == 10:
            row["tenant"] = "someone-else"
            bad.add(i)
        elif i == 20:
            del row["type"]
            bad.add(i)
        else:
            good.add(f"n{i}")
        row["event_id"] = f"n{i}"
        rows.append(orjson.dumps(row))
    rows[30] = b'{"event_id": "n30", "type": '  # cut short: not JSON
    good.discard("n30")
    bad.add(30)
    data = b"\n".join(rows) + b"\n"
    status = _publish_and_check(
        services,
        apis["default"],
        store,
        owner,
        "rows.ndjson",
        "application/x-ndjson",
        data,
        good,
        bad,
    )
    assert status["format"] == "ndjson"
    assert status["parts"] is None  # under one part: one pass, no plan stored


def test_avro_container_rows_without_ids_get_stable_ones(services, apis, store, owner):
    schema = {
        "type": "record",
        "name": "Reading",
        "fields": [
            {"name": "type", "type": "string"},
            {"name": "ts", "type": "string"},
            {"name": "entity", "type": "string"},
            {"name": "value", "type": "double"},
        ],
    }
    records = [
        {
            "type": "temp",
            "ts": "soon" if i % 100 == 5 else TS.format(i % 60),
            "entity": f"s{i % 9}",
            "value": i / 10,
        }
        for i in range(300)
    ]
    buffer = io.BytesIO()
    fastavro.writer(buffer, fastavro.parse_schema(schema), records)
    bad = {i for i in range(300) if i % 100 == 5}
    tenant, key, source = owner
    raw_start = end_offsets(services.kafka.bootstrap, services.kafka.raw_topic)
    data = buffer.getvalue()
    answer = _upload(apis["default"], key, source, "r.avro", AVRO, data)
    assert answer.status_code == 202, answer.text
    upload_id = answer.json()["id"]
    status = _finished(apis["default"], key, answer.json()["status_url"])
    assert (status["rows_read"], status["rows_accepted"], status["rows_rejected"]) == (300, 297, 3)
    raw = read_matching(
        services,
        services.kafka.raw_topic,
        raw_start,
        lambda m: orjson.loads(m.value()).get("source") == source,
        297,
    )
    ids = {orjson.loads(m.value())["event_id"] for m in raw}
    assert ids == {f"{upload_id}-{i}" for i in range(300) if i not in bad}
    assert answer.json()["object_key"].startswith(f"uploads/{tenant}/{upload_id}/")
    assert _sha256(store, answer.json()["object_key"]) == hashlib.sha256(data).hexdigest()


def test_parquet_rows_are_published(services, apis, store, owner):
    count = 400
    table = pa.table(
        {
            "event_id": [f"q{i}" for i in range(count)],
            "type": ["sale" if i != 17 else "bad type!" for i in range(count)],
            "ts": [TS.format(i % 60) for i in range(count)],
            "entity": [f"shop{i % 4}" for i in range(count)],
            "value": [float(i) for i in range(count)],
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=128)
    good = {f"q{i}" for i in range(count) if i != 17}
    _publish_and_check(
        services,
        apis["default"],
        store,
        owner,
        "sales.parquet",
        "application/vnd.apache.parquet",
        buffer.getvalue(),
        good,
        {17},
    )


def test_over_the_limit_is_413_and_leaves_nothing_in_s3(services, apis, store, owner):
    tenant, key, source = owner
    chunk = b"x" * (1024 * 1024)

    def body() -> Iterator[bytes]:  # no Content-Length: the limit is found while streaming
        for _ in range(12):
            yield chunk

    answer = apis["small"].post(
        "/v1/uploads",
        params={"source": source, "filename": "big.csv"},
        headers={**_auth(key), "content-type": "text/csv"},
        content=body(),
    )
    assert answer.status_code == 413, answer.text
    assert str(SMALL_LIMIT) in answer.json()["error"]
    declared = _upload(apis["small"], key, source, "big.csv", "text/csv", chunk * 10)
    assert declared.status_code == 413
    assert store.keys(f"uploads/{tenant}/") == []
    assert store.multipart_uploads(f"uploads/{tenant}/") == []
    assert pg(services, "SELECT count(*) AS n FROM uploads WHERE tenant = $1", tenant)[0]["n"] == 0


def test_refusals_without_key_for_unknown_format_and_for_another_tenant(
    services, apis, store, owner
):
    tenant, key, source = owner
    client = apis["default"]
    data = b"event_id,type,ts\nx1,click,2026-01-01T00:00:00+00:00\n"

    no_key = client.post(
        "/v1/uploads",
        params={"source": source, "filename": "a.csv"},
        headers={"content-type": "text/csv"},
        content=data,
    )
    assert no_key.status_code == 401
    assert "API key" in no_key.json()["error"]

    unknown = _upload(client, key, source, "a.xyz", "application/x-unknown", data)
    assert unknown.status_code == 415, unknown.text

    not_mine = _upload(client, key, "no-such-source", "a.csv", "text/csv", data)
    assert not_mine.status_code == 404

    answer = _upload(client, key, source, "a.csv", "text/csv", data)
    assert answer.status_code == 202, answer.text
    status_url = answer.json()["status_url"]
    _, other_key, _ = _tenant_with_key(services)
    assert client.get(status_url, headers=_auth(other_key)).status_code == 404
    assert client.get(status_url).status_code == 401
    assert _finished(client, key, status_url)["rows_accepted"] == 1
    assert store.keys(f"uploads/{tenant}/") == [answer.json()["object_key"]]


def test_cli_upload_streams_the_file_and_exits_2_when_rows_were_rejected(
    services, apis, owner, tmp_path
):
    _, key, source = owner
    path = tmp_path / "few.csv"
    path.write_text(
        f"event_id,type,ts\nk1,click,{TS.format(1)}\nk2,click,not-a-time\nk3,click,{TS.format(3)}\n"
    )
    base = str(apis["default"].base_url).rstrip("/")
    args = ["upload", str(path), "--source", source, "--api-key", key, "--url", base]
    result = rayline(*args, "--poll-seconds", "0.3", timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "3 rows read · 2 accepted · 1 rejected" in result.stdout
    assert "origin.upload=" in result.stderr.replace("\n", "")

    refused = rayline(
        "upload", str(path), "--source", source, "--api-key", "rl_wrong", "--url", base
    )
    assert refused.returncode == 1
    assert "401" in refused.stderr


def _parts(settings: Settings, upload_id: str) -> list[dict[str, Any]]:
    rows = pg(
        settings,
        "SELECT part, first_index, first_line, rows_read, done FROM upload_parts "
        "WHERE upload_id = $1 ORDER BY part",
        upload_id,
    )
    return [dict(row) for row in rows]


def test_ndjson_over_a_part_is_read_in_parts_with_the_whole_files_indexes_and_lines(
    services, apis, store, owner, job, local_ray
):
    """Parts split the file at byte offsets wherever they fall: in a line, in a run of
    blank lines, in a line over the 1 MiB limit that spans many parts. Every row lands
    once, with the index and line of the whole file; then a part undone is read again
    by a retried job, which restores the counters and publishes only that part."""
    lines: list[bytes] = []
    good: dict[int, str] = {}  # row index -> event id
    bad: dict[int, int] = {}  # row index -> line number
    index = 0
    for i in range(4000):
        if i % 333 == 5:
            lines += [b"", b"   "]  # blank: not rows, but lines
        if i == 2100:
            lines.append(b'{"huge": "' + b"x" * ((1 << 20) + 10) + b'"}')
            bad[index] = len(lines)
            index += 1
        row: dict[str, Any] = {"type": "view", "ts": TS.format(i % 60), "entity": f"p{i % 7}"}
        if i % 500 == 99:
            lines.append(orjson.dumps(row)[:-3])  # cut short: not JSON
            bad[index] = len(lines)
        else:
            lines.append(orjson.dumps(row))
            good[index] = ""
        index += 1
    data = b"\r\n".join(lines) + b"\n"
    _, key, source = owner
    raw_start = end_offsets(services.kafka.bootstrap, services.kafka.raw_topic)
    dlq_start = end_offsets(services.kafka.bootstrap, services.kafka.dlq_topic)
    answer = _upload(apis["default"], key, source, "big.ndjson", "application/x-ndjson", data)
    assert answer.status_code == 202, answer.text
    upload_id = answer.json()["id"]
    status = _finished(apis["default"], key, answer.json()["status_url"])
    assert (status["rows_read"], status["rows_accepted"], status["rows_rejected"]) == (
        index,
        len(good),
        len(bad),
    )
    parts = _parts(services, upload_id)
    assert len(parts) >= len(data) // PART_BYTES, parts
    assert status["parts"] == {"total": len(parts), "done": len(parts)}
    assert all(p["done"] for p in parts)
    assert sum(p["rows_read"] for p in parts) == index

    expected_ids = {f"{upload_id}-{i}" for i in good}
    raw = read_matching(
        services,
        services.kafka.raw_topic,
        raw_start,
        lambda m: orjson.loads(m.value()).get("source") == source,
        len(good) + 1,  # one more than sent: waits out the timeout, finds any copy
        timeout=5,  # the upload is done: Kafka acknowledged every row
    )
    ids = [orjson.loads(m.value())["event_id"] for m in raw]
    assert sorted(ids) == sorted(expected_ids)  # each once
    dead = read_matching(
        services,
        services.kafka.dlq_topic,
        dlq_start,
        lambda m: dict(m.headers() or []).get("origin.upload") == upload_id.encode(),
        len(bad),
    )
    reasons = {
        int(h["origin.index"]): h["reason"]
        for h in ({k: v.decode() for k, v in m.headers()} for m in dead)
    }
    assert reasons.keys() == bad.keys()
    for at, line in bad.items():
        assert reasons[at].startswith(f"line {line} "), (at, line, reasons[at])

    # A part undone (its counts taken back), the upload failed: a retry reads that part.
    redo = parts[1]
    rows = redo["rows_read"]
    first = redo["first_index"]
    rejected = sum(first <= at < first + rows for at in bad)
    pg(
        services,
        "UPDATE upload_parts SET rows_read = 0, done = false WHERE upload_id = $1 AND part = $2",
        upload_id,
        redo["part"],
    )
    pg(
        services,
        "UPDATE uploads SET state = 'failed', rows_read = rows_read - $2, "
        "rows_accepted = rows_accepted - $2 + $3, rows_rejected = rows_rejected - $3 "
        "WHERE id = $1",
        upload_id,
        rows,
        rejected,
    )
    raw_again = end_offsets(services.kafka.bootstrap, services.kafka.raw_topic)
    final = ray.get(publish_upload.start(job, upload_id), timeout=120)
    assert (final["state"], final["rows_read"], final["rows_accepted"]) == (
        "done",
        index,
        len(good),
    )
    assert final["rows_rejected"] == len(bad)
    again = read_matching(
        services,
        services.kafka.raw_topic,
        raw_again,
        lambda m: orjson.loads(m.value()).get("source") == source,
        rows - rejected + 1,
        timeout=5,
    )
    assert sorted(orjson.loads(m.value())["event_id"] for m in again) == sorted(
        f"{upload_id}-{at}" for at in range(first, first + rows) if at in good
    )


def test_parquet_of_many_row_groups_is_read_in_parts(services, apis, store, owner):
    count = 12_000
    table = pa.table(
        {
            "type": ["sale" if i % 1000 != 17 else "bad type!" for i in range(count)],
            "ts": [TS.format(i % 60) for i in range(count)],
            "entity": [f"shop-{i % 4}-" + "x" * 40 for i in range(count)],
            "value": [float(i) for i in range(count)],
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=1000, compression="zstd")
    _, key, source = owner
    raw_start = end_offsets(services.kafka.bootstrap, services.kafka.raw_topic)
    answer = _upload(
        apis["default"],
        key,
        source,
        "s.parquet",
        "application/vnd.apache.parquet",
        buffer.getvalue(),
    )
    assert answer.status_code == 202, answer.text
    upload_id = answer.json()["id"]
    status = _finished(apis["default"], key, answer.json()["status_url"])
    bad = {i for i in range(count) if i % 1000 == 17}
    assert (status["rows_read"], status["rows_rejected"]) == (count, len(bad))
    parts = _parts(services, upload_id)
    assert len(parts) > 1, parts
    assert all(p["done"] for p in parts), parts
    assert [p["first_index"] for p in parts] == sorted({p["first_index"] for p in parts})
    raw = read_matching(
        services,
        services.kafka.raw_topic,
        raw_start,
        lambda m: orjson.loads(m.value()).get("source") == source,
        count - len(bad),
    )
    ids = sorted(orjson.loads(m.value())["event_id"] for m in raw)
    assert ids == sorted(f"{upload_id}-{i}" for i in range(count) if i not in bad)
