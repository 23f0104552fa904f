"""Deploys Rayline onto a Ray cluster: the ClickHouse owner, the coordinator with its
partition workers, and the Serve apps. Safe to run again: what exists is kept.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import ray
from ray import serve

from actors.cdc_applier import APPLIER_NAME, CdcApplierActor, CdcApplierConfig
from actors.clickhouse_owner import OWNER_NAME, ClickHouseOwner, OwnerConfig, owner_concurrency
from actors.coordinator import COORDINATOR_NAME, Coordinator
from actors.mqtt_bridge import BRIDGE_NAME, MqttBridgeActor
from actors.partition_worker import WorkerConfig
from actors.poller_supervisor import SUPERVISOR_NAME as POLLER_NAME
from actors.poller_supervisor import PollerSupervisor, SupervisorConfig
from adapters.clickhouse import Retention
from adapters.s3 import S3Config
from cluster import local_secrets
from cluster.deploy_alerting import deploy_alerting
from cluster.deploy_archive import deploy_archiver
from cluster.mosquitto import bridge_config
from cluster.processes import ServiceFailed
from cluster.settings import Settings
from core.columnar import Layout
from core.exceptions import ConfigurationError
from core.partition_state import ProcessingConfig, parse_window
from core.transforms import parse_enrichment, parse_transforms
from data_jobs import publish_upload
from data_jobs.history import HistoryConfig
from data_jobs.replay import ReplayConfig
from serve_apps.edge import EdgeConfig
from serve_apps.ingest import IngestAPI
from serve_apps.query import QueryAPI, QueryConfig
from serve_apps.query_service import QueryLimits
from serve_apps.registry import RegistryConfig, SchemaRegistryAPI
from serve_apps.uploads import ROUTE_PREFIX as UPLOADS_PREFIX
from serve_apps.uploads import UploadsAPI, UploadsConfig

INGEST_APP = "ingest"
UPLOADS_APP = "uploads"
REGISTRY_APP = "registry"
REGISTRY_PREFIX = "/registry"
QUERY_APP = "query"
QUERY_PREFIX = "/v1/query"


@contextmanager
def connected(settings: Settings) -> Iterator[None]:
    """Connect this process to the Ray cluster as a driver for the duration."""
    if ray.is_initialized():
        yield
        return
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    # Driver and head must agree, so the settings decide (not ~/.ray/auth_token). Ray
    # read its auth mode when it was imported: the entry point set it before that.
    local_secrets.export_ray_environment(settings)
    _check_auth_mode(settings)
    ray.init(
        address=settings.ray.address,
        namespace=settings.ray.namespace,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


def _check_auth_mode(settings: Settings) -> None:
    """Fail clearly, not after a minute of refused retries, when this process's Ray
    imported another auth mode than the settings ask for."""
    from ray._raylet import (  # type: ignore[attr-defined]
        AuthenticationMode,
        get_authentication_mode,
    )

    wanted = settings.ray.auth_mode
    if (get_authentication_mode() == AuthenticationMode.TOKEN) != (wanted == "token"):
        raise ConfigurationError(
            f"this process imported Ray before its auth mode was set (ray.auth_mode is "
            f"{wanted!r}); call cluster.local_secrets.export_ray_environment(settings) "
            "before importing ray, or run it with the variables `rayline ray-env` prints"
        )


def worker_config(settings: Settings) -> WorkerConfig:
    return WorkerConfig(
        bootstrap=settings.kafka.bootstrap,
        topic=settings.kafka.raw_topic,
        dlq_topic=settings.kafka.dlq_topic,
        group_id=settings.kafka.consumer_group,
        batch_max_records=settings.pipeline.batch_max_records,
        batch_max_ms=settings.pipeline.batch_max_ms,
        checkpoint_interval_ms=settings.pipeline.checkpoint_interval_ms,
        processing=processing_config(settings),
        checkpoint_dsn=settings.postgres.dsn(),
        alerts_topic=settings.kafka.alerts_topic,
        redis_url=settings.redis.url() if settings.pipeline.live_tiles else None,
        enrichment_ttl_ms=int(settings.pipeline.enrichment_ttl_seconds * 1000),
        rules_refresh_ms=int(settings.pipeline.rules_refresh_seconds * 1000),
    )


def edge_config(settings: Settings) -> EdgeConfig:
    """What the ingest edge needs of the settings."""
    k, sv, i = settings.kafka, settings.serve, settings.ingest
    return EdgeConfig(
        bootstrap=k.bootstrap,
        topic=k.raw_topic,
        dlq_topic=k.dlq_topic,
        consumer_group=k.consumer_group,
        dsn=settings.postgres.dsn(),
        redis_url=settings.redis.url(),
        linger_ms=k.producer_linger_ms,
        queue_max_messages=k.producer_queue_max_messages,
        max_body_bytes=sv.max_body_bytes,
        max_events_per_request=sv.max_events_per_request,
        default_source=sv.default_source,
        signature_tolerance_s=i.signature_tolerance_seconds,
        delivery_ttl_s=i.delivery_ttl_seconds,
        tenant_rate=i.tenant_events_per_second,
        tenant_burst=i.tenant_burst,
        source_rate=i.source_events_per_second,
        source_burst=i.source_burst,
        max_consumer_lag=i.max_consumer_lag,
        lag_check_s=i.lag_check_seconds,
        max_future_ms=int(settings.pipeline.max_future_skew_seconds * 1000),
    )


def processing_config(settings: Settings) -> ProcessingConfig:
    p = settings.pipeline
    return ProcessingConfig(
        windows=tuple(parse_window(w) for w in p.windows),
        allowed_lateness_ms=int(p.allowed_lateness_seconds * 1000),
        idle_timeout_ms=int(p.idle_timeout_seconds * 1000),
        max_future_ms=int(p.max_future_skew_seconds * 1000),
        max_tenants=p.max_tenants_per_partition,
        lateness_overrides=tuple(
            (pattern, int(seconds * 1000))
            for pattern, seconds in p.allowed_lateness_by_tenant.items()
        ),
        dedup_horizon_ms=int(p.dedup_horizon_seconds * 1000),
        dedup_max_ids=p.dedup_max_ids,
        layout=Layout(tuple(sorted(p.attributes.items()))),
        transforms=parse_transforms(p.transforms),
        enrichment=tuple(parse_enrichment(spec) for spec in p.enrichment),
        group_by=p.group_by,
        distinct=p.distinct_field,
        quantiles=p.quantiles,
    )


def _singleton(
    cls: type,
    name: str,
    namespace: str,
    *args: Any,
    concurrency_groups: dict[str, int] | None = None,
) -> Any:
    """The named detached actor, created with ``args`` unless it exists already.

    ``concurrency_groups`` makes it a threaded actor whose methods run on the threads
    of the group they name (``ray.method(concurrency_group=...)``).
    """
    # Ray's overloads of remote() leave out concurrency_groups, which it takes (and
    # which .options() refuses).
    remote: Any = ray.remote
    actor_class = remote(concurrency_groups=concurrency_groups)(cls)
    return actor_class.options(
        name=name,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
    ).remote(*args)


def deploy(settings: Settings, say: Callable[[str], None] = lambda _m: None) -> None:
    """Create what is missing; must run inside :func:`connected`."""
    ns = settings.ray.namespace
    owner = _singleton(
        ClickHouseOwner,
        OWNER_NAME,
        ns,
        owner_config(settings),
        concurrency_groups=owner_concurrency(settings.clickhouse.read_threads),
    )
    ray.get(owner.ping.remote())
    _singleton(CdcApplierActor, APPLIER_NAME, ns, cdc_config(settings))
    workers = settings.pipeline.workers
    _singleton(Coordinator, COORDINATOR_NAME, ns, worker_config(settings), workers, ns, 0)
    _deploy_sources(settings)
    _deploy_serve(settings, say)
    deploy_archiver(settings)
    deploy_alerting(settings)


def owner_config(settings: Settings) -> OwnerConfig:
    ch = settings.clickhouse
    return OwnerConfig(
        dsn=settings.clickhouse_dsn(),
        database=ch.database,
        namespace=settings.ray.namespace,
        dimensions=ch.dimensions,
        retention=Retention(
            raw_days=ch.raw_ttl_days,
            minute_days=ch.minute_ttl_days,
            hour_days=ch.hour_ttl_days,
            day_days=ch.day_ttl_days,
        ),
        rollup_interval_seconds=ch.rollup_interval_seconds,
        coordinator_actor=COORDINATOR_NAME,
        redis_url=settings.redis.url(),
    )


def query_config(settings: Settings) -> QueryConfig:
    q = settings.query
    return QueryConfig(
        namespace=settings.ray.namespace,
        clickhouse_actor=OWNER_NAME,
        coordinator_actor=COORDINATOR_NAME,
        windows=settings.pipeline.windows,
        limits=QueryLimits(
            database=settings.clickhouse.database,
            dimensions=settings.clickhouse.dimensions,
            max_points=q.max_points,
            max_seconds=q.max_seconds,
            max_memory_bytes=q.max_memory_bytes,
            max_threads=q.max_threads,
            tenant_concurrency=q.tenant_concurrency,
            sql_max_rows=q.sql_max_rows,
            sql_max_rows_to_read=q.sql_max_rows_to_read,
            sql_max_result_bytes=q.sql_max_result_bytes,
        ),
        dsn=settings.postgres.dsn(),
        redis_url=settings.redis.url(),
        cache_seconds=q.cache_seconds,
    )


def cdc_config(settings: Settings) -> CdcApplierConfig:
    return CdcApplierConfig(
        bootstrap=settings.kafka.bootstrap,
        topic_prefix=settings.cdc.topic_prefix,
        dlq_topic=settings.kafka.dlq_topic,
        redis_url=settings.redis.url(),
        namespace=settings.ray.namespace,
    )


def history_config(settings: Settings, s3: S3Config) -> HistoryConfig:
    """The history job's configuration: the workers' processing, so that it counts
    historical rows as the stream counts recent ones."""
    worker = worker_config(settings)
    return HistoryConfig(
        processing=worker.processing,
        s3=s3,
        dsn=worker.checkpoint_dsn,
        bootstrap=worker.bootstrap,
        dlq_topic=worker.dlq_topic,
        namespace=settings.ray.namespace,
        owner_actor=OWNER_NAME,
        database=settings.clickhouse.database,
        redis_url=worker.redis_url,
        enrichment_ttl_ms=worker.enrichment_ttl_ms,
        rules_refresh_ms=worker.rules_refresh_ms,
    )


def replay_config(settings: Settings) -> ReplayConfig:
    """The archive replay's configuration: the stream's processing and the archive."""
    return ReplayConfig(
        history=history_config(settings, S3Config.of(settings.s3)),
        archive_prefix=settings.archive.prefix,
        raw_topic=settings.kafka.raw_topic,
    )


def uploads_config(settings: Settings) -> UploadsConfig:
    s3 = S3Config.of(settings.s3)
    job = publish_upload.UploadJobConfig(
        s3=s3,
        dsn=settings.postgres.dsn(),
        bootstrap=settings.kafka.bootstrap,
        raw_topic=settings.kafka.raw_topic,
        dlq_topic=settings.kafka.dlq_topic,
        redis_url=settings.redis.url(),
        history=history_config(settings, s3),
        part_bytes=settings.ingest.upload_part_bytes,
    )
    return UploadsConfig(
        dsn=settings.postgres.dsn(),
        s3=s3,
        dlq_topic=settings.kafka.dlq_topic,
        start_job=functools.partial(publish_upload.start, job),
    )


def poller_config(settings: Settings) -> SupervisorConfig:
    k = settings.kafka
    return SupervisorConfig(
        dsn=settings.postgres.dsn(),
        bootstrap=k.bootstrap,
        raw_topic=k.raw_topic,
        dlq_topic=k.dlq_topic,
        redis_url=settings.redis.url(),
        refresh_seconds=settings.ingest.sources_refresh_seconds,
        linger_ms=k.producer_linger_ms,
        queue_max_messages=k.producer_queue_max_messages,
        egress=settings.polling.policy(),
    )


def _deploy_sources(settings: Settings) -> None:
    """The source actors: pollers (one supervisor for every poll source) and the MQTT
    bridge (one per deployment: two would take each other's broker session)."""
    ns = settings.ray.namespace
    _singleton(PollerSupervisor, POLLER_NAME, ns, poller_config(settings))
    _singleton(MqttBridgeActor, BRIDGE_NAME, ns, bridge_config(settings))


def _deploy_serve(settings: Settings, say: Callable[[str], None]) -> None:
    sv = settings.serve
    serve.start(http_options={"host": sv.host, "port": sv.port})
    running = serve.status().applications
    if INGEST_APP not in running:
        say("deploying the ingest Serve app ...")
        ingest = IngestAPI.options(  # type: ignore[attr-defined]
            num_replicas=sv.ingest_replicas,
            max_ongoing_requests=sv.max_ongoing_requests,
            ray_actor_options={"num_cpus": 0},
        ).bind(edge_config(settings))
        serve.run(ingest, name=INGEST_APP, route_prefix="/", blocking=False)
    if UPLOADS_APP not in running:
        say("deploying the uploads Serve app ...")
        uploads = UploadsAPI.options(  # type: ignore[attr-defined]
            max_ongoing_requests=sv.max_ongoing_requests, ray_actor_options={"num_cpus": 0}
        ).bind(uploads_config(settings))
        serve.run(uploads, name=UPLOADS_APP, route_prefix=UPLOADS_PREFIX, blocking=False)
    if REGISTRY_APP not in running:
        say("deploying the schema registry Serve app ...")
        registry = SchemaRegistryAPI.options(  # type: ignore[attr-defined]
            max_ongoing_requests=sv.max_ongoing_requests, ray_actor_options={"num_cpus": 0}
        ).bind(RegistryConfig(dsn=settings.postgres.dsn(), default_source=sv.default_source))
        serve.run(registry, name=REGISTRY_APP, route_prefix=REGISTRY_PREFIX, blocking=False)
    if QUERY_APP not in running:
        say("deploying the query Serve app ...")
        query = QueryAPI.options(  # type: ignore[attr-defined]
            max_ongoing_requests=sv.max_ongoing_requests, ray_actor_options={"num_cpus": 0}
        ).bind(query_config(settings))
        serve.run(query, name=QUERY_APP, route_prefix=QUERY_PREFIX, blocking=False)
    _wait_http(settings)


def _wait_http(settings: Settings, timeout: float = 120.0) -> None:
    url = f"{base_url(settings)}/healthz"
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, timeout=2)
            if last.status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise ServiceFailed(f"Serve did not answer {url} within {timeout:.0f} s (last: {last})")


