"""Attacks through REST API pollers (SSRF), with real HTTP servers on this machine and
the stack's Kafka, PostgreSQL and Redis.

A poll source's URL is chosen by whoever adds the source, and its pages are written by
whoever runs the upstream API. Either could aim the poller, and the source's
credentials, at what it must not reach: the platform's own loopback services, the
cloud metadata address, another host; or stall or swamp it.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from actors.poller import CycleReport, Poller, Topics, poll_source
from actors.poller_supervisor import SUPERVISOR_NAME
from adapters.kafka import AsyncBatchProducer
from adapters.poll_cursors import CursorStore
from adapters.source_stats import SourceStats
from adapters.sources import Source
from cluster.settings import Settings
from core.egress import EgressPolicy, make_policy
from tests.integration.conftest import RAYLINE, deployed_paused, pg, raw_offsets, read_matching

MAPPING = {"event_id": "$.id", "type": "const:item", "ts": "$.created"}
SECRET = f"Bearer secret-{uuid.uuid4().hex}"
Handler = Callable[[BaseHTTPRequestHandler], None]


class Server:
    """A local HTTP server that runs ``handle`` for every GET and logs what it saw."""

    def __init__(self, handle: Handler) -> None:
        seen: list[tuple[str, dict[str, str]]] = []  # (path, headers) of every request
        self.seen = seen

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append((self.path, dict(self.headers)))
                handle(self)

            def log_message(self, *_args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.http.daemon_threads = True
        self.port = self.http.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def servers() -> Iterator[Callable[[Handler], Server]]:
    made: list[Server] = []

    def make(handle: Handler) -> Server:
        made.append(Server(handle))
        return made[-1]

    yield make
    for server in made:
        server.close()


def json_answer(body: Any, headers: dict[str, str] | None = None) -> Handler:
    def handle(request: BaseHTTPRequestHandler) -> None:
        data = json.dumps(body).encode()
        request.send_response(200)
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    return handle


def records(tenant: str, count: int) -> list[dict[str, Any]]:
    return [{"id": f"{tenant}-{i}", "created": int(time.time())} for i in range(count)]


@pytest.fixture(scope="module", autouse=True)
def _deployed_pollers_paused(services: Settings) -> Iterator[None]:
    with deployed_paused(services, SUPERVISOR_NAME):
        yield


@pytest.fixture(scope="module")
def producer(services: Settings) -> Iterator[AsyncBatchProducer]:
    made = AsyncBatchProducer(services.kafka.bootstrap, linger_ms=5, queue_max_messages=10_000)
    yield made
    made.close()


@pytest.fixture
def cycle(
    services: Settings, producer: AsyncBatchProducer, tenant: str
) -> Iterator[Callable[..., CycleReport]]:
    """One poll cycle of a new source of ``tenant`` with ``config``, under ``policy``."""
    names: list[str] = []

    def run(config: dict[str, Any], policy: EgressPolicy) -> CycleReport:
        name = f"ssrf-{uuid.uuid4().hex[:10]}"
        names.append(name)
        source = Source(name=name, kind="poll", tenant=tenant, mapping=MAPPING, config=config)
        cursors = CursorStore(services.postgres.dsn())
        stats = SourceStats(services.redis.url())
        topics = Topics(services.kafka.raw_topic, services.kafka.dlq_topic)
        poller = Poller(
            poll_source(source),
            producer=producer,
            cursors=cursors,
            stats=stats,
            topics=topics,
            egress=policy,
        )
        try:
            return poller.run_cycle()
        finally:
            poller.close()
            cursors.close()
            stats.close()

    yield run
    pg(services, "DELETE FROM source_cursors WHERE source = ANY($1::text[])", names)


def ingested(settings: Settings, start: dict[int, int], tenant: str) -> int:
    found = read_matching(
        settings,
        settings.kafka.raw_topic,
        start,
        lambda record: tenant.encode() in (record.value() or b""),
        1,
        timeout=3,
    )
    return len(found)


ALLOW_LOCAL = make_policy(["127.0.0.1"])


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "2130706433", "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]"]
)
def test_a_poller_aimed_at_loopback_without_an_allowlist_is_refused(
    services: Settings, servers: Callable[[Handler], Server], cycle: Any, tenant: str, host: str
) -> None:
    server = servers(json_answer(records(tenant, 3)))
    start = raw_offsets(services)
    report = cycle({"url": f"http://{host}:{server.port}/items"}, EgressPolicy())
    assert report.error is not None
    assert "loopback" in report.error
    assert "polling.allowed_hosts" in report.error
    assert report.errors == 1  # refused once, not retried
    assert server.seen == []  # nothing was sent
    assert ingested(services, start, tenant) == 0


def test_the_same_poller_with_the_host_allowlisted_reads_the_api(
    services: Settings, servers: Callable[[Handler], Server], cycle: Any, tenant: str
) -> None:
    server = servers(json_answer(records(tenant, 3)))
    report = cycle(
        {"url": f"{server.url}/items", "headers": {"Authorization": SECRET}}, ALLOW_LOCAL
    )
    assert (report.error, report.accepted) == (None, 3)
    assert server.seen[0][1]["Host"] == f"127.0.0.1:{server.port}"


def test_sources_add_refuses_a_loopback_poll_url_and_says_how_to_allow_it() -> None:
    env = {**os.environ, "RAYLINE_POLLING__ALLOWED_HOSTS": "[]"}
    config = json.dumps({"url": "http://169.254.169.254/latest/meta-data/"})
    result = subprocess.run(
        [str(RAYLINE), "sources", "add", f"meta-{uuid.uuid4().hex[:8]}", "--kind", "poll",
         "--tenant", "t-ssrf", "--config", config],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert result.returncode != 0
    said = " ".join((result.stdout + result.stderr).split())
    assert "169.254.169.254, a link-local address" in said
    assert "polling.allowed_hosts" in said


def test_a_next_link_to_another_host_never_receives_the_authorization_header(
    services: Settings, servers: Callable[[Handler], Server], cycle: Any, tenant: str
) -> None:
    catcher = servers(json_answer([]))
    link = f'<http://localhost:{catcher.port}/collect>; rel="next"'
    upstream = servers(json_answer(records(tenant, 2), {"Link": link}))
    start = raw_offsets(services)
    config = {
        "url": f"{upstream.url}/items",
        "headers": {"Authorization": SECRET},
        "pagination": {"type": "link"},
    }
    report = cycle(config, make_policy(["127.0.0.1", "localhost"]))
    assert report.error is not None
    assert "leaves the source's origin" in report.error
    assert SECRET not in report.error
    assert catcher.seen == []
    assert [headers["Authorization"] for _, headers in upstream.seen] == [SECRET]
    assert ingested(services, start, tenant) == 0  # nothing of the refused page


def test_a_redirect_to_another_host_is_not_followed(
    servers: Callable[[Handler], Server], cycle: Any
) -> None:
    catcher = servers(json_answer([]))

    def redirect(request: BaseHTTPRequestHandler) -> None:
        request.send_response(302)
        request.send_header("Location", f"{catcher.url}/collect")
        request.send_header("Content-Length", "0")
        request.end_headers()

    upstream = servers(redirect)
    report = cycle(
        {"url": f"{upstream.url}/items", "headers": {"Authorization": SECRET}}, ALLOW_LOCAL
    )
    assert report.error is not None
    assert "redirects are not followed" in report.error
    assert catcher.seen == []


def test_an_oversized_response_is_cut_off_and_nothing_of_it_is_ingested(
    services: Settings, servers: Callable[[Handler], Server], cycle: Any, tenant: str
) -> None:
    def flood(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.end_headers()  # no Content-Length: the body is read until the server stops
        request.wfile.write(json.dumps(records(tenant, 1)).encode()[:-1])
        try:
            for _ in range(2_000):  # ~8 MB of valid records, if nobody stopped reading
                request.wfile.write(b"," + json.dumps(records(tenant, 64)).encode()[1:-1])
            request.wfile.write(b"]")
        except OSError:
            pass  # the poller hung up: what this test wants

    server = servers(flood)
    start = raw_offsets(services)
    policy = make_policy(["127.0.0.1"], max_response_bytes=64 * 1024)
    report = cycle({"url": f"{server.url}/items", "max_retries": 0}, policy)
    assert report.error is not None
    assert "over polling.max_response_bytes (65536)" in report.error
    assert (report.accepted, report.pages) == (0, 0)
    assert ingested(services, start, tenant) == 0


@pytest.mark.parametrize("stall", ["headers", "body"])
def test_a_slow_response_times_out_with_an_error(
    servers: Callable[[Handler], Server], cycle: Any, stall: str
) -> None:
    def slow(request: BaseHTTPRequestHandler) -> None:
        try:
            if stall == "headers":
                time.sleep(5)
            request.send_response(200)
            request.send_header("Content-Length", "1000")
            request.end_headers()
            for _ in range(20):  # a byte every 0.3 s: each read is quick, the whole is not
                request.wfile.write(b" ")
                request.wfile.flush()
                time.sleep(0.3)
        except OSError:
            pass

    server = servers(slow)
    policy = make_policy(["127.0.0.1"], max_request_seconds=1.0)
    started = time.monotonic()
    report = cycle({"url": f"{server.url}/items", "max_retries": 0}, policy)
    assert time.monotonic() - started < 4
    assert report.error is not None
    assert "Timeout" in report.error or "max_request_seconds" in report.error
