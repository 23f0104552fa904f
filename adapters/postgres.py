"""PostgreSQL through asyncpg."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

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


T = TypeVar("T")


def ensure_database(admin_dsn: str, database: str) -> bool:
    """Create ``database`` when missing; True when it was created now."""
    try:
        return asyncio.run(_ensure_database(admin_dsn, database))
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        raise StoreUnavailable(f"PostgreSQL did not create database {database!r}: {exc}") from exc


async def _administer(admin_dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(admin_dsn, timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def set_password(admin_dsn: str, user: str, password: str) -> None:
    """Give ``user`` the password ``password`` (stored as a scram-sha-256 verifier).

    Raises:
        StoreUnavailable: PostgreSQL refused or could not be reached.
    """
    quoted_user = '"' + user.replace('"', '""') + '"'
    literal = "'" + password.replace("'", "''") + "'"  # ALTER ROLE takes no parameters
    try:
        asyncio.run(_administer(admin_dsn, f"ALTER ROLE {quoted_user} PASSWORD {literal}"))
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        # The statement holds the password: name the failure, never the statement.
        raise StoreUnavailable(
            f"PostgreSQL did not set the password of {user!r}: {exc.__class__.__name__}"
        ) from None


def reload_configuration(admin_dsn: str) -> None:
    """Make the server re-read its configuration files (``pg_hba.conf``)."""
    try:
        asyncio.run(_administer(admin_dsn, "SELECT pg_reload_conf()"))
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        raise StoreUnavailable(f"PostgreSQL did not reload its configuration: {exc}") from exc


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
    (
        2,
        # The schema registry: a schema is stored once (by the fingerprint of its
        # canonical form) and gets one global id; subjects list versions of ids, as the
        # Confluent registry does.
        """
        CREATE TABLE IF NOT EXISTS schemas (
            id serial PRIMARY KEY,
            schema_type text NOT NULL DEFAULT 'AVRO',
            schema text NOT NULL,
            fingerprint text NOT NULL UNIQUE,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE IF NOT EXISTS subject_versions (
            subject text NOT NULL,
            version integer NOT NULL,
            schema_id integer NOT NULL REFERENCES schemas (id),
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (subject, version)
        );
        CREATE INDEX IF NOT EXISTS subject_versions_schema ON subject_versions (schema_id);
        CREATE TABLE IF NOT EXISTS cep_rules (
            id text PRIMARY KEY,
            spec jsonb NOT NULL,
            enabled boolean NOT NULL DEFAULT true,
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        3,
        # Ingest: tenants and their API keys (only a SHA-256 of each key is kept; keys are
        # 256-bit random, so a plain hash is enough), sources with their authentication,
        # payload mapping and kind-specific settings (HMAC secrets must be kept readable
        # to verify signatures), poller cursors, uploads, registry compatibility levels,
        # captured CDC tables and MQTT devices.
        """
        CREATE TABLE IF NOT EXISTS tenants (
            id text PRIMARY KEY,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE IF NOT EXISTS api_keys (
            key_hash text PRIMARY KEY,
            tenant text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
            label text NOT NULL DEFAULT '',
            created_at timestamptz NOT NULL DEFAULT now(),
            revoked_at timestamptz
        );
        CREATE TABLE IF NOT EXISTS sources (
            name text PRIMARY KEY,
            kind text NOT NULL,
            tenant text REFERENCES tenants (id),
            auth text NOT NULL DEFAULT 'api_key',
            scheme text,
            secret text,
            previous_secret text,
            previous_secret_until timestamptz,
            mapping jsonb NOT NULL DEFAULT '{}',
            schema_subject text,
            events_per_second double precision,
            burst integer,
            config jsonb NOT NULL DEFAULT '{}',
            enabled boolean NOT NULL DEFAULT true,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE IF NOT EXISTS source_cursors (
            source text PRIMARY KEY REFERENCES sources (name) ON DELETE CASCADE,
            cursor jsonb NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE IF NOT EXISTS uploads (
            id text PRIMARY KEY,
            tenant text NOT NULL,
            source text NOT NULL,
            filename text NOT NULL,
            format text NOT NULL,
            object_key text NOT NULL,
            size_bytes bigint NOT NULL DEFAULT 0,
            state text NOT NULL,
            rows_read bigint NOT NULL DEFAULT 0,
            rows_accepted bigint NOT NULL DEFAULT 0,
            rows_rejected bigint NOT NULL DEFAULT 0,
            error text,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE IF NOT EXISTS subject_config (
            subject text PRIMARY KEY,
            compatibility text NOT NULL
        );
        CREATE TABLE IF NOT EXISTS cdc_tables (
            schema_name text NOT NULL,
            table_name text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (schema_name, table_name)
        );
        CREATE TABLE IF NOT EXISTS devices (
            id text PRIMARY KEY,
            tenant text NOT NULL REFERENCES tenants (id),
            password_hash text NOT NULL,
            enabled boolean NOT NULL DEFAULT true,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        4,
        # Alerting (docs/alerting.md): rules and silences per tenant, incidents, every
        # channel attempt, the outbox of notifications not yet delivered, acknowledge
        # requests from the API, and the engine's snapshot with its feed cursor.
        """
        CREATE TABLE IF NOT EXISTS alert_rules (
            tenant text NOT NULL,
            id text NOT NULL,
            spec jsonb NOT NULL,
            enabled boolean NOT NULL DEFAULT true,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, id)
        );
        CREATE INDEX IF NOT EXISTS alert_rules_enabled ON alert_rules (enabled, tenant);
        CREATE TABLE IF NOT EXISTS alert_silences (
            id text PRIMARY KEY,
            tenant text NOT NULL,
            rule_id text,
            group_key text,
            starts_at timestamptz NOT NULL,
            ends_at timestamptz NOT NULL,
            comment text NOT NULL DEFAULT '',
            created_by text NOT NULL DEFAULT '',
            created_at timestamptz NOT NULL DEFAULT now(),
            CHECK (ends_at > starts_at)
        );
        CREATE INDEX IF NOT EXISTS alert_silences_tenant ON alert_silences (tenant, ends_at);
        CREATE INDEX IF NOT EXISTS alert_silences_ends ON alert_silences (ends_at);
        CREATE TABLE IF NOT EXISTS incidents (
            id text PRIMARY KEY,
            tenant text NOT NULL,
            rule_id text NOT NULL,
            group_key text NOT NULL,
            state text NOT NULL CHECK (state IN ('firing', 'acknowledged', 'resolved')),
            silenced boolean NOT NULL DEFAULT false,
            opened_at timestamptz NOT NULL,
            acked_at timestamptz,
            acked_by text,
            resolved_at timestamptz,
            last_value double precision,
            summary text NOT NULL DEFAULT '',
            occurrences integer NOT NULL DEFAULT 1,
            details jsonb NOT NULL DEFAULT '{}',
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX IF NOT EXISTS incidents_tenant_state
            ON incidents (tenant, state, opened_at DESC);
        CREATE INDEX IF NOT EXISTS incidents_tenant_rule ON incidents (tenant, rule_id);
        CREATE TABLE IF NOT EXISTS notification_log (
            id bigserial PRIMARY KEY,
            incident_id text NOT NULL,
            tenant text NOT NULL,
            channel text NOT NULL CHECK (channel IN ('slack', 'pagerduty')),
            action text NOT NULL,
            attempt integer NOT NULL,
            status_code integer,
            error text,
            payload jsonb NOT NULL,
            sent_at timestamptz NOT NULL,
            delivered boolean NOT NULL
        );
        CREATE INDEX IF NOT EXISTS notification_log_incident
            ON notification_log (incident_id, sent_at);
        CREATE TABLE IF NOT EXISTS alert_outbox (
            id bigserial PRIMARY KEY,
            incident_id text NOT NULL,
            channel text NOT NULL,
            action text NOT NULL,
            notification jsonb NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            done_at timestamptz,
            delivered boolean
        );
        CREATE INDEX IF NOT EXISTS alert_outbox_pending ON alert_outbox (id) WHERE done_at IS NULL;
        CREATE TABLE IF NOT EXISTS alert_ack_requests (
            id bigserial PRIMARY KEY,
            incident_id text NOT NULL,
            tenant text NOT NULL,
            requested_by text NOT NULL,
            requested_at timestamptz NOT NULL DEFAULT now(),
            done_at timestamptz,
            outcome text
        );
        CREATE INDEX IF NOT EXISTS alert_ack_requests_pending
            ON alert_ack_requests (id) WHERE done_at IS NULL;
        CREATE TABLE IF NOT EXISTS alerting_state (
            name text PRIMARY KEY,
            evaluator jsonb NOT NULL,
            book jsonb NOT NULL,
            cep jsonb NOT NULL DEFAULT '{}',
            cursor_ms bigint NOT NULL,
            kafka_offsets jsonb NOT NULL DEFAULT '{}',
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        5,
        # The Kafka topic id each partition's checkpoint was taken on: a topic deleted
        # and created again keeps its name but gets a new id, and its offsets start
        # over (docs/architecture.md, "Checkpoints that no longer fit the topic"). A table
        # of its own, so that checkpoints saved before it stay readable as they are.
        """
        CREATE TABLE IF NOT EXISTS partition_topic_ids (
            topic text NOT NULL,
            partition integer NOT NULL,
            topic_id text NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (topic, partition)
        );
        """,
    ),
    (
        6,
        # Rows of an upload behind the stream's watermark, counted by the history job
        # (data_jobs/history.py) instead of the stream: staged, written, and those
        # ClickHouse held already.
        """
        ALTER TABLE uploads ADD COLUMN IF NOT EXISTS rows_historical bigint NOT NULL DEFAULT 0;
        ALTER TABLE uploads ADD COLUMN IF NOT EXISTS history_written bigint NOT NULL DEFAULT 0;
        ALTER TABLE uploads ADD COLUMN IF NOT EXISTS history_stored bigint NOT NULL DEFAULT 0;
        """,
    ),
    (
        7,
        # An upload read in parts by parallel tasks (NDJSON byte ranges, Parquet row
        # groups; data_jobs/upload_parts.py): the plan, fixed at the first run, and how
        # far each part got, so that a retried job resumes every part where it stopped.
        """
        CREATE TABLE IF NOT EXISTS upload_parts (
            upload_id text NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
            part integer NOT NULL,
            start_at bigint NOT NULL,
            end_at bigint,
            first_index bigint NOT NULL,
            first_line bigint NOT NULL,
            rows_read bigint NOT NULL DEFAULT 0,
            done boolean NOT NULL DEFAULT false,
            PRIMARY KEY (upload_id, part)
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


class _Connection:
    """One asyncpg connection driven from one (non-async) thread, reconnecting on failure."""

    _what = "PostgreSQL"

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._loop = asyncio.new_event_loop()
        self._conn: asyncpg.Connection | None = None

    def _call(
        self,
        sql: str,
        *args: object,
        fetch: str = "fetchrow",
        in_flight: Callable[[], None] | None = None,
    ) -> Any:
        async def run() -> object:
            conn = await self._connection()
            statement = asyncio.ensure_future(getattr(conn, fetch)(sql, *args, timeout=30))
            if in_flight is not None:
                await asyncio.sleep(0)  # the statement is on its way to the server
                in_flight()
            return await statement

        return self._run_async(run())

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self._dsn, timeout=10)
        return self._conn

    def _run_async(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on this connection's loop; driver errors become StoreUnavailable
        (and a broken connection is dropped, to reconnect on the next call)."""
        try:
            return self._loop.run_until_complete(work)
        except (TimeoutError, OSError, asyncpg.InterfaceError) as exc:
            self._conn = None
            raise StoreUnavailable(f"{self._what} failed: {exc}") from exc
        except asyncpg.PostgresError as exc:
            raise StoreUnavailable(f"{self._what} failed: {exc}") from exc

    def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            self._loop.run_until_complete(self._conn.close())
        self._loop.close()


class AsyncStore:
    """Base of the async stores: a small asyncpg pool opened on first use, for one event
    loop; driver errors become :class:`StoreUnavailable` naming ``_what``."""

    _what = "PostgreSQL"

    def __init__(self, dsn: str, *, max_size: int = 4) -> None:
        self._dsn = dsn
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None

    async def _run(self, method: str, sql: str, *args: object) -> Any:
        """``pool.<method>(sql, *args)``: execute, fetch, fetchrow or fetchval."""
        try:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self._dsn, min_size=1, max_size=self._max_size, timeout=10
                )
            return await getattr(self._pool, method)(sql, *args, timeout=10)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"{self._what} failed: {exc}") from exc

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


class CheckpointStore(_Connection):
    """Partition snapshots with epoch fencing, for use from one (non-async) thread.

    ``save`` writes a partition's snapshot only when no newer epoch has written one for
    it, and says which partitions it wrote. A snapshot returned by ``load`` is the last
    one saved, whole (one row, one statement).
    """

    _what = "PostgreSQL checkpoint store"

    def next_epoch(self) -> int:
        return int(self._call("SELECT nextval('coordinator_epoch')", fetch="fetchval"))

    def load(self, topic: str, partition: int) -> tuple[int, int, bytes] | None:
        """(epoch, next offset, state) of the last snapshot, or None."""
        row: Any = self._call(
            "SELECT epoch, next_offset, state FROM partition_checkpoints "
            "WHERE topic = $1 AND partition = $2",
            topic,
            partition,
        )
        return None if row is None else (row["epoch"], row["next_offset"], bytes(row["state"]))

    def save(
        self,
        topic: str,
        epoch: int,
        snapshots: dict[int, tuple[int, bytes]],
        in_flight: Callable[[], None] | None = None,
    ) -> set[int]:
        """Save {partition: (next offset, state)} in one statement; return the partitions
        saved. A partition missing from the answer belongs to a newer epoch (fenced).
        ``in_flight`` is called while the statement is on its way (a test's crash hook)."""
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
            in_flight=in_flight,
        )
        return {int(r["partition"]) for r in rows}

    def topic_id(self, topic: str, partition: int) -> str | None:
        """The topic id the partition's checkpoint was taken on; None when not recorded
        (a checkpoint older than topic ids, or none yet)."""
        row: Any = self._call(
            "SELECT topic_id FROM partition_topic_ids WHERE topic = $1 AND partition = $2",
            topic,
            partition,
        )
        return None if row is None else str(row["topic_id"])

    def record_topic_id(self, topic: str, partitions: Sequence[int], topic_id: str) -> None:
        """Note that the partitions' checkpoints belong to the topic with ``topic_id``."""
        self._call(
            "INSERT INTO partition_topic_ids (topic, partition, topic_id) "
            "SELECT $1, p, $3 FROM unnest($2::integer[]) AS t(p) "
            "ON CONFLICT (topic, partition) DO UPDATE SET topic_id = EXCLUDED.topic_id, "
            "updated_at = now() WHERE partition_topic_ids.topic_id <> EXCLUDED.topic_id",
            topic,
            list(partitions),
            topic_id,
            fetch="execute",
        )