def base_url(settings: Settings) -> str:
    return f"http://{settings.serve.host}:{settings.serve.port}"


def pipeline_status(settings: Settings) -> dict[str, Any] | None:
    """The coordinator's report, or None when the pipeline is not deployed."""
    try:
        coordinator = ray.get_actor(COORDINATOR_NAME, namespace=settings.ray.namespace)
    except ValueError:
        return None
    return dict(ray.get(coordinator.status.remote(), timeout=30))


def actors_status(settings: Settings) -> dict[str, Any]:
    """Rollups, archiver and alerting engine as each reports itself; an actor that does
    not answer (or is not deployed) shows its error instead."""
    from actors.alerting import ACTOR_NAME as ALERTING_NAME
    from actors.archiver import ARCHIVER_NAME

    calls = {
        "rollups": (OWNER_NAME, "rollup_status"),
        "archiver": (ARCHIVER_NAME, "status"),
        "alerting": (ALERTING_NAME, "status"),
    }
    report: dict[str, Any] = {}
    for key, (name, method) in calls.items():
        try:
            actor = ray.get_actor(name, namespace=settings.ray.namespace)
            report[key] = ray.get(getattr(actor, method).remote(), timeout=30)
        except (ValueError, ray.exceptions.RayError, TimeoutError) as exc:
            report[key] = {"error": str(exc).splitlines()[0][:200]}
    return report


def scale_workers(settings: Settings, workers: int) -> dict[str, Any]:
    """Change the number of partition workers at run time (a new epoch)."""
    coordinator = ray.get_actor(COORDINATOR_NAME, namespace=settings.ray.namespace)
    return dict(ray.get(coordinator.scale.remote(workers), timeout=120))
