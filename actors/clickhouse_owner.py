"""The one actor that owns the ClickHouse client (chDB allows one process per folder).

Writers and the query API reach ClickHouse through it, with a DSN of ``chdb://`` or
``http(s)://`` alike. Reads never hold writes back: the actor is threaded, with one
concurrency group per kind of work (``owner_concurrency``), and each kind has
connections of its own (``adapters.clickhouse``), so a tenant's ten-second query
delays neither the workers' inserts nor the rollups nor another tenant's query.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
from ray.exceptions import RayActorError, RayError

from adapters.clickhouse import ClickHouseStore, Retention
from adapters.exceptions import StoreUnavailable
from adapters.query_cache import bump_generation
from core.partition_state import WindowResult

OWNER_NAME = "rayline-clickhouse"
WRITES, READS, ROLLUPS = "writes", "reads", "rollups"


def owner_concurrency(read_threads: int) -> dict[str, int]:
    """The actor's concurrency groups: threads for writes, reads, forced rollup steps.

    Writes take turns on one thread and client (a worker's batch is one insert of a few
    milliseconds); reads get ``read_threads`` threads, each with a client of its own.
    Methods without a group (``ping``, ``execute``) run on the default thread.
    """
    return {WRITES: 1, READS: read_threads, ROLLUPS: 1}


log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OwnerConfig:
    """What the owner needs; built from the settings by ``cluster.deploy``."""

    dsn: str
    database: str
    namespace: str = "rayline"
    dimensions: tuple[str, ...] = ()
    """Event attributes the aggregate tables are grouped by (``clickhouse.dimensions``)."""
    retention: Retention = field(default_factory=Retention)
    rollup_interval_seconds: float = 5.0
    """How often the rollups follow the pipeline's sealed watermark; 0 turns that off."""
    coordinator_actor: str = "rayline-coordinator"
    redis_url: str | None = None
    """Where the query cache lives; its entries are invalidated when a chunk is rewritten."""


