"""REST API polling against the real Kafka, PostgreSQL and Redis, and a local HTTP API.

The API is a small http.server in a thread that serves N records in each pagination
style, fails with 500 now and then, answers 429 with ``Retry-After: 1`` once, and
supports ETag/304 and ``since``. Each test has its own tenant and source name.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from actors.poller import Poller, Topics, poll_source
from actors.poller_supervisor import SUPERVISOR_NAME, PollerSupervisor, SupervisorConfig
from adapters.kafka import AsyncBatchProducer, end_offsets
from adapters.poll_cursors import CursorStore
from adapters.source_stats import SourceStats
from adapters.sources import Source
from tests.integration.conftest import deployed_paused, eventually, pg, read_from

SIZE = 5
MAPPING = {"event_id": "$.id", "type": "const:issue", "ts": "$.created", "entity": "$.repo"}


class Api:
    """The API's records and its log; the handler reads it, the test changes it."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.log: list[tuple[float, dict[str, str], int]] = []
        self.fail_every = 0  # every n-th request answers 500 (0: never)
        self.rate_limit_at = -1  # this request number answers 429 Retry-After: 1
        self.fail_from_page = 0  # pages >= this answer 500 for good (0: never)
        self.lock = threading.Lock()
        self.last_etag = ""

    def add(self, first: int, last: int, bad: tuple[int, ...] = ()) -> None:
        now = int(time.time())
        for n in range(first, last):
            record = {"id": n, "updated": 1000 + n, "created": now - 60, "repo": f"r{n % 3}"}
            if n in bad:
                del record["id"]
            self.records.append(record)

    def answer(self, path: str, params: dict[str, str], etag: str | None) -> tuple[int, dict, Any]:
        with self.lock:
            number = len(self.log)
            status, headers, body = self._answer(number, path, params, etag)
            self.log.append((time.monotonic(), params, status))
            return status, headers, body

    def _answer(self, number: int, path: str, params: dict[str, str], etag: str | None) -> Any:
        if number == self.rate_limit_at:
            return 429, {"Retry-After": "1"}, {"error": "slow down"}
        if self.fail_every and number % self.fail_every == self.fail_every - 1:
            return 500, {}, {"error": "flaky"}
        if self.fail_from_page and int(params.get("page", 0)) >= self.fail_from_page:
            return 500, {}, {"error": "down"}
        rows = self.records
        if "since" in params:
            rows = [r for r in rows if r["updated"] > int(params["since"])]
        style = path.strip("/").split("/")[0]
        start = {
            "page": (int(params.get("page", 1)) - 1) * SIZE,
            "cursor": int(params.get("cursor", 0)),
        }.get(style, int(params.get("offset", 0)))
        size = SIZE if style != "none" else len(rows)
        page = rows[start : start + size]
        more = start + size < len(rows)
        body = {"data": page, "next": str(start + size) if more else None}
        tag = '"' + hashlib.sha256(json.dumps(body).encode()).hexdigest()[:16] + '"'
        if etag == tag:
            return 304, {"ETag": tag}, None
        headers = {"ETag": tag}
        self.last_etag = tag
        if more:
            query = "&".join(f"{k}={v}" for k, v in {**params, "offset": start + size}.items())
            headers["Link"] = f'</{style}/items?{query}>; rel="next"'
        return 200, headers, body


def serve(api: Api) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            status, headers, body = api.answer(
                parts.path, dict(parse_qsl(parts.query)), self.headers.get("If-None-Match")
            )
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def api() -> Iterator[tuple[Api, str]]:
    state = Api()
    server = serve(state)
    yield state, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module", autouse=True)
def _deployed_pollers_paused(services):
    """In a full run the deployed supervisor would poll these tests' sources too."""
    with deployed_paused(services, SUPERVISOR_NAME):
        yield


@pytest.fixture(scope="module")
def producer(services):
    p = AsyncBatchProducer(services.kafka.bootstrap, linger_ms=5, queue_max_messages=10_000)
    yield p
    p.close()


ADDED: list[str] = []


@pytest.fixture(autouse=True)
def _remove_sources(services):
    """Sources of a test point at its own API server: drop them when it is gone."""
    yield
    pg(services, "DELETE FROM sources WHERE name = ANY($1::text[])", ADDED)
    ADDED.clear()


def add_source(settings, tenant: str, config: dict[str, Any], enabled: bool = True) -> Source:
    name = f"poll-{uuid.uuid4().hex[:10]}"
    ADDED.append(name)
    pg(settings, "INSERT INTO tenants (id) VALUES ($1) ON CONFLICT DO NOTHING", tenant)
    pg(
        settings,
        "INSERT INTO sources (name, kind, tenant, mapping, config, enabled) "
        "VALUES ($1, 'poll', $2, $3::jsonb, $4::jsonb, $5)",
        name,
        tenant,
        json.dumps(MAPPING),
        json.dumps(config),
        enabled,
    )
    return Source(name=name, kind="poll", tenant=tenant, mapping=MAPPING, config=config)


