"""PostgreSQL's side of change data capture: which tables Rayline captures, and the
captured database itself (primary keys, replica identity, the sample schema).

The list of captured tables lives in Rayline's own database (``cdc_tables``); the
tables live in the captured database (``cdc.database``, by default ``appdb``) of the
same server.
"""

from __future__ import annotations

from typing import Any

from adapters.postgres import _Connection
from core.exceptions import ConfigurationError

# A small application schema for trying CDC out (`rayline cdc add --table public.customers`).
SAMPLE_SCHEMA = """
CREATE TABLE IF NOT EXISTS public.customers (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    email text,
    tier text NOT NULL DEFAULT 'free',
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO public.customers (id, name, email, tier) VALUES
    (1, 'Ada Lovelace', 'ada@example.com', 'gold'),
    (2, 'Alan Turing', 'alan@example.com', 'free'),
    (3, 'Grace Hopper', NULL, 'silver')
ON CONFLICT (id) DO NOTHING;
"""


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class CdcCatalog(_Connection):
    """The captured tables, in Rayline's database."""

    _what = "PostgreSQL (cdc_tables)"

    def add(self, schema: str, table: str) -> bool:
        """Register ``schema.table``; True when it was not registered before."""
        row: Any = self._call(
            "INSERT INTO cdc_tables (schema_name, table_name) VALUES ($1, $2) "
            "ON CONFLICT DO NOTHING RETURNING 1",
            schema,
            table,
        )
        return row is not None

    def tables(self) -> list[tuple[str, str]]:
        """Every captured (schema, table), oldest first."""
        rows: Any = self._call(
            "SELECT schema_name, table_name FROM cdc_tables ORDER BY created_at, 1, 2",
            fetch="fetch",
        )
        return [(r["schema_name"], r["table_name"]) for r in rows]


class CapturedDatabase(_Connection):
    """The application database whose tables are captured."""

    _what = "PostgreSQL (captured database)"

    def primary_key(self, schema: str, table: str) -> list[str]:
        """The primary key columns of ``schema.table``, in key order.

        Raises:
            ConfigurationError: the table does not exist or has no primary key.
        """
        exists: Any = self._call(
            "SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = $2", schema, table
        )
        if exists is None:
            raise ConfigurationError(
                f"table {schema}.{table} does not exist in the captured database; create it "
                "first, or point cdc.database (RAYLINE_CDC__DATABASE) at its database"
            )
        rows: Any = self._call(
            "SELECT a.attname FROM pg_index i "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = ($1 || '.' || $2)::regclass AND i.indisprimary "
            "ORDER BY array_position(i.indkey::int2[], a.attnum)",
            _quoted(schema),
            _quoted(table),
            fetch="fetch",
        )
        if not rows:
            raise ConfigurationError(
                f"table {schema}.{table} has no primary key; ClickHouse keeps one row per "
                f"primary key, so add one (ALTER TABLE {schema}.{table} ADD PRIMARY KEY (...))"
            )
        return [r["attname"] for r in rows]

    def published(self, publication: str, schema: str, table: str) -> bool:
        """True when ``publication`` includes the table: its changes are decoded from now."""
        row: Any = self._call(
            "SELECT 1 FROM pg_publication_tables "
            "WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            publication,
            schema,
            table,
        )
        return row is not None

    def set_replica_identity_full(self, schema: str, table: str) -> None:
        """Make updates and deletes carry the whole old row in the write-ahead log."""
        self._call(
            f"ALTER TABLE {_quoted(schema)}.{_quoted(table)} REPLICA IDENTITY FULL",
            fetch="execute",
        )

    def create_sample_schema(self) -> None:
        self._call(SAMPLE_SCHEMA, fetch="execute")
