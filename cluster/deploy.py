"""Deploys Rayline onto a Ray cluster: the ClickHouse owner, the coordinator with its
partition workers, and the Serve apps. Safe to run again: what exists is kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import ray
from ray import serve

from actors.clickhouse_owner import OWNER_NAME, ClickHouseOwner
from actors.coordinator import COORDINATOR_NAME, Coordinator
from actors.partition_worker import WorkerConfig
from cluster.processes import ServiceFailed
from cluster.settings import Settings
from core.columnar import Layout
from core.partition_state import ProcessingConfig, parse_window
from core.transforms import parse_enrichment, parse_transforms
from serve_apps.ingest import IngestAPI, IngestConfig
from serve_apps.query import QueryAPI, QueryConfig

INGEST_APP = "ingest"
QUERY_APP = "query"


@contextmanager
def connected(settings: Settings) -> Iterator[None]:
    """Connect this process to the Ray cluster as a driver for the duration."""
    if ray.is_initialized():
        yield
        return
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
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


def worker_config(settings: Settings) -> WorkerConfig:
    return WorkerConfig(
        bootstrap=settings.kafka.bootstrap,
        topic=settings.kafka.raw_topic,
        dlq_topic=settings.kafka.dlq_topic,
        group_id=settings.kafka.consumer_group,
        batch_max_records=settings.pipeline.batch_max_records,
        batch_max_ms=settings.pipeline.batch_max_ms,
        processing=processing_config(settings),
        checkpoint_dsn=settings.postgres.dsn(),
        alerts_topic=settings.kafka.alerts_topic,
        redis_url=settings.redis.url() if settings.pipeline.live_tiles else None,
        enrichment_ttl_ms=int(settings.pipeline.enrichment_ttl_seconds * 1000),
        rules_refresh_ms=int(settings.pipeline.rules_refresh_seconds * 1000),
    )


def processing_config(settings: Settings) -> ProcessingConfig:
    p = settings.pipeline
    return ProcessingConfig(
        windows=tuple(parse_window(w) for w in p.windows),
        allowed_lateness_ms=int(p.allowed_lateness_seconds * 1000),
        idle_timeout_ms=int(p.idle_timeout_seconds * 1000),
        dedup_horizon_ms=int(p.dedup_horizon_seconds * 1000),
        dedup_max_ids=p.dedup_max_ids,
        layout=Layout(tuple(sorted(p.attributes.items()))),
        transforms=parse_transforms(p.transforms),
        enrichment=tuple(parse_enrichment(spec) for spec in p.enrichment),
        group_by=p.group_by,
        distinct=p.distinct_field,
        quantiles=p.quantiles,
    )


def _singleton(cls: type, name: str, namespace: str, *args: Any) -> Any:
    """The named detached actor, created with ``args`` unless it exists already."""
    return (
        ray.remote(cls)
        .options(
            name=name,
            namespace=namespace,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
        )
        .remote(*args)
    )


def deploy(settings: Settings, say: Callable[[str], None] = lambda _m: None) -> None:
    """Create what is missing; must run inside :func:`connected`."""
    ns = settings.ray.namespace
    owner = _singleton(
        ClickHouseOwner, OWNER_NAME, ns, settings.clickhouse_dsn(), settings.clickhouse.database
    )
    ray.get(owner.ping.remote())
    workers = settings.pipeline.workers
    _singleton(Coordinator, COORDINATOR_NAME, ns, worker_config(settings), workers, ns, 0)
    _deploy_serve(settings, say)


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
        ).bind(
            IngestConfig(
                bootstrap=settings.kafka.bootstrap,
                topic=settings.kafka.raw_topic,
                linger_ms=settings.kafka.producer_linger_ms,
                queue_max_messages=settings.kafka.producer_queue_max_messages,
                max_body_bytes=sv.max_body_bytes,
                max_events_per_request=sv.max_events_per_request,
                default_source=sv.default_source,
            )
        )
        serve.run(ingest, name=INGEST_APP, route_prefix="/", blocking=False)
    if QUERY_APP not in running:
        say("deploying the query Serve app ...")
        query = QueryAPI.options(  # type: ignore[attr-defined]
            max_ongoing_requests=sv.max_ongoing_requests, ray_actor_options={"num_cpus": 0}
        ).bind(
            QueryConfig(
                namespace=settings.ray.namespace,
                clickhouse_actor=OWNER_NAME,
                coordinator_actor=COORDINATOR_NAME,
                windows=settings.pipeline.windows,
            )
        )
        serve.run(query, name=QUERY_APP, route_prefix="/v1/metrics", blocking=False)
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


def scale_workers(settings: Settings, workers: int) -> dict[str, Any]:
    """Change the number of partition workers at run time (a new epoch)."""
    coordinator = ray.get_actor(COORDINATOR_NAME, namespace=settings.ray.namespace)
    return dict(ray.get(coordinator.scale.remote(workers), timeout=120))
