"""PostgreSQL through asyncpg."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from adapters.exceptions import StoreUnavailable


async def _ensure_database(admin_dsn: str, database: str) -> bool:
    conn = await asyncpg.connect(admin_dsn, timeout=5)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if exists:
            return False
        # A database name cannot be a bound parameter; quote it as an identifier.
        quoted = '"' + database.replace('"', '""') + '"'
        await conn.execute(f"CREATE DATABASE {quoted}")
        return True
    finally:
        await conn.close()


def ensure_database(admin_dsn: str, database: str) -> bool:
    """Create ``database`` when missing; True when it was created now."""
    try:
        return asyncio.run(_ensure_database(admin_dsn, database))
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        raise StoreUnavailable(f"PostgreSQL did not create database {database!r}: {exc}") from exc


async def _ping(dsn: str) -> bool:
    conn = await asyncpg.connect(dsn, timeout=2)
    try:
        return await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


def answers(dsn: str) -> bool:
    """True when PostgreSQL accepts a connection and runs a query."""
    try:
        return asyncio.run(_ping(dsn))
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False


_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE SEQUENCE IF NOT EXISTS coordinator_epoch;
        CREATE TABLE IF NOT EXISTS partition_checkpoints (
            topic text NOT NULL,
            partition integer NOT NULL,
            epoch bigint NOT NULL,
            next_offset bigint NOT NULL,
            state bytea NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (topic, partition)
        );
        """,
    ),
)


async def _migrate(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for version, sql in _MIGRATIONS:
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied.append(version)
        return applied
    finally:
        await conn.close()


def migrate(dsn: str) -> list[int]:
    """Bring Rayline's PostgreSQL schema up to date; return the versions applied now."""
    try:
        return asyncio.run(_migrate(dsn))
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        raise StoreUnavailable(f"PostgreSQL migration failed: {exc}") from exc


class CheckpointStore:
    """Partition snapshots with epoch fencing, for use from one (non-async) thread.

    ``save`` writes a partition's snapshot only when no newer epoch has written one for
    it, and says which partitions it wrote. A snapshot returned by ``load`` is the last
    one saved, whole (one row, one statement).
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._loop = asyncio.new_event_loop()
        self._conn: asyncpg.Connection | None = None

    def _call(self, sql: str, *args: object, fetch: str = "fetchrow") -> object:
        async def run() -> object:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(self._dsn, timeout=10)
            return await getattr(self._conn, fetch)(sql, *args, timeout=30)

        try:
            return self._loop.run_until_complete(run())
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            self._conn = None
            raise StoreUnavailable(f"PostgreSQL checkpoint store failed: {exc}") from exc

    def next_epoch(self) -> int:
        return int(self._call("SELECT nextval('coordinator_epoch')", fetch="fetchval"))  # type: ignore[call-overload]

    def load(self, topic: str, partition: int) -> tuple[int, int, bytes] | None:
        """(epoch, next offset, state) of the last snapshot, or None."""
        row: Any = self._call(
            "SELECT epoch, next_offset, state FROM partition_checkpoints "
            "WHERE topic = $1 AND partition = $2",
            topic,
            partition,
        )
        return None if row is None else (row["epoch"], row["next_offset"], bytes(row["state"]))

    def save(self, topic: str, epoch: int, snapshots: dict[int, tuple[int, bytes]]) -> set[int]:
        """Save {partition: (next offset, state)} in one statement; return the partitions
        saved. A partition missing from the answer belongs to a newer epoch (fenced)."""
        if not snapshots:
            return set()
        partitions = sorted(snapshots)
        rows: Any = self._call(
            "INSERT INTO partition_checkpoints AS c (topic, partition, epoch, next_offset, state) "
            "SELECT $1, p, $2, o, s FROM unnest($3::integer[], $4::bigint[], $5::bytea[]) "
            "AS t(p, o, s) "
            "ON CONFLICT (topic, partition) DO UPDATE SET epoch = EXCLUDED.epoch, "
            "next_offset = EXCLUDED.next_offset, state = EXCLUDED.state, updated_at = now() "
            "WHERE c.epoch <= EXCLUDED.epoch RETURNING partition",
            topic,
            epoch,
            partitions,
            [snapshots[p][0] for p in partitions],
            [snapshots[p][1] for p in partitions],
            fetch="fetch",
        )
        return {int(r["partition"]) for r in rows}

    def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            self._loop.run_until_complete(self._conn.close())
        self._loop.close()
