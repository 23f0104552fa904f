from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from cluster.deploy import processing_config
from cluster.settings import PROJECT_ROOT, describe_settings, load_settings
from core.exceptions import ConfigurationError


def test_defaults_are_local() -> None:
    s = load_settings()
    assert s.kafka.bootstrap == "127.0.0.1:29092"
    assert s.clickhouse_dsn() == f"chdb://{PROJECT_ROOT / '.state' / 'clickhouse'}"
    assert s.kafka.raw_partitions >= 8


def test_environment_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "rayline.yaml"
    file.write_text("kafka:\n  port: 39092\n  raw_partitions: 12\npipeline:\n  workers: 3\n")
    monkeypatch.setenv("RAYLINE_PIPELINE__WORKERS", "5")
    s = load_settings(file)
    assert (s.kafka.port, s.kafka.raw_partitions, s.pipeline.workers) == (39092, 12, 5)


@pytest.mark.parametrize(
    ("yaml_text", "where"),
    [
        ("kafka:\n  prot: 1\n", "kafka.prot"),
        ("kafak:\n  port: 1\n", "kafak"),
        ("pipeline:\n  workers: 0\n", "pipeline.workers"),
        ("serve:\n  port: 70000\n", "serve.port"),
        ("pipeline:\n  attributes: {device: text}\n", "pipeline.attributes.device"),
        ("pipeline:\n  transforms: [{filter: \"__import__('os')\"}]\n", "pipeline.transforms"),
        ("pipeline:\n  transforms: [{explode: x}]\n", "pipeline.transforms"),
        ("pipeline:\n  enrichment: [{table: dim}]\n", "pipeline.enrichment"),
        ("ingest:\n  tenant_events_per_second: 0\n", "ingest.tenant_events_per_second"),
        ("ingest:\n  signature_tolerance_seconds: -5\n", "ingest.signature_tolerance_seconds"),
        ("ingest:\n  max_consumer_lag: -1\n", "ingest.max_consumer_lag"),
        ("ingest:\n  delivery_ttl_seconds: 1\n", "ingest.delivery_ttl_seconds"),
        ("ray:\n  auth_mode: off\n", "ray.auth_mode"),
        ("polling:\n  allowed_networks: ['10.0.0.0/33']\n", "polling.allowed_networks"),
        ("polling:\n  max_response_bytes: 0\n", "polling.max_response_bytes"),
        ("polling:\n  max_request_seconds: 0\n", "polling.max_request_seconds"),
        ("query:\n  sql_max_result_bytes: 10\n", "query.sql_max_result_bytes"),
        ("s3:\n  port: 0\n", "s3.port"),
        ("mqtt:\n  topic: x\n", "mqtt.topic"),
        ("cdc:\n  port: 65536\n", "cdc.port"),
    ],
)
def test_unknown_or_invalid_keys_are_rejected(tmp_path: Path, yaml_text: str, where: str) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text(yaml_text)
    with pytest.raises(ConfigurationError, match=where.replace(".", r"\.")) as caught:
        load_settings(file)
    assert str(file) in str(caught.value)


def test_unknown_environment_key_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYLINE_KAFKA__PROT", "1")
    with pytest.raises(ConfigurationError, match="prot"):
        load_settings()


def test_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_two_services_on_one_port_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYLINE_REDIS__PORT", "29092")
    with pytest.raises(ConfigurationError, match="both use port 29092"):
        load_settings()


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        s.pipeline.workers = 9  # type: ignore[misc]


def test_config_command_hides_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYLINE_POSTGRES__PASSWORD", "hunter2-secret")
    monkeypatch.setenv("RAYLINE_CLICKHOUSE__DSN", "http://u:pw-secret@ch:8123")
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 0, result.output
    assert "hunter2-secret" not in result.output
    assert "pw-secret" not in result.output
    assert "password: '**********'" in result.output
    # the secret still reaches the code that needs it
    assert load_settings().postgres.dsn().startswith("postgresql://postgres:hunter2-secret@")


def test_every_setting_is_described() -> None:
    rows = describe_settings()
    assert len(rows) > 30
    assert all(meaning for _key, _env, _default, meaning in rows)
    assert rows_by_key(rows)["kafka.port"][:3] == ("kafka.port", "RAYLINE_KAFKA__PORT", "29092")


def rows_by_key(rows: list[tuple[str, str, str, str]]) -> dict[str, tuple[str, str, str, str]]:
    return {row[0]: row for row in rows}


