"""ClickHouse through clickhouse-connect: the in-process engine (``chdb://``) or a server.

The same client API serves both DSNs, so the code above this module does not know
which one it talks to. chDB allows one process per data folder; Rayline keeps that
process in one actor (``actors.clickhouse_owner``) that writers and queries go through.

Sink contract of :meth:`ClickHouseStore.insert_window_partials`: the call returns
after ClickHouse has stored the block. A repeated call with the same ``token`` is a
no-op (``insert_deduplication_token`` on a table with a deduplication window), so a
caller may retry a failed or unacknowledged write, and may commit the Kafka offsets
that produced the block only after the call returned.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError

from adapters.exceptions import StoreUnavailable
from core.windows import Partial, WindowKey

_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE IF NOT EXISTS {db}.window_aggregates
        (
            tenant LowCardinality(String),
            type LowCardinality(String),
            window_seconds UInt32,
            window_start DateTime64(3, 'UTC'),
            count UInt64,
            sum Float64
        )
        ENGINE = SummingMergeTree((count, sum))
        PARTITION BY toYYYYMM(window_start)
        ORDER BY (tenant, type, window_seconds, window_start)
        SETTINGS non_replicated_deduplication_window = 100000
        """,
    ),
)


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class ClickHouseStore:
    """Rayline's tables in one ClickHouse database."""

    def __init__(self, dsn: str, database: str) -> None:
        self._database = database
        try:
            self._client = clickhouse_connect.get_client(dsn=dsn)
        except (ClickHouseError, OSError) as exc:
            where = dsn.split("@")[-1]  # never echo credentials
            raise StoreUnavailable(f"ClickHouse at {where} did not answer: {exc}") from exc

    def migrate(self) -> list[int]:
        """Bring the schema up to date; return the migration versions applied now."""
        db = self._database
        self._command(f"CREATE DATABASE IF NOT EXISTS {db}")
        self._command(
            f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations "
            "(version UInt32, applied_at DateTime DEFAULT now()) "
            "ENGINE = MergeTree ORDER BY version"
        )
        done = {row[0] for row in self._query(f"SELECT version FROM {db}.schema_migrations")}
        applied = []
        for version, sql in _MIGRATIONS:
            if version in done:
                continue
            self._command(sql.format(db=db))
            self._client.insert(f"{db}.schema_migrations", [[version]], column_names=["version"])
            applied.append(version)
        return applied

    def insert_window_partials(
        self, window_seconds: int, partials: Mapping[WindowKey, Partial], token: str
    ) -> int:
        """Store one block of window partials; idempotent per ``token``."""
        rows = [
            [tenant, type_, window_seconds, _utc(start), p.count, p.sum]
            for (tenant, type_, start), p in partials.items()
        ]
        if not rows:
            return 0
        try:
            self._client.insert(
                f"{self._database}.window_aggregates",
                rows,
                column_names=["tenant", "type", "window_seconds", "window_start", "count", "sum"],
                settings={"insert_deduplication_token": token},
            )
        except ClickHouseError as exc:
            raise StoreUnavailable(f"ClickHouse rejected a window block ({token}): {exc}") from exc
        return len(rows)

    def window_series(
        self, tenant: str, type_: str, window_seconds: int, from_ms: int, to_ms: int
    ) -> list[dict[str, Any]]:
        """Closed and partial windows of one metric, merged, oldest first."""
        rows = self._query(
            f"SELECT toUnixTimestamp64Milli(window_start), sum(count), sum(sum) "
            f"FROM {self._database}.window_aggregates "
            "WHERE tenant = {tenant:String} AND type = {type:String} "
            "AND window_seconds = {ws:UInt32} "
            "AND window_start >= fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC') "
            "AND window_start < fromUnixTimestamp64Milli({to_ms:Int64}, 'UTC') "
            "GROUP BY window_start ORDER BY window_start",
            {
                "tenant": tenant,
                "type": type_,
                "ws": window_seconds,
                "from_ms": from_ms,
                "to_ms": to_ms,
            },
        )
        return [{"start_ms": int(r[0]), "count": int(r[1]), "sum": float(r[2])} for r in rows]

    def ping(self) -> bool:
        try:
            return self._query("SELECT 1") == [(1,)]
        except StoreUnavailable:
            return False

    def _command(self, sql: str) -> None:
        try:
            self._client.command(sql)
        except ClickHouseError as exc:
            raise StoreUnavailable(f"ClickHouse failed: {exc}") from exc

    def _query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        try:
            return [tuple(r) for r in self._client.query(sql, parameters=parameters).result_rows]
        except ClickHouseError as exc:
            raise StoreUnavailable(f"ClickHouse query failed: {exc}") from exc

    def close(self) -> None:
        self._client.close()
