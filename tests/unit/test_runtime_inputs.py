"""What a worker reloads between batches, against an in-memory metadata store."""

from __future__ import annotations

from typing import Any

from actors.partition_worker import WorkerConfig
from adapters.exceptions import StoreUnavailable
from adapters.runtime_inputs import RuntimeInputs
from core.batch import Runtime
from core.partition_state import ProcessingConfig, parse_window
from core.transforms import parse_enrichment


class FakeMetadata:
    """Implements the part of ``adapters.postgres.MetadataStore`` the worker uses."""

    def __init__(self) -> None:
        self.devices: dict[str, str] = {}
        self.rule_specs: list[tuple[dict[str, Any], bool]] = []
        self.version_calls = 0
        self.loads = 0

    def dimension_version(self, table: str) -> str:
        self.version_calls += 1
        return repr(sorted(self.devices.items()))

    def dimension_rows(
        self, table: str, key: str, columns: tuple[str, ...]
    ) -> dict[str, list[Any]]:
        self.loads += 1
        return {key: list(self.devices), columns[0]: list(self.devices.values())}

    def rules_version(self) -> str:
        return repr(self.rule_specs)

    def rules(self) -> list[tuple[dict[str, Any], bool]]:
        return self.rule_specs

    def subjects(self) -> dict[str, tuple[int, int, str]]:
        return {}

    def schema_text(self, schema_id: int) -> str | None:
        return None

    def close(self) -> None:
        pass


def config() -> WorkerConfig:
    processing = ProcessingConfig(
        windows=(parse_window("1m"),),
        allowed_lateness_ms=0,
        idle_timeout_ms=1000,
        dedup_horizon_ms=60_000,
        enrichment=(
            parse_enrichment(
                {"table": "dim", "key": "device", "on": "entity", "columns": ["site"]}
            ),
        ),
    )
    return WorkerConfig(
        "b",
        "t",
        "dlq",
        "g",
        10,
        10,
        processing,
        "dsn",
        enrichment_ttl_ms=1000,
        rules_refresh_ms=500,
    )


def sites(runtime: Runtime) -> dict[str, str]:
    table = runtime.dimensions["dim"]
    return dict(zip(table["device"].to_pylist(), table["site"].to_pylist(), strict=True))


def test_dimensions_reload_when_they_change_and_only_then() -> None:
    meta = FakeMetadata()
    meta.devices = {"d1": "paris"}
    inputs = RuntimeInputs(config(), meta)  # type: ignore[arg-type]
    runtime, _ = inputs.refresh(Runtime(), 0, force=True)
    assert sites(runtime) == {"d1": "paris"}
    runtime, _ = inputs.refresh(runtime, 500)  # within the TTL: not even checked
    assert (meta.version_calls, meta.loads) == (1, 1)
    runtime, _ = inputs.refresh(runtime, 1000)  # checked, unchanged: not loaded
    assert (meta.version_calls, meta.loads) == (2, 1)
    meta.devices["d1"] = "nice"
    same = inputs.refresh(runtime, 1500)[0]  # changed, but within the TTL of the last check
    assert sites(same) == {"d1": "paris"}
    runtime, _ = inputs.refresh(runtime, 2000)
    assert sites(runtime) == {"d1": "nice"}
    assert meta.loads == 2


def test_rules_reload_and_bad_ones_are_reported() -> None:
    meta = FakeMetadata()
    inputs = RuntimeInputs(config(), meta)  # type: ignore[arg-type]
    runtime, errors = inputs.refresh(Runtime(), 0, force=True)
    assert (runtime.rules, errors) == ((), [])
    meta.rule_specs = [
        ({"id": "a", "kind": "absence", "type": "hb", "within": "1m"}, True),
        ({"id": "b", "kind": "absence", "type": "hb", "within": "soon"}, True),
        ({"id": "c", "kind": "absence", "type": "hb", "within": "1m"}, False),
    ]
    runtime, errors = inputs.refresh(runtime, 600)
    assert [r.id for r in runtime.rules] == ["a"]
    assert runtime.rules_version == 2
    assert errors is not None
    assert len(errors) == 1
    assert "rule 'b'" in errors[0]
    unchanged, errors = inputs.refresh(runtime, 1200)
    assert (unchanged.rules_version, errors) == (2, None)


class FakeCdcPositions:
    """Stands in for ``adapters.redis.CdcPositions.read``: the LSN of each captured table."""

    def __init__(self) -> None:
        self.lsn: dict[str, str] = {}
        self.reads = 0

    def __call__(self, tables: Any) -> list[str | None]:
        self.reads += 1
        return [self.lsn.get(t) for t in tables]


def test_a_cdc_change_reloads_its_dimension_before_the_ttl() -> None:
    meta, positions = FakeMetadata(), FakeCdcPositions()
    meta.devices = {"d1": "paris"}
    positions.lsn["public.dim"] = "100"
    inputs = RuntimeInputs(config(), meta, positions)  # type: ignore[arg-type]
    runtime, _ = inputs.refresh(Runtime(), 0, force=True)
    assert (sites(runtime), meta.loads) == ({"d1": "paris"}, 1)
    meta.devices["d1"] = "nice"
    runtime, _ = inputs.refresh(runtime, 250)  # TTL 1000 ms, position unchanged: kept
    assert sites(runtime) == {"d1": "paris"}
    positions.lsn["public.dim"] = "180"  # the applier stored the change
    runtime, _ = inputs.refresh(runtime, 300)  # within 200 ms of the last read: not read
    assert (sites(runtime), positions.reads) == ({"d1": "paris"}, 2)
    runtime, _ = inputs.refresh(runtime, 450)
    assert sites(runtime) == {"d1": "nice"}
    assert (meta.loads, positions.reads) == (2, 3)
    runtime, _ = inputs.refresh(runtime, 700)  # position read again, unchanged: no check
    assert (meta.version_calls, meta.loads) == (2, 2)


def test_unreadable_cdc_positions_fall_back_to_the_ttl() -> None:
    meta = FakeMetadata()

    def broken(tables: Any) -> list[str | None]:
        raise StoreUnavailable("Redis is down")

    inputs = RuntimeInputs(config(), meta, broken)  # type: ignore[arg-type]
    runtime, errors = inputs.refresh(Runtime(), 0, force=True)
    meta.devices["d1"] = "lyon"
    runtime, errors = inputs.refresh(runtime, 1000)
    assert sites(runtime) == {"d1": "lyon"}
    assert errors is None