def run_cycle(settings, producer, source: Source):
    """One cycle of a fresh Poller (a restart each time), with its own connections."""
    cursors = CursorStore(settings.postgres.dsn())
    stats = SourceStats(settings.redis.url())
    topics = Topics(settings.kafka.raw_topic, settings.kafka.dlq_topic)
    poller = Poller(
        poll_source(source),
        producer=producer,
        cursors=cursors,
        stats=stats,
        topics=topics,
        egress=settings.polling.policy(),  # the test stack allowlists 127.0.0.1
    )
    try:
        return poller.run_cycle()
    finally:
        poller.close()
        cursors.close()
        stats.close()


def offsets(settings) -> dict[str, dict[int, int]]:
    k = settings.kafka
    return {t: end_offsets(k.bootstrap, t) for t in (k.raw_topic, k.dlq_topic)}


def events(settings, topic: str, start: dict[int, int], tenant: str) -> list[dict[str, Any]]:
    """Every envelope of ``tenant`` written to ``topic`` after ``start`` (waits 3 s idle)."""
    found = read_from(settings, topic, start, 100_000, timeout=3)
    out: list[dict[str, Any]] = []
    for msg in found:
        if topic == settings.kafka.raw_topic:
            value = json.loads(msg.value())
            if value["tenant"] == tenant:
                out.append(value)
        else:
            headers = {k: v.decode() for k, v in msg.headers() or []}
            if headers.get("origin.tenant") == tenant:
                out.append({"headers": headers, "value": json.loads(msg.value())})
    return out


def cursor_of(settings, source: Source) -> dict[str, Any]:
    rows = pg(settings, "SELECT cursor FROM source_cursors WHERE source = $1", source.name)
    assert rows, f"no cursor saved for {source.name}"
    return dict(json.loads(rows[0]["cursor"]))


STYLES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "page": ({"type": "page", "page_size": SIZE}, {"page": 5, "skip": 3}),
    "offset": ({"type": "offset", "page_size": SIZE}, {"offset": 23}),
    "cursor": (
        {"type": "cursor", "page_size": SIZE, "cursor_path": "$.next"},
        {"cursor": "20", "skip": 3},
    ),
    "link": ({"type": "link", "page_size": SIZE}, {"skip": 3}),
}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_record_reaches_kafka_once_and_a_restart_reads_only_new_ones(
    services, producer, api, tenant, style
):
    state, base = api
    state.add(0, 23, bad=(4, 17))
    state.fail_every = 4
    state.rate_limit_at = 2
    pagination, want_cursor = STYLES[style]
    config = {
        "url": f"{base}/{style}/items",
        "records_path": "$.data",
        "pagination": pagination,
        "headers": {"Authorization": "Bearer not-logged"},
        "backoff_base_seconds": 0.05,
        "backoff_max_seconds": 0.2,
    }
    source = add_source(services, tenant, config)
    start = offsets(services)

    report = run_cycle(services, producer, source)

    assert report.error is None, report.error
    raw = events(services, services.kafka.raw_topic, start[services.kafka.raw_topic], tenant)
    ids = sorted(int(e["event_id"]) for e in raw)
    assert ids == [n for n in range(23) if n not in (4, 17)], "a record was lost or repeated"
    assert {(e["source"], e["tenant"], e["type"]) for e in raw} == {(source.name, tenant, "issue")}
    dlq = events(services, services.kafka.dlq_topic, start[services.kafka.dlq_topic], tenant)
    assert sorted(d["value"]["updated"] for d in dlq) == [1004, 1017]
    for d in dlq:
        assert "event_id" in d["headers"]["reason"]
        assert (d["headers"]["stage"], d["headers"]["origin.source"]) == ("poll", source.name)
    limited = [i for i, (_, _, status) in enumerate(state.log) if status == 429]
    assert limited == [2]
    assert state.log[3][0] - state.log[2][0] >= 1.0, "a request came before Retry-After ended"
    assert any(status == 500 for _, _, status in state.log), "the API never failed"
    cursor = cursor_of(services, source)
    assert {k: v for k, v in cursor.items() if k in want_cursor} == want_cursor

    state.add(23, 27)
    state.fail_every, asked = 0, len(state.log)
    again = run_cycle(services, producer, source)

    assert again.error is None, again.error
    raw = events(services, services.kafka.raw_topic, start[services.kafka.raw_topic], tenant)
    ids = sorted(int(e["event_id"]) for e in raw)
    assert ids == [n for n in range(27) if n not in (4, 17)]
    assert len(state.log) - asked <= 3, f"the restart asked again for old pages: {state.log}"


