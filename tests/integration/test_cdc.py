"""PostgreSQL → Debezium (Kafka Connect) → Kafka → CdcApplier → ClickHouse, and a
restart of Connect in the middle that loses nothing."""

from __future__ import annotations

import asyncio
import threading
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from actors.cdc_applier import CdcApplier
from adapters.clickhouse import ClickHouseStore
from adapters.exceptions import StoreUnavailable
from adapters.kafka import make_consumer
from adapters.redis import CdcPositions
from cluster.settings import Settings
from cluster.stack import LocalStack
from tests.integration.conftest import eventually, rayline


def app_db(settings: Settings, sql: str, *args: Any) -> Any:
    """Run one statement in the captured database (``cdc.database``)."""
    dsn = settings.postgres.model_copy(update={"database": settings.cdc.database}).dsn()

    async def run() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


class LockedStore:
    """The test's chDB store, shared by the applier thread and the test's reads."""

    def __init__(self, folder: Path) -> None:
        self.store = ClickHouseStore(f"chdb://{folder}", "rayline")
        self.store.migrate()
        self.lock = threading.Lock()

    def ensure_cdc_table(self, table: str, columns: Any, key: Any) -> None:
        with self.lock:
            self.store.ensure_cdc_table(table, columns, key)

    def insert_cdc_rows(self, table: str, columns: Any, rows: Any) -> int:
        with self.lock:
            return self.store.insert_cdc_rows(table, columns, rows)

    def rows(self, table: str) -> list[tuple[Any, ...]]:
        with self.lock:
            try:
                found = self.store.cdc_rows(table)
            except StoreUnavailable:  # the table appears with the first change
                return []
        return sorted(_normal(r) for r in found)


def _normal(row: dict[str, Any]) -> tuple[Any, ...]:
    seen = row["seen_at"]
    if seen is not None and seen.tzinfo is None:
        seen = seen.replace(tzinfo=UTC)
    score = None if row["score"] is None else Decimal(row["score"]).quantize(Decimal("0.01"))
    return (row["id"], row["name"], score, seen, row["active"])


def postgres_rows(settings: Settings, table: str) -> list[tuple[Any, ...]]:
    rows = app_db(settings, f"SELECT id, name, score, seen_at, active FROM {table} ORDER BY id")
    return sorted(_normal(dict(r)) for r in rows)


def test_changes_reach_clickhouse_in_order_through_a_connect_restart(
    services: Settings, tmp_path: Path
) -> None:
    settings = services
    table = f"cdc_{uuid.uuid4().hex[:12]}"
    app_db(
        settings,
        f"CREATE TABLE public.{table} (id bigint PRIMARY KEY, name text NOT NULL, "
        "score numeric(10, 2), seen_at timestamptz, active boolean)",
    )
    added = rayline("cdc", "add", "--table", f"public.{table}", timeout=180)
    assert added.returncode == 0, added.stdout + added.stderr
    listed = rayline("cdc", "list")
    assert f"public.{table}" in listed.stdout

    store = LockedStore(tmp_path / "chdb")
    mirror = f"cdc_public_{table}"
    consumer = make_consumer(
        settings.kafka.bootstrap,
        f"test-cdc-{uuid.uuid4().hex[:8]}",
        # Connect creates the change topic with the first change: notice it quickly.
        **{"topic.metadata.refresh.interval.ms": 1000},
    )
    consumer.subscribe([f"{settings.cdc.topic_prefix}.public.{table}"])
    positions = CdcPositions(settings.redis.url())
    applier = CdcApplier(consumer, store, positions=positions)
    stop = threading.Event()
    thread = threading.Thread(target=applier.run, args=(stop,), daemon=True)
    thread.start()
    try:
        now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
        for i in range(1, 21):
            app_db(
                settings,
                f"INSERT INTO {table} VALUES ($1, $2, $3, $4, $5)",
                i,
                f"n{i}",
                Decimal(i) / 4,
                now,
                i % 2 == 0,
            )
        app_db(
            settings, f"UPDATE {table} SET name = name || '-v2', score = score + 1 WHERE id <= 5"
        )
        app_db(settings, f"UPDATE {table} SET name = 'again' WHERE id = 1")
        app_db(settings, f"DELETE FROM {table} WHERE id IN (6, 7, 8)")
        expected = postgres_rows(settings, table)
        assert len(expected) == 17
        mirrored = eventually(lambda: store.rows(mirror), lambda rows: rows == expected, 90)
        assert mirrored == expected

        # Restart Connect while rows keep changing, then change more after it is back.
        restart = threading.Thread(target=LocalStack(settings).restart, args=("connect",))
        restart.start()
        for i in range(21, 31):
            app_db(settings, f"INSERT INTO {table} (id, name) VALUES ($1, $2)", i, f"r{i}")
        app_db(settings, f"DELETE FROM {table} WHERE id IN (2, 3)")
        restart.join(timeout=240)
        assert not restart.is_alive(), "Kafka Connect did not come back within 240 s"
        app_db(settings, f"UPDATE {table} SET active = true, name = 'after' WHERE id >= 25")
        app_db(settings, f"DELETE FROM {table} WHERE id = 30")
        expected = postgres_rows(settings, table)
        assert len(expected) == 24
        mirrored = eventually(lambda: store.rows(mirror), lambda rows: rows == expected, 120)
        assert mirrored == expected
        assert int(positions.read([f"public.{table}"])[0] or 0) > 0
    finally:
        stop.set()
        thread.join(timeout=10)
        consumer.close()
        positions.close()
