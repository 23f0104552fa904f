"""PostgreSQL through asyncpg."""

from __future__ import annotations

import asyncio

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
