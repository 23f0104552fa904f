"""HTTP senders of the alert channels: Slack incoming webhooks and PagerDuty Events v2.

A sender turns a :class:`core.incidents.Notification` into its channel's body
(``core.notify``), POSTs it with httpx and retries per
:class:`core.incidents.RetryPolicy`: connection errors, timeouts, 429 and 5xx are
retried after a full-jitter backoff, or after the ``Retry-After`` the receiver asked
for (capped at the policy's ``max_ms``); other 4xx are not (the request itself is
wrong). Every try, delivered or not, is handed to an :class:`AttemptLog` (the
``notification_log`` table in production), with the routing key masked.

A channel without its URL or routing key is not built: :func:`build_senders` logs
that once and leaves it out.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import httpx

from core.incidents import Notification, RetryPolicy
from core.notify import pagerduty_event, slack_message

DEFAULT_PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"
MASK = "********"
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    """One try of one notification on one channel, as the notification log keeps it."""

    incident_id: str
    tenant: str
    channel: str
    action: str
    attempt: int
    status_code: int | None
    error: str | None
    payload: dict[str, Any]
    sent_ms: int
    delivered: bool


class AttemptLog(Protocol):
    """Where every try is written (``adapters.alert_store.AlertStore`` in production)."""

    def record(self, attempt: DeliveryAttempt) -> None: ...


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    """What the senders need; built from ``AlertingSettings`` by the caller.

    Attributes:
        slack_webhook_url: Slack incoming-webhook URL, or None to skip Slack.
        pagerduty_routing_key: PagerDuty integration key, or None to skip PagerDuty.
        pagerduty_events_url: The Events API v2 endpoint.
        policy: Retries of one notification.
        timeout_seconds: Timeout of one request.
        dashboard_url: Optional link shown as a button in Slack.
    """

    slack_webhook_url: str | None
    pagerduty_routing_key: str | None
    pagerduty_events_url: str = DEFAULT_PAGERDUTY_URL
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_seconds: float = 10.0
    dashboard_url: str | None = None


class Sender:
    """Sends one channel's notifications with retries; subclasses say what and where."""

    channel = ""

    def __init__(
        self,
        client: httpx.Client,
        policy: RetryPolicy,
        attempts: AttemptLog,
        *,
        sleep: Callable[[float], Any] = time.sleep,
        draw: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._policy = policy
        self._log = attempts
        self._sleep = sleep
        self._draw = draw
        self._clock = clock

    def request(self, notification: Notification) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """(URL, body, body as logged) for one notification."""
        raise NotImplementedError

    def deliver(self, notification: Notification) -> bool:
        """Send until delivered or out of tries; True when the receiver took it (2xx)."""
        url, body, logged = self.request(notification)
        attempt = 0
        while True:
            attempt += 1
            status, error, retry_after = self._post(url, body)
            delivered = status is not None and 200 <= status < 300
            self._log.record(
                DeliveryAttempt(
                    incident_id=notification.incident.id,
                    tenant=notification.incident.tenant,
                    channel=self.channel,
                    action=notification.kind,
                    attempt=attempt,
                    status_code=status,
                    error=error,
                    payload=logged,
                    sent_ms=int(self._clock() * 1000),
                    delivered=delivered,
                )
            )
            if delivered:
                return True
            delay = self._next_delay(attempt, status, retry_after)
            if delay is None:
                log.warning(
                    "%s %s of incident %s not delivered after %d tries: %s",
                    self.channel,
                    notification.kind,
                    notification.incident.id,
                    attempt,
                    error,
                )
                return False
            self._sleep(delay)

    def _next_delay(
        self, attempt: int, status: int | None, retry_after: float | None
    ) -> float | None:
        if not self._policy.retryable(status):
            return None
        delay_ms = self._policy.next_delay_ms(attempt, self._draw())
        if delay_ms is None:
            return None
        if retry_after is not None:
            delay_ms = min(int(retry_after * 1000), self._policy.max_ms)
        return delay_ms / 1000

    def _post(self, url: str, body: dict[str, Any]) -> tuple[int | None, str | None, float | None]:
        """(status, error text, Retry-After seconds); status None on a transport error."""
        try:
            response = self._client.post(url, json=body)
        except httpx.HTTPError as exc:
            # Slack's webhook URL is a secret: never let it into the log through the message.
            said = str(exc).replace(url, "<url>")
            return None, f"{type(exc).__name__}: request to {self.channel} failed: {said}", None
        if 200 <= response.status_code < 300:
            return response.status_code, None, None
        text = response.text[:500]
        error = f"{self.channel} answered HTTP {response.status_code}: {text}"
        return response.status_code, error, retry_after_seconds(response.headers)


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """The ``Retry-After`` header in seconds (delta or HTTP date), None when absent or bad."""
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    if raw.isdigit():
        return float(raw)
    try:
        moment = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


class SlackSender(Sender):
    """POSTs Block Kit messages to one Slack incoming webhook."""

    channel = "slack"

    def __init__(self, url: str, *args: Any, dashboard_url: str | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._url = url
        self._dashboard_url = dashboard_url

    def request(self, notification: Notification) -> tuple[str, dict[str, Any], dict[str, Any]]:
        body = slack_message(notification, dashboard_url=self._dashboard_url)
        return self._url, body, body


class PagerDutySender(Sender):
    """POSTs Events API v2 events (trigger, acknowledge, resolve) with one dedup key."""

    channel = "pagerduty"

    def __init__(self, url: str, routing_key: str, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._url = url
        self._routing_key = routing_key

    def request(self, notification: Notification) -> tuple[str, dict[str, Any], dict[str, Any]]:
        body = pagerduty_event(notification, routing_key=self._routing_key)
        return self._url, body, {**body, "routing_key": MASK}


def build_senders(
    config: ChannelConfig,
    attempts: AttemptLog,
    client: httpx.Client | None = None,
    **sender_kw: Any,
) -> list[Sender]:
    """The senders of the configured channels; an unconfigured one is logged and skipped.

    Args:
        config: URLs, key, retries and timeout.
        attempts: Where every try is recorded.
        client: An httpx client to share (tests pass one); made here when None.
        **sender_kw: ``sleep``, ``draw`` and ``clock`` for the senders (tests pin them).
    """
    http = client or httpx.Client(timeout=config.timeout_seconds)
    senders: list[Sender] = []
    if config.slack_webhook_url:
        senders.append(
            SlackSender(
                config.slack_webhook_url,
                http,
                config.policy,
                attempts,
                dashboard_url=config.dashboard_url,
                **sender_kw,
            )
        )
    else:
        log.warning("alerting: Slack is skipped: set alerting.slack_webhook_url to use it")
    if config.pagerduty_routing_key:
        senders.append(
            PagerDutySender(
                config.pagerduty_events_url,
                config.pagerduty_routing_key,
                http,
                config.policy,
                attempts,
                **sender_kw,
            )
        )
    else:
        log.warning("alerting: PagerDuty is skipped: set alerting.pagerduty_routing_key to use it")
    return senders