class MetadataStore(_Connection):
    """Schemas, CEP rules and dimension tables, for use from one (non-async) thread."""

    _what = "PostgreSQL metadata store"

    # Schema registry -------------------------------------------------------------

    def register_schema(self, subject: str, text: str, fingerprint: str) -> tuple[int, int]:
        """(schema id, version) of ``text`` under ``subject``; registering again is a no-op."""
        row = self._call(
            "WITH s AS (INSERT INTO schemas (schema, fingerprint) VALUES ($1, $2) "
            "ON CONFLICT (fingerprint) DO UPDATE SET fingerprint = EXCLUDED.fingerprint "
            "RETURNING id) SELECT id FROM s",
            text,
            fingerprint,
        )
        schema_id = int(row["id"])
        latest = self._call(
            "SELECT version, schema_id FROM subject_versions WHERE subject = $1 "
            "ORDER BY version DESC LIMIT 1",
            subject,
        )
        if latest is not None and latest["schema_id"] == schema_id:
            return schema_id, int(latest["version"])
        version = 1 if latest is None else int(latest["version"]) + 1
        self._call(
            "INSERT INTO subject_versions (subject, version, schema_id) VALUES ($1, $2, $3)",
            subject,
            version,
            schema_id,
        )
        return schema_id, version

    def schema_text(self, schema_id: int) -> str | None:
        row = self._call("SELECT schema FROM schemas WHERE id = $1", schema_id)
        return None if row is None else str(row["schema"])

    def latest_schema(self, subject: str) -> tuple[int, int, str] | None:
        """(id, version, text) of the subject's newest version, or None."""
        row = self._call(
            "SELECT s.id, v.version, s.schema FROM subject_versions v "
            "JOIN schemas s ON s.id = v.schema_id WHERE v.subject = $1 "
            "ORDER BY v.version DESC LIMIT 1",
            subject,
        )
        return None if row is None else (int(row["id"]), int(row["version"]), str(row["schema"]))

    def subjects(self) -> dict[str, tuple[int, int, str]]:
        """Every subject's newest (id, version, text)."""
        rows = self._call(
            "SELECT DISTINCT ON (v.subject) v.subject, s.id, v.version, s.schema "
            "FROM subject_versions v JOIN schemas s ON s.id = v.schema_id "
            "ORDER BY v.subject, v.version DESC",
            fetch="fetch",
        )
        return {r["subject"]: (int(r["id"]), int(r["version"]), str(r["schema"])) for r in rows}

    # CEP rules ---------------------------------------------------------------------

    def put_rule(self, rule_id: str, spec: dict[str, Any], enabled: bool = True) -> None:
        self._call(
            "INSERT INTO cep_rules (id, spec, enabled) VALUES ($1, $2::jsonb, $3) "
            "ON CONFLICT (id) DO UPDATE SET spec = EXCLUDED.spec, enabled = EXCLUDED.enabled, "
            "updated_at = clock_timestamp()",
            rule_id,
            json.dumps(spec),
            enabled,
            fetch="execute",
        )

    def delete_rule(self, rule_id: str) -> bool:
        status = self._call("DELETE FROM cep_rules WHERE id = $1", rule_id, fetch="execute")
        return str(status).endswith(" 1")

    def rules(self) -> list[tuple[dict[str, Any], bool]]:
        """Every rule's spec and whether it is enabled, by id."""
        rows = self._call("SELECT spec, enabled FROM cep_rules ORDER BY id", fetch="fetch")
        return [(json.loads(r["spec"]), bool(r["enabled"])) for r in rows]

    def rules_version(self) -> str:
        """Changes whenever a rule is added, changed or deleted."""
        row = self._call("SELECT count(*) AS n, max(updated_at)::text AS at FROM cep_rules")
        return f"{row['n']}:{row['at']}"

    # Dimension tables ----------------------------------------------------------------

    def dimension_version(self, table: str) -> str:
        """Changes whenever a row of ``table`` is inserted, updated or deleted.

        The newest transaction id among the rows and the row count: an update or insert
        raises the first, a delete lowers the second. A full scan, meant for dimension
        tables of thousands to a few million rows, run once per TTL.
        """
        name = _identifier(table)
        row = self._call(f"SELECT count(*) AS n, max(xmin::text::bigint) AS x FROM {name}")
        return f"{row['n']}:{row['x']}"

    def dimension_rows(
        self, table: str, key: str, columns: tuple[str, ...]
    ) -> dict[str, list[Any]]:
        """The key and the named columns of every row, column-wise, as text."""
        names = [key, *columns]
        select = ", ".join(f"{_identifier(c)}::text" for c in names)
        rows = self._call(f"SELECT {select} FROM {_identifier(table)}", fetch="fetch")
        return {name: [r[i] for r in rows] for i, name in enumerate(names)}


def _identifier(name: str) -> str:
    """A table or column name from the settings, quoted (schema.table allowed)."""
    parts = name.split(".")
    if not all(p and len(p) <= 63 for p in parts) or len(parts) > 2:
        raise ValueError(f"expected a table or column name such as dim_devices, got {name!r}")
    return ".".join('"' + p.replace('"', '""') + '"' for p in parts)
