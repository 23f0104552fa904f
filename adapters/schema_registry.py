"""The schema registry's store: Confluent-style subjects and versions in PostgreSQL.

It shares its tables with the pipeline (``adapters.postgres.MetadataStore`` and the
``rayline schemas`` commands): ``schemas`` holds each schema once, under one global id,
found by its fingerprint; ``subject_versions`` lists a subject's versions of ids;
``subject_config`` holds compatibility levels, the global one under subject ``''``.
It reads the ``sources`` table too (:meth:`SchemaRegistryStore.source_owners`): which
tenant owns a source decides which tenant may write its subjects.

Registration is one transaction that first takes an advisory lock on the subject
(``pg_advisory_xact_lock(hashtext(subject))``), so that two registrations under one
subject run one after the other and the second is checked against the first: both
cannot pass a compatibility check that only one of them would pass against the other.

Deleting is permanent and removes only a subject's versions: the schema stays under its
id, because records already written to Kafka name that id and must still decode.
Version numbers continue from the highest remaining one.

All methods are coroutines on one asyncpg pool, created on first use in the event loop
that uses it. Driver errors come out as :class:`adapters.exceptions.StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg

from adapters.exceptions import StoreUnavailable

__all__ = [
    "GLOBAL",
    "Incompatible",
    "Registered",
    "SchemaRegistryStore",
    "SubjectVersion",
]

GLOBAL = ""
"""The ``subject_config`` row of the global compatibility level."""

CompatibilityCheck = Callable[[str, Sequence[str]], list[str]]
"""(level, texts of the subject's versions oldest first) -> problems; empty when it may join."""


class Incompatible(Exception):
    """A schema breaks the subject's compatibility level; nothing was registered."""

    def __init__(self, subject: str, level: str, problems: list[str]) -> None:
        super().__init__(f"subject {subject!r} ({level}): " + "; ".join(problems))
        self.subject = subject
        self.level = level
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Registered:
    """A schema under a subject: its global id, the subject's version, and whether it is new."""

    schema_id: int
    version: int
    created: bool


@dataclass(frozen=True, slots=True)
class SubjectVersion:
    """One version of a subject with the schema's id and text."""

    subject: str
    version: int
    schema_id: int
    schema: str


_DRIVER_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class SchemaRegistryStore:
    """Subjects, versions, schemas and compatibility levels on an asyncpg pool."""

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 4) -> None:
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        try:
            pool = await self._get_pool()
            async with pool.acquire(timeout=10) as conn:
                yield conn
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"schema registry store (PostgreSQL) failed: {exc}") from exc

    async def _get_pool(self) -> asyncpg.Pool:
        async with self._lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    timeout=10,
                    command_timeout=30,
                )
            return self._pool

    # Registration ----------------------------------------------------------------------

    async def register(
        self,
        subject: str,
        text: str,
        fingerprint: str,
        check: CompatibilityCheck,
        default_level: str,
    ) -> Registered:
        """Add ``text`` to ``subject`` as its next version, unless it is there already.

        A schema already among the subject's versions gets its id and version back,
        unchecked. Otherwise ``check`` runs on the subject's effective level and the
        texts of its versions, inside the transaction that then writes the version.

        Raises:
            Incompatible: when ``check`` finds problems; nothing was written.
        """
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", subject)
            rows = await conn.fetch(
                "SELECT v.version, s.id, s.fingerprint, s.schema FROM subject_versions v "
                "JOIN schemas s ON s.id = v.schema_id WHERE v.subject = $1 ORDER BY v.version",
                subject,
            )
            for row in rows:
                if row["fingerprint"] == fingerprint:
                    return Registered(int(row["id"]), int(row["version"]), created=False)
            level = await self._level(conn, subject, default_level)
            problems = check(level, [str(r["schema"]) for r in rows])
            if problems:
                raise Incompatible(subject, level, problems)
            schema_id = await conn.fetchval(
                "INSERT INTO schemas (schema, fingerprint) VALUES ($1, $2) "
                "ON CONFLICT (fingerprint) DO UPDATE SET fingerprint = EXCLUDED.fingerprint "
                "RETURNING id",
                text,
                fingerprint,
            )
            version = int(rows[-1]["version"]) + 1 if rows else 1
            await conn.execute(
                "INSERT INTO subject_versions (subject, version, schema_id) VALUES ($1, $2, $3)",
                subject,
                version,
                schema_id,
            )
            return Registered(int(schema_id), version, created=True)

    # Reading ---------------------------------------------------------------------------

    async def subjects(self) -> list[str]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT DISTINCT subject FROM subject_versions ORDER BY subject"
            )
        return [str(r["subject"]) for r in rows]

    async def versions(self, subject: str) -> list[int]:
        """The subject's versions, ascending; empty when the subject does not exist."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT version FROM subject_versions WHERE subject = $1 ORDER BY version",
                subject,
            )
        return [int(r["version"]) for r in rows]

    async def version(self, subject: str, version: int | None) -> SubjectVersion | None:
        """One version of a subject (``None``: the latest), or None when there is none."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT v.version, s.id, s.schema FROM subject_versions v "
                "JOIN schemas s ON s.id = v.schema_id WHERE v.subject = $1 "
                "AND ($2::integer IS NULL OR v.version = $2) ORDER BY v.version DESC LIMIT 1",
                subject,
                version,
            )
        return None if row is None else _subject_version(subject, row)

    async def all_versions(self, subject: str) -> list[SubjectVersion]:
        """Every version of a subject with its schema, oldest first."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT v.version, s.id, s.schema FROM subject_versions v "
                "JOIN schemas s ON s.id = v.schema_id WHERE v.subject = $1 ORDER BY v.version",
                subject,
            )
        return [_subject_version(subject, r) for r in rows]

    async def lookup(self, subject: str, fingerprint: str) -> SubjectVersion | None:
        """The subject's version holding the schema of this fingerprint, or None."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT v.version, s.id, s.schema FROM subject_versions v "
                "JOIN schemas s ON s.id = v.schema_id WHERE v.subject = $1 "
                "AND s.fingerprint = $2 ORDER BY v.version LIMIT 1",
                subject,
                fingerprint,
            )
        return None if row is None else _subject_version(subject, row)

    async def schema(self, schema_id: int) -> str | None:
        async with self._connection() as conn:
            text = await conn.fetchval("SELECT schema FROM schemas WHERE id = $1", schema_id)
        return None if text is None else str(text)

    async def schema_versions(self, schema_id: int) -> list[tuple[str, int]]:
        """Every (subject, version) that holds the schema, by subject and version."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT subject, version FROM subject_versions WHERE schema_id = $1 "
                "ORDER BY subject, version",
                schema_id,
            )
        return [(str(r["subject"]), int(r["version"])) for r in rows]

    async def source_owners(self, names: Sequence[str]) -> dict[str, str | None]:
        """The tenant of each of the sources ``names`` that exists (None: a source
        without a tenant, shared by all); the registry scopes subjects by them."""
        if not names:
            return {}
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT name, tenant FROM sources WHERE name = ANY($1::text[])", list(set(names))
            )
        return {str(r["name"]): None if r["tenant"] is None else str(r["tenant"]) for r in rows}

    # Deleting --------------------------------------------------------------------------

    async def delete_subject(self, subject: str) -> list[int]:
        """Remove the subject's versions and its level; return the versions removed."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", subject)
            rows = await conn.fetch(
                "DELETE FROM subject_versions WHERE subject = $1 RETURNING version", subject
            )
            if rows:
                await conn.execute("DELETE FROM subject_config WHERE subject = $1", subject)
        return sorted(int(r["version"]) for r in rows)

    async def delete_version(self, subject: str, version: int | None) -> int | None:
        """Remove one version (``None``: the latest); return it, or None when missing."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", subject)
            removed = await conn.fetchval(
                "DELETE FROM subject_versions WHERE subject = $1 AND version = ("
                "SELECT max(version) FROM subject_versions WHERE subject = $1 "
                "AND ($2::integer IS NULL OR version = $2)) RETURNING version",
                subject,
                version,
            )
        return None if removed is None else int(removed)

    # Compatibility levels --------------------------------------------------------------

    async def level(self, subject: str) -> str | None:
        """The level set for ``subject`` (:data:`GLOBAL`: the global one), or None."""
        async with self._connection() as conn:
            value = await conn.fetchval(
                "SELECT compatibility FROM subject_config WHERE subject = $1", subject
            )
        return None if value is None else str(value)

    async def effective_level(self, subject: str, default_level: str) -> str:
        """The subject's level, else the global one, else ``default_level``."""
        async with self._connection() as conn:
            return await self._level(conn, subject, default_level)

    async def set_level(self, subject: str, level: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO subject_config (subject, compatibility) VALUES ($1, $2) "
                "ON CONFLICT (subject) DO UPDATE SET compatibility = EXCLUDED.compatibility",
                subject,
                level,
            )

    async def delete_level(self, subject: str) -> str | None:
        """Remove the level set for ``subject``; return it, or None when none was set."""
        async with self._connection() as conn:
            value = await conn.fetchval(
                "DELETE FROM subject_config WHERE subject = $1 RETURNING compatibility", subject
            )
        return None if value is None else str(value)

    @staticmethod
    async def _level(conn: Any, subject: str, default_level: str) -> str:
        rows = await conn.fetch(
            "SELECT subject, compatibility FROM subject_config WHERE subject IN ($1, $2)",
            subject,
            GLOBAL,
        )
        levels = {str(r["subject"]): str(r["compatibility"]) for r in rows}
        return levels.get(subject) or levels.get(GLOBAL) or default_level


def _subject_version(subject: str, row: Any) -> SubjectVersion:
    return SubjectVersion(subject, int(row["version"]), int(row["id"]), str(row["schema"]))
