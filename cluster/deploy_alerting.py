"""Deploys alerting: the ``rayline-alerting`` engine actor and the ``/v1/alerts`` Serve app.

Call :func:`deploy_alerting` inside ``cluster.deploy.connected(settings)``, after the
ClickHouse owner exists (the engine reads sealed windows from it). Safe to run again:
what exists is kept.
"""

from __future__ import annotations

from ray import serve

from actors.alerting import ACTOR_NAME, AlertingActor, AlertingConfig
from adapters.notifiers import ChannelConfig
from cluster.settings import AlertingSettings, Settings
from core.incidents import RetryPolicy
from serve_apps.alerting import ROUTE_PREFIX, AlertsAPI, AlertsApiConfig

ALERTING_APP = "alerting"


def channel_config(alerting: AlertingSettings) -> ChannelConfig:
    """The channels' URLs, key, retries and timeout from the settings."""
    slack = alerting.slack_webhook_url
    key = alerting.pagerduty_routing_key
    return ChannelConfig(
        slack_webhook_url=None if slack is None else slack.get_secret_value() or None,
        pagerduty_routing_key=None if key is None else key.get_secret_value() or None,
        pagerduty_events_url=alerting.pagerduty_events_url,
        policy=RetryPolicy(
            attempts=alerting.retry_attempts,
            base_ms=max(1, round(alerting.retry_base_seconds * 1000)),
            max_ms=max(1, round(alerting.retry_max_seconds * 1000)),
        ),
        timeout_seconds=alerting.request_timeout_seconds,
    )


def alerting_config(settings: Settings) -> AlertingConfig:
    return AlertingConfig(
        dsn=settings.postgres.dsn(),
        namespace=settings.ray.namespace,
        channels=channel_config(settings.alerting),
        bootstrap=settings.kafka.bootstrap,
        alerts_topic=settings.kafka.alerts_topic,
        poll_seconds=settings.alerting.poll_seconds,
    )


def deploy_alerting(settings: Settings) -> None:
    """Start the alerting actor (named, detached) and the alerting Serve app."""
    # Imported here: cluster.deploy imports this module to call deploy_alerting.
    from cluster.deploy import _singleton

    _singleton(AlertingActor, ACTOR_NAME, settings.ray.namespace, alerting_config(settings))
    sv = settings.serve
    serve.start(http_options={"host": sv.host, "port": sv.port})
    if ALERTING_APP not in serve.status().applications:
        app = AlertsAPI.options(  # type: ignore[attr-defined]
            max_ongoing_requests=sv.max_ongoing_requests, ray_actor_options={"num_cpus": 0}
        ).bind(AlertsApiConfig(dsn=settings.postgres.dsn()))
        serve.run(app, name=ALERTING_APP, route_prefix=ROUTE_PREFIX, blocking=False)
