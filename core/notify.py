"""The bodies the notification channels receive, built from a Notification.

Pure builders: the HTTP sending, its retries and its log live in the adapters. Two
channels are covered:

* Slack incoming webhooks: a ``text`` fallback (shown in push notifications and by
  clients without Block Kit) plus ``blocks``.
* PagerDuty Events API v2: ``trigger`` / ``acknowledge`` / ``resolve`` events that share
  one ``dedup_key``, the incident id, so PagerDuty folds them into one incident.

Both services reject or cut over-long text, so every text is truncated here, visibly.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit

from core.exceptions import ConfigurationError
from core.incidents import Incident, Notification

# Slack Block Kit limits (characters).
SLACK_HEADER_MAX: Final = 150
SLACK_SECTION_MAX: Final = 3000
SLACK_FIELD_MAX: Final = 2000
SLACK_URL_MAX: Final = 3000
# PagerDuty Events API v2: payload.summary is cut at 1024 characters.
PAGERDUTY_SUMMARY_MAX: Final = 1024
PAGERDUTY_SEVERITIES: Final = ("critical", "error", "warning", "info")
DEFAULT_SEVERITY: Final = "error"
ELLIPSIS: Final = "…"

_LOCAL_HOSTS: Final = frozenset({"127.0.0.1", "localhost"})
_PARTIAL_ENTITY = re.compile(r"&[a-z]*$")

_SLACK_HEADINGS: Final = {
    "trigger": "Firing",
    "acknowledge": "Acknowledged",
    "resolve": "Resolved",
}


def truncate(text: str, limit: int) -> str:
    """Cuts ``text`` to at most ``limit`` characters, ending in an ellipsis when cut."""
    if len(text) <= limit:
        return text
    return text[: limit - len(ELLIPSIS)] + ELLIPSIS


def iso_utc(epoch_ms: int) -> str:
    """Formats epoch milliseconds as ISO 8601 UTC, e.g. ``2024-01-02T03:04:05.006Z``."""
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def slack_message(
    notification: Notification, *, dashboard_url: str | None = None
) -> dict[str, Any]:
    """Builds a Slack incoming-webhook body for one notification.

    Args:
        notification: what happened to which incident.
        dashboard_url: where the button points; https, or http on localhost for tests.

    Raises:
        ConfigurationError: the dashboard URL is not https (nor local) or too long.
    """
    if dashboard_url is not None:
        _check_dashboard_url(dashboard_url)
    incident = notification.incident
    title = _slack_title(notification)
    summary = incident.last_summary or title
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": _plain(truncate(title, SLACK_HEADER_MAX))},
        {"type": "section", "text": _mrkdwn(_slack_escape(summary, SLACK_SECTION_MAX))},
        {"type": "section", "fields": _slack_fields(incident)},
    ]
    if dashboard_url is not None:
        button = {"type": "button", "text": _plain("Open dashboard"), "url": dashboard_url}
        blocks.append({"type": "actions", "elements": [button]})
    text = f"{title}: {summary}" if incident.last_summary else title
    return {"text": _slack_escape(text, SLACK_SECTION_MAX), "blocks": blocks}


def pagerduty_event(
    notification: Notification, *, routing_key: str, source: str = "rayline"
) -> dict[str, Any]:
    """Builds a PagerDuty Events API v2 body for one notification.

    Acknowledge and resolve events carry only the routing key, the action and the
    dedup key: PagerDuty ignores a payload on them.

    Raises:
        ConfigurationError: the routing key or the source is empty.
    """
    if not routing_key.strip():
        raise ConfigurationError("PagerDuty routing_key is empty: set the integration key")
    if not source.strip():
        raise ConfigurationError("PagerDuty source is empty: name the sending system")
    event: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": notification.kind,
        "dedup_key": notification.dedup_key,
    }
    if notification.kind == "trigger":
        event["payload"] = _pagerduty_payload(notification.incident, source)
    return event


def severity_of(incident: Incident) -> str:
    """The PagerDuty severity from the rule's details, ``error`` when absent or unknown.

    An unknown value falls back instead of raising: PagerDuty answers 400 to a bad
    severity, and a page that is lost over a typo is worse than one at the wrong level.
    """
    raw = incident.details.get("severity")
    value = raw.strip().lower() if isinstance(raw, str) else ""
    return value if value in PAGERDUTY_SEVERITIES else DEFAULT_SEVERITY


def _pagerduty_payload(incident: Incident, source: str) -> dict[str, Any]:
    summary = incident.last_summary or f"{incident.rule_id} firing for {incident.group_key}"
    return {
        "summary": truncate(summary, PAGERDUTY_SUMMARY_MAX),
        "source": source,
        "severity": severity_of(incident),
        "timestamp": iso_utc(incident.opened_ms),
        "component": incident.rule_id,
        "group": incident.group_key,
        "custom_details": {
            **incident.details,
            "tenant": incident.tenant,
            "rule_id": incident.rule_id,
            "group_key": incident.group_key,
            "occurrences": incident.occurrences,
        },
    }


def _slack_title(notification: Notification) -> str:
    incident = notification.incident
    title = f"{_SLACK_HEADINGS[notification.kind]}: {incident.rule_id} ({incident.group_key})"
    if notification.kind == "acknowledge" and incident.acknowledged_by:
        title += f" by {incident.acknowledged_by}"
    return title


def _slack_fields(incident: Incident) -> list[dict[str, str]]:
    state: str = incident.state
    if incident.acknowledged_by:
        state += f" (by {incident.acknowledged_by})"
    pairs = (
        ("Tenant", incident.tenant),
        ("Rule", incident.rule_id),
        ("Group", incident.group_key),
        ("State", state),
        ("Since", iso_utc(incident.opened_ms)),
    )
    return [_mrkdwn(_slack_escape(f"*{name}*\n{value}", SLACK_FIELD_MAX)) for name, value in pairs]


def _slack_escape(text: str, limit: int) -> str:
    """Escapes Slack's control characters, then truncates without splitting an entity.

    Unescaped ``<`` would let a summary inject links or mentions such as ``<!channel>``.
    """
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if len(escaped) <= limit:
        return escaped
    head = _PARTIAL_ENTITY.sub("", escaped[: limit - len(ELLIPSIS)])
    return head + ELLIPSIS


def _plain(text: str) -> dict[str, Any]:
    return {"type": "plain_text", "text": text, "emoji": True}


def _mrkdwn(text: str) -> dict[str, str]:
    return {"type": "mrkdwn", "text": text}


def _check_dashboard_url(url: str) -> None:
    parts = urlsplit(url)
    local_http = parts.scheme == "http" and parts.hostname in _LOCAL_HOSTS
    if not (parts.scheme == "https" and parts.hostname) and not local_http:
        raise ConfigurationError(
            f"dashboard_url must be an https URL (http only on localhost), got {url!r}"
        )
    if len(url) > SLACK_URL_MAX:
        raise ConfigurationError(
            f"dashboard_url is {len(url)} characters; Slack buttons take at most {SLACK_URL_MAX}"
        )