def test_since_and_etag_ask_only_for_what_changed(services, producer, api, tenant):
    state, base = api
    state.add(0, 8)
    incremental = add_source(
        services,
        tenant,
        {
            "url": f"{base}/page/items",
            "records_path": "$.data",
            "pagination": {"type": "page", "page_size": SIZE},
            "incremental": {"param": "since", "path": "$.updated", "initial": 0},
        },
    )
    whole = add_source(services, tenant, {"url": f"{base}/none/items", "records_path": "$.data"})
    start = offsets(services)
    assert run_cycle(services, producer, incremental).accepted == 8
    assert run_cycle(services, producer, whole).accepted == 8
    assert cursor_of(services, incremental)["since"] == 1007

    state.add(8, 10)
    asked = len(state.log)
    assert run_cycle(services, producer, incremental).accepted == 2
    assert [p.get("since") for _, p, _ in state.log[asked:]] == ["1007"]
    unchanged = run_cycle(services, producer, whole)
    assert (unchanged.accepted, state.log[-1][2]) == (10, 200)
    not_modified = run_cycle(services, producer, whole)
    assert (not_modified.accepted, not_modified.stopped, state.log[-1][2]) == (
        0,
        "not modified",
        304,
    )
    raw = events(services, services.kafka.raw_topic, start[services.kafka.raw_topic], tenant)
    by_source: dict[str, list[int]] = {}
    for e in raw:
        by_source.setdefault(e["source"], []).append(int(e["event_id"]))
    assert sorted(by_source[incremental.name]) == list(range(10))
    # Without since, the whole list comes again; the pipeline's dedup drops the copies.
    assert sorted(by_source[whole.name]) == sorted([*range(8), *range(10)])


def test_a_poll_that_dies_mid_way_resumes_from_the_saved_cursor(services, producer, api, tenant):
    state, base = api
    state.add(0, 18)
    state.fail_from_page = 3
    config = {
        "url": f"{base}/page/items",
        "records_path": "$.data",
        "pagination": {"type": "page", "page_size": SIZE},
        "max_retries": 1,
        "backoff_base_seconds": 0.01,
    }
    source = add_source(services, tenant, config)
    start = offsets(services)

    failed = run_cycle(services, producer, source)

    assert failed.error is not None
    assert "answered 500" in failed.error
    assert (failed.pages, failed.accepted) == (2, 10)
    assert {k: v for k, v in cursor_of(services, source).items() if k != "etag_key"} == {
        "page": 3,
        "skip": 0,
        "etag": state.last_etag,
    }
    state.fail_from_page, asked = 0, len(state.log)
    resumed = run_cycle(services, producer, source)
    assert resumed.error is None
    assert state.log[asked][1]["page"] == "3", "the restart did not resume at page 3"
    raw = events(services, services.kafka.raw_topic, start[services.kafka.raw_topic], tenant)
    assert sorted(int(e["event_id"]) for e in raw) == list(range(18))


def test_the_supervisor_runs_added_sources_and_stops_disabled_ones(services, api, tenant):
    state, base = api
    state.add(0, 7)
    k = services.kafka
    supervisor = PollerSupervisor(
        SupervisorConfig(
            dsn=services.postgres.dsn(),
            bootstrap=k.bootstrap,
            raw_topic=k.raw_topic,
            dlq_topic=k.dlq_topic,
            redis_url=services.redis.url(),
            refresh_seconds=0.3,
            egress=services.polling.policy(),
        )
    )
    try:
        config = {"url": f"{base}/offset/items", "records_path": "$.data", "interval_seconds": 0.2}
        config |= {"pagination": {"type": "offset", "page_size": SIZE}, "etag": False}
        source = add_source(services, tenant, config)
        broken = add_source(services, tenant, {"url": "nowhere"})
        status = eventually(
            supervisor.status, lambda s: s.get(source.name, {}).get("events") == 7, timeout=20
        )
        assert status[source.name]["cursor"] == {"offset": 7}
        assert status[broken.name]["state"] == "invalid"
        assert "'url' expected an http" in status[broken.name]["last_error"]

        pg(services, "UPDATE sources SET enabled = false WHERE name = $1", source.name)
        eventually(supervisor.status, lambda s: s[source.name]["state"] == "disabled", timeout=10)
        time.sleep(0.6)
        asked = len(state.log)
        state.add(7, 9)
        time.sleep(1.0)
        assert len(state.log) == asked, "a disabled source kept polling"

        pg(services, "UPDATE sources SET enabled = true WHERE name = $1", source.name)
        status = eventually(
            supervisor.status, lambda s: s[source.name]["cursor"] == {"offset": 9}, timeout=20
        )
        assert status[source.name]["state"] in ("polling", "waiting")

        assert supervisor.pause(timeout=20), "runners did not stop within 20 s"
        asked = len(state.log)
        state.add(9, 11)
        time.sleep(1.0)
        assert len(state.log) == asked, "a paused supervisor kept polling"
        supervisor.resume()
        eventually(supervisor.status, lambda s: s[source.name]["cursor"] == {"offset": 11}, 20)
    finally:
        supervisor.stop()
