"""Deploys the archiver (raw events and dead letters to S3) as a named detached actor."""

from __future__ import annotations

from actors.archiver import ARCHIVER_NAME, ArchiverActor, ArchiverConfig
from adapters.s3 import S3Config, S3Store
from cluster.settings import Settings


def archiver_config(settings: Settings) -> ArchiverConfig:
    """What the archiver needs of the settings."""
    a = settings.archive
    return ArchiverConfig(
        bootstrap=settings.kafka.bootstrap,
        raw_topic=settings.kafka.raw_topic,
        dlq_topic=settings.kafka.dlq_topic,
        s3=S3Config.of(settings.s3),
        prefix=a.prefix,
        group_id=a.consumer_group,
        flush_seconds=a.flush_seconds,
        max_rows=a.max_rows,
        row_group_rows=a.row_group_rows,
    )


def deploy_archiver(settings: Settings) -> None:
    """Start ``rayline-archiver`` unless it runs already or ``archive.enabled`` is off.

    Must run inside :func:`cluster.deploy.connected`. The bucket is created when missing.

    Raises:
        StoreUnavailable: S3 did not answer (the archiver would only retry).
    """
    # Imported here: cluster.deploy imports this module to call deploy_archiver.
    from cluster.deploy import _singleton

    if not settings.archive.enabled:
        return
    config = archiver_config(settings)
    S3Store(config.s3).ensure_bucket()
    _singleton(ArchiverActor, ARCHIVER_NAME, settings.ray.namespace, config)
