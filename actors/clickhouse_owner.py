"""The one actor that owns the ClickHouse client (chDB allows one process per folder).

Writers and the query API reach ClickHouse through it, with a DSN of ``chdb://`` or
``http(s)://`` alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import ray
from ray.exceptions import RayActorError

from adapters.clickhouse import ClickHouseStore
from adapters.exceptions import StoreUnavailable
from core.partition_state import WindowResult

OWNER_NAME = "rayline-clickhouse"


class ClickHouseOwner:
    """Actor body: a ClickHouseStore, migrated on start."""

    def __init__(self, dsn: str, database: str) -> None:
        self._store = ClickHouseStore(dsn, database)
        self._store.migrate()

    def insert_window_results(self, results: Sequence[WindowResult]) -> int:
        return self._store.insert_window_results(results)

    def insert_events(self, table: pa.Table) -> int:
        return self._store.insert_events(table)

    def window_results(
        self, tenant: str, type_: str, window: str, from_ms: int, to_ms: int
    ) -> list[WindowResult]:
        return self._store.window_results(tenant, type_, window, from_ms, to_ms)

    def raw_event_stats(self, tenant: str) -> dict[str, int]:
        return self._store.raw_event_stats(tenant)

    def ensure_cdc_table(
        self, table: str, columns: Sequence[tuple[str, str]], key: Sequence[str]
    ) -> None:
        self._store.ensure_cdc_table(table, columns, key)

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
