"""The integration tier: the real local stack, started once per session by `rayline up`
and stopped at the end by `rayline down`. Tests isolate themselves by uuid tenants.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import orjson
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Consumer, TopicPartition

from adapters.kafka import end_offsets
from adapters.s3 import S3Config, S3Store, filesystem
from adapters.sources import SourceCatalog
from cluster import local_secrets
from cluster.processes import port_open
from cluster.settings import Settings, load_settings

RAYLINE = Path(sys.executable).parent / "rayline"
# The install's secrets exist before the session's `rayline up` (which would make them),
# so that this process's drivers carry the stack's Ray token from the first `ray.init()`
# on: Ray reads RAY_AUTH_MODE and the token once. A local `ray.init()` in a test
# (uploads run their job on one) uses the same token.
local_secrets.ensure(load_settings().paths.state_dir)
local_secrets.export_ray_environment(load_settings())
import ray  # noqa: E402  (after its auth environment, which it reads on import)

from data_jobs.replay import archive_files  # noqa: E402  (imports ray)

T = TypeVar("T")


def rayline(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run the real command line, as a user would."""
    return subprocess.run(
        [str(RAYLINE), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that stop the stack run after every other test; `after_others` just before.
    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("stack_teardown") is not None:
            return 2
        return 1 if item.get_closest_marker("after_others") is not None else 0

    items.sort(key=rank)


# The test stack runs the product's default lateness (5 s), except for tenants named
# `t-*` and `al-*` (the `tenant` fixture's, the alerting tests'), which are allowed an
# hour, so that tests may place their events at known times in the recent past. Each
# tenant has watermarks of its own, so no test's events make another's late. Tests that
# need windows closed use a `live_tenant` with the default lateness, stamp their events
# now, and wait for the watermark (a minute at most). Rollups seal no minute before an
# hour has passed (the largest lateness), so alerting tests seal minutes on purpose.
# Enrichment, group-by, a filter transform and quick reloads are on too: they touch only
# events whose entities are in `dim_devices` or whose type is `debug`. The aggregate
# tables are grouped by the attribute `region`.
STACK_ENV = {
    "RAYLINE_PIPELINE__ALLOWED_LATENESS_BY_TENANT": '{"t-*": 3600, "al-*": 3600}',
    "RAYLINE_PIPELINE__ENRICHMENT": orjson.dumps(
        [{"table": "dim_devices", "key": "device", "on": "entity", "columns": ["site"]}]
    ).decode(),
    "RAYLINE_PIPELINE__GROUP_BY": '["site"]',
    "RAYLINE_PIPELINE__TRANSFORMS": orjson.dumps([{"filter": "type != 'debug'"}]).decode(),
    "RAYLINE_PIPELINE__ENRICHMENT_TTL_SECONDS": "1",
    "RAYLINE_PIPELINE__RULES_REFRESH_SECONDS": "1",
    "RAYLINE_CLICKHOUSE__DIMENSIONS": '["region"]',
    # Pollers are refused loopback by default (SSRF); the tests' APIs listen on 127.0.0.1.
    "RAYLINE_POLLING__ALLOWED_HOSTS": '["127.0.0.1"]',
    # The archive replay's test waits for the archiver: it writes every 2 s, not 60.
    "RAYLINE_ARCHIVE__FLUSH_SECONDS": "2",
}


@pytest.fixture(scope="session")
def settings() -> Iterator[Settings]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in STACK_ENV.items():
            patch.setenv(name, value)
        yield load_settings()


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[Settings]:
    result = rayline("up")
    assert result.returncode == 0, f"rayline up failed:\n{result.stdout}\n{result.stderr}"
    pg(settings, "CREATE TABLE IF NOT EXISTS dim_devices (device text PRIMARY KEY, site text)")
    yield settings
    rayline("down")


@pytest.fixture(scope="session")
def services(settings: Settings) -> Iterator[Settings]:
    """The local services (Kafka, PostgreSQL, Redis, S3, Connect, Mosquitto) without the
    Ray deployment, for tests that run a component in-process against them. A test
    session that also uses ``stack`` gets the same services (``up`` keeps what runs)."""
    result = rayline("up", "--services-only")
    assert result.returncode == 0, f"rayline up failed:\n{result.stdout}\n{result.stderr}"
    yield settings
    rayline("down")


@contextmanager
def deployed_paused(
    settings: Settings, name: str, pause: str = "pause", resume: str = "resume"
) -> Iterator[None]:
    """Pause a deployed source actor (the poller supervisor, the MQTT bridge) while a test
    runs the same component in-process, so that the two never both take one input;
    resume it afterwards. Without a Ray head (services-only runs) there is none."""

    def call(method: str) -> bool:
        if not port_open(settings.ray.port, settings.ray.host):
            return False
        ray.init(
            address=settings.ray.address, namespace=settings.ray.namespace, log_to_driver=False
        )
        try:
            actor = ray.get_actor(name, namespace=settings.ray.namespace)
            ray.get(getattr(actor, method).remote(), timeout=120)
            return True
        except ValueError:  # not deployed
            return False
        finally:
            ray.shutdown()

    paused = call(pause)
    try:
        yield
    finally:
        if paused:
            call(resume)


def catalog_call(settings: Settings, work: Callable[[SourceCatalog], Awaitable[T]]) -> T:
    """Run ``work`` on a source catalog of the stack's PostgreSQL (sources, keys)."""

    async def go() -> T:
        catalog = SourceCatalog(settings.postgres.dsn(), max_size=1)
        try:
            return await work(catalog)
        finally:
            await catalog.close()

    return asyncio.run(go())


def api_key(settings: Settings, tenant: str, label: str = "integration tests") -> str:
    """A new API key of ``tenant`` (the tenant is created when missing)."""
    return catalog_call(settings, lambda c: c.create_key(tenant, label))


def pg(settings: Settings, sql: str, *args: Any) -> Any:
    """Run one statement in Rayline's PostgreSQL database; return its rows."""

    async def run() -> Any:
        conn = await asyncpg.connect(settings.postgres.dsn())
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.fixture
def driver(stack: Settings) -> Iterator[None]:
    """A Ray driver connected to the stack's cluster, for tests that call actors."""
    ray.init(address=stack.ray.address, namespace=stack.ray.namespace, log_to_driver=False)
    yield
    ray.shutdown()


def workers(stack: Settings) -> list[Any]:
    """Handles of the current epoch's partition workers (needs ``driver``)."""
    coordinator = ray.get_actor("rayline-coordinator", namespace=stack.ray.namespace)
    ref: Any = coordinator.status.remote()
    status: dict[str, Any] = ray.get(ref)
    return [
        ray.get_actor(
            f"rayline-worker-{status['epoch']}-{w['worker']}", namespace=stack.ray.namespace
        )
        for w in status["workers"]
    ]


@pytest.fixture(scope="session")
def platform_key(stack: Settings) -> str:
    """A key that may write events of any tenant (tests use a new tenant each)."""
    made = rayline("keys", "add", "*", "--label", "integration tests")
    assert made.returncode == 0, made.stderr
    return made.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def http(stack: Settings, platform_key: str) -> Iterator[httpx.Client]:
    base = f"http://{stack.serve.host}:{stack.serve.port}"
    headers = {"authorization": f"Bearer {platform_key}"}
    with httpx.Client(base_url=base, timeout=30, headers=headers) as client:
        yield client


@pytest.fixture
def tenant() -> str:
    """A new tenant allowed an hour of lateness (see STACK_ENV)."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def live_tenant() -> str:
    """A new tenant with the default lateness: its windows close soon after real time."""
    return f"live-{uuid.uuid4().hex[:12]}"


def eventually(probe: Callable[[], T], done: Callable[[T], bool], timeout: float = 60) -> T:
    """Call ``probe`` until ``done`` holds for its value, and return that value.

    Raises:
        AssertionError: ``done`` still did not hold after ``timeout`` seconds; the
            message shows the last value seen.
    """
    deadline = time.monotonic() + timeout
    value = probe()
    while not done(value):
        if time.monotonic() >= deadline:
            raise AssertionError(f"not done after {timeout} s; last value: {value!r:.2000}")
        time.sleep(0.3)
        value = probe()
    return value


def raw_offsets(settings: Settings) -> dict[int, int]:
    return end_offsets(settings.kafka.bootstrap, settings.kafka.raw_topic)


def read_from(
    settings: Settings, topic: str, start: dict[int, int], count: int, timeout: float = 30
) -> list[Any]:
    """Read ``count`` records of ``topic`` written after the ``start`` offsets."""
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka.bootstrap, "group.id": f"test-{uuid.uuid4()}"}
    )
    try:
        consumer.assign([TopicPartition(topic, p, o) for p, o in start.items()])
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(records) < count and time.monotonic() < deadline:
            for msg in consumer.consume(count - len(records), 0.5):
                if msg.error() is None:
                    records.append(msg)
        return records
    finally:
        consumer.close()


def read_matching(
    settings: Settings,
    topic: str,
    start: dict[int, int],
    keep: Callable[[Any], bool],
    count: int,
    timeout: float = 60,
) -> list[Any]:
    """Read ``topic`` from ``start`` until ``count`` records pass ``keep`` (or time runs
    out): other components of a full run write to the same topics meanwhile."""
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka.bootstrap, "group.id": f"test-{uuid.uuid4()}"}
    )
    try:
        consumer.assign([TopicPartition(topic, p, o) for p, o in start.items()])
        kept: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(kept) < count and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is None and keep(msg):
                    kept.append(msg)
        return kept
    finally:
        consumer.close()


def archived_events(settings: Settings, tenant: str, from_ms: int, to_ms: int) -> int:
    """Rows of ``tenant`` that the archive's manifests list in ``[from_ms, to_ms)``: a
    cheap wait for the archiver before a job that replays the archive."""
    store = S3Store(S3Config.of(settings.s3))
    fs = filesystem(store.config)
    found = 0
    for key in archive_files(store, settings.archive.prefix, "raw", from_ms, to_ms):
        table = pq.read_table(f"{store.bucket}/{key}", filesystem=fs, columns=["tenant", "ts"])
        ts = pc.cast(table["ts"], "int64")
        inside = pc.and_(pc.equal(table["tenant"], tenant), pc.greater_equal(ts, from_ms))
        found += int(pc.sum(pc.and_(inside, pc.less(ts, to_ms))).as_py() or 0)
    return found