def test_configuration_doc_is_generated_from_the_settings() -> None:
    doc = (PROJECT_ROOT / "docs" / "configuration.md").read_text()
    result = CliRunner().invoke(app, ["config", "--describe", "--markdown"])
    assert result.exit_code == 0
    assert result.output.strip() in doc, "docs/configuration.md is stale: run `make docs`"


@pytest.mark.parametrize(
    "command",
    [
        "up",
        "down",
        "status",
        "demo",
        "config",
        "upload",
        "sources",
        "tenants",
        "keys",
        "devices",
        "cdc",
        "rollups",
    ],
)
def test_every_command_has_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output
    assert len(result.output.splitlines()) > 5


@pytest.mark.parametrize(
    ("windows", "message"),
    [
        ('["1x"]', "expected a duration"),
        ('["1m", "1m"]', "distinct"),
        ("[]", "at least 1"),
        ('["5m/2m"]', "divides the size"),
    ],
)
def test_bad_window_kinds_are_rejected(
    monkeypatch: pytest.MonkeyPatch, windows: str, message: str
) -> None:
    monkeypatch.setenv("RAYLINE_PIPELINE__WINDOWS", windows)
    with pytest.raises(ConfigurationError, match=r"pipeline\.windows") as caught:
        load_settings()
    assert message in str(caught.value)


def test_scale_refuses_zero_workers_before_touching_the_cluster() -> None:
    result = CliRunner().invoke(app, ["scale", "workers", "0"])
    assert result.exit_code == 2
    assert "greater than or equal to 1" in result.output


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("RAYLINE_CLICKHOUSE__DIMENSIONS", '["region", "re gion"]', "not an attribute name"),
        ("RAYLINE_CLICKHOUSE__DIMENSIONS", '["a", "a"]', "distinct"),
        ("RAYLINE_CLICKHOUSE__DIMENSIONS", '["x\'); DROP"]', "not an attribute name"),
        ("RAYLINE_CLICKHOUSE__RAW_TTL_DAYS", "-1", "greater than or equal to 0"),
        ("RAYLINE_QUERY__MAX_POINTS", "5", "greater than or equal to 10"),
        ("RAYLINE_QUERY__MAX_SECONDS", "0", "greater than 0"),
        ("RAYLINE_QUERY__MAX_MEMORY_BYTES", "1000", "greater than or equal to 10000000"),
        ("RAYLINE_QUERY__TENANT_CONCURRENCY", "0", "greater than or equal to 1"),
        ("RAYLINE_QUERY__MAX_THREADS", "-1", "greater than or equal to 0"),
        ("RAYLINE_CLICKHOUSE__READ_THREADS", "0", "greater than or equal to 1"),
        ("RAYLINE_QUERY__SQL_MAX_SECONDS", "10", "is now query.max_seconds"),
        ("RAYLINE_PIPELINE__ALLOWED_LATENESS_BY_TENANT", '{"iot-*": -1}', "greater than or equal"),
        ("RAYLINE_PIPELINE__ALLOWED_LATENESS_BY_TENANT", '{"iot-*": "soon"}', "valid number"),
        ("RAYLINE_PIPELINE__ALLOWED_LATENESS_BY_TENANT", '["iot-*"]', "valid dictionary"),
        ("RAYLINE_PIPELINE__MAX_FUTURE_SKEW_SECONDS", "-5", "greater than or equal to 0"),
        ("RAYLINE_PIPELINE__MAX_TENANTS_PER_PARTITION", "0", "greater than or equal to 1"),
        ("RAYLINE_INGEST__UPLOAD_PART_BYTES", "1000", "greater than or equal to 65536"),
        ("RAYLINE_INGEST__UPLOAD_PART_BYTES", "64MiB", "valid integer"),
    ],
)
def test_bad_storage_query_and_watermark_settings_are_rejected(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert message in str(caught.value)


def test_lateness_by_tenant_reaches_the_workers_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "RAYLINE_PIPELINE__ALLOWED_LATENESS_BY_TENANT", '{"iot-slow": 3600, "iot-*": 60}'
    )
    lateness = processing_config(load_settings()).lateness
    assert [lateness.of(t) for t in ("iot-slow", "iot-fast", "web")] == [3_600_000, 60_000, 5_000]
    assert lateness.most_ms == 3_600_000


def test_upload_part_bytes_reaches_the_upload_job(monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.deploy import uploads_config

    monkeypatch.setenv("RAYLINE_INGEST__UPLOAD_PART_BYTES", str(8 << 20))
    start_job = uploads_config(load_settings()).start_job
    assert start_job.args[0].part_bytes == 8 << 20  # type: ignore[attr-defined]