class ClickHouseOwner:
    """Actor body: ClickHouse stores, migrated on start, and the rollup loop.

    Deployed with ``owner_concurrency`` groups, its methods run on several threads. The
    workers' writes go through one store's write client; the rollup loop's statements
    through a second store's, so a long rollup chunk does not delay an insert; reads
    (``run_query``, ``window_results``, ``rollup_status``...) each borrow a read client
    of their own. The loop asks the coordinator for the sealed watermark and rolls the
    aggregate tables up to it (``adapters.rollups``); a lock keeps two rollup steps
    (the loop's, a forced one) from overlapping.
    """

    def __init__(self, config: OwnerConfig) -> None:
        self._config = config
        self._store = ClickHouseStore(config.dsn, config.database)
        self._store.migrate()
        self._store.apply_retention(config.retention)
        self._rollup_store = ClickHouseStore(config.dsn, config.database)
        self._rollups = self._rollup_store.rollups(config.dimensions)
        self._rollup_lock = threading.Lock()
        self._rollup_error: str | None = None
        self._stopping = threading.Event()
        if config.rollup_interval_seconds > 0:
            threading.Thread(target=self._follow, name="rollups", daemon=True).start()

    def _follow(self) -> None:
        while not self._stopping.wait(self._config.rollup_interval_seconds):
            try:
                coordinator = ray.get_actor(
                    self._config.coordinator_actor, namespace=self._config.namespace
                )
                ref: Any = coordinator.sealed_watermark.remote()
                mark: int | None = ray.get(ref, timeout=30)
                if mark is not None:
                    self.advance_rollups(int(mark))
                self._rollup_error = None
            except (RayError, ValueError, TimeoutError, StoreUnavailable) as exc:
                self._rollup_error = str(exc).splitlines()[0]
                log.warning("rollups did not advance: %s", self._rollup_error)

    @ray.method(concurrency_group=ROLLUPS)
    def advance_rollups(self, sealed_ms: int) -> dict[str, int]:
        """Roll the aggregates up to ``sealed_ms`` (never back); return the sealed points."""
        with self._rollup_lock:
            rewrites = self._rollups.rewrites
            sealed = self._rollups.advance(sealed_ms)
            if self._rollups.rewrites != rewrites and self._config.redis_url:
                bump_generation(self._config.redis_url)
            return sealed

    @ray.method(concurrency_group=ROLLUPS)
    def rebuild_rollups(self, from_ms: int, to_ms: int) -> dict[str, int]:
        """Compute the sealed aggregates of the days in [from, to) again (a backfill)."""
        with self._rollup_lock:
            written = self._rollups.rebuild(from_ms, to_ms)
        if self._config.redis_url:
            bump_generation(self._config.redis_url)
        return written

    def execute(self, sql: str, parameters: dict[str, Any] | None = None) -> None:
        """Run one statement as the owner (operators and the benchmark's seeding; not
        reachable from any HTTP endpoint)."""
        self._store.execute(sql, parameters or {})

    @ray.method(concurrency_group=READS)
    def rollup_status(self) -> dict[str, Any]:
        """Per table its sealed point (epoch ms), and the loop's last error."""
        progress = self._rollups.progress()
        return {
            "sealed": {table: done for table, (done, _pending) in progress.items()},
            "error": self._rollup_error,
        }

    @ray.method(concurrency_group=READS)
    def sealed_windows(self, after_ms: int, limit: int = 10_000) -> list[dict[str, Any]]:
        """Sealed minutes after ``after_ms``, oldest first (``SealedWindow.to_row``)."""
        return [w.to_row() for w in self._rollups.sealed_windows(after_ms, limit)]

    @ray.method(concurrency_group=READS)
    def run_query(
        self, sql: str, parameters: dict[str, Any], settings: dict[str, Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """A read for the query API: (columns, rows); ``QueryRejected`` when refused,
        ``QueryLimitExceeded`` when it ran into a limit of its ``settings``."""
        return self._store.run_query(sql, parameters, settings)

    @ray.method(concurrency_group=WRITES)
    def insert_window_results(self, results: Sequence[WindowResult]) -> int:
        return self._store.insert_window_results(results)

    @ray.method(concurrency_group=WRITES)
    def insert_events(self, table: pa.Table) -> int:
        return self._store.insert_events(table)

    @ray.method(concurrency_group=WRITES)
    def replace_sessions(
        self, from_ms: int, to_ms: int, tenant: str | None, table: pa.Table
    ) -> int:
        return self._store.replace_sessions(from_ms, to_ms, tenant, table)

    @ray.method(concurrency_group=READS)
    def window_results(
        self, tenant: str, type_: str, window: str, from_ms: int, to_ms: int
    ) -> list[WindowResult]:
        return self._store.window_results(tenant, type_, window, from_ms, to_ms)

    @ray.method(concurrency_group=READS)
    def raw_event_stats(self, tenant: str) -> dict[str, int]:
        return self._store.raw_event_stats(tenant)

    @ray.method(concurrency_group=WRITES)
    def ensure_cdc_table(
        self, table: str, columns: Sequence[tuple[str, str]], key: Sequence[str]
    ) -> None:
        self._store.ensure_cdc_table(table, columns, key)

    @ray.method(concurrency_group=WRITES)
    def insert_cdc_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> int:
        return self._store.insert_cdc_rows(table, columns, rows)

    def ping(self) -> bool:
        return self._store.ping()


class RemoteWindowSink:
    """A WindowSink that writes through the owner actor (used inside workers)."""

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace

    def write(self, results: Sequence[WindowResult]) -> int:
        try:
            owner = ray.get_actor(OWNER_NAME, namespace=self._namespace)
            ref: Any = owner.insert_window_results.remote(list(results))
            return int(ray.get(ref))
        except (RayActorError, ValueError) as exc:
            raise StoreUnavailable(f"ClickHouse owner actor is unavailable: {exc}") from exc

    def write_events(self, table: pa.Table) -> int:
        try:
            owner = ray.get_actor(OWNER_NAME, namespace=self._namespace)
            ref: Any = owner.insert_events.remote(table)
            return int(ray.get(ref))
        except (RayActorError, ValueError) as exc:
            raise StoreUnavailable(f"ClickHouse owner actor is unavailable: {exc}") from exc
