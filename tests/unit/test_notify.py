from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.exceptions import ConfigurationError
from core.incidents import IncidentBook, Notification, Signal
from core.notify import (
    PAGERDUTY_SUMMARY_MAX,
    SLACK_HEADER_MAX,
    SLACK_SECTION_MAX,
    iso_utc,
    pagerduty_event,
    slack_message,
    truncate,
)

OPENED = 1_704_164_645_006  # 2024-01-02T03:04:05.006Z
KEY = "R0UTINGKEY0000000000000000000000"
DASH = "https://grafana.example.com/d/rayline?var-site=berlin"


def signal(at_ms: int, firing: bool = True, **overrides: Any) -> Signal:
    fields: dict[str, Any] = {
        "tenant": "acme",
        "rule_id": "high-temp",
        "group_key": "site=berlin",
        "firing": firing,
        "at_ms": at_ms,
        "summary": "temperature 85C above 80C",
        "details": {"severity": "critical", "value": 85.0},
    }
    fields.update(overrides)
    return Signal(**fields)


def lifecycle() -> tuple[Notification, Notification, Notification]:
    book = IncidentBook()
    [trigger] = book.apply(signal(OPENED))
    [ack] = book.acknowledge(trigger.dedup_key, "alice", OPENED + 1000)
    [resolve] = book.apply(signal(OPENED + 2000, False, summary="temperature back to 20C"))
    return trigger, ack, resolve


def trigger_of(**overrides: Any) -> Notification:
    [note] = IncidentBook().apply(signal(OPENED, **overrides))
    return note


# --- PagerDuty -------------------------------------------------------------------------


def test_pagerduty_trigger_has_the_exact_events_v2_shape() -> None:
    trigger, _, _ = lifecycle()
    assert pagerduty_event(trigger, routing_key=KEY) == {
        "routing_key": KEY,
        "event_action": "trigger",
        "dedup_key": trigger.incident.id,
        "payload": {
            "summary": "temperature 85C above 80C",
            "source": "rayline",
            "severity": "critical",
            "timestamp": "2024-01-02T03:04:05.006Z",
            "component": "high-temp",
            "group": "site=berlin",
            "custom_details": {
                "severity": "critical",
                "value": 85.0,
                "tenant": "acme",
                "rule_id": "high-temp",
                "group_key": "site=berlin",
                "occurrences": 1,
            },
        },
    }


@pytest.mark.parametrize("index", [1, 2])
def test_pagerduty_acknowledge_and_resolve_carry_only_the_keys(index: int) -> None:
    note = lifecycle()[index]
    assert pagerduty_event(note, routing_key=KEY, source="edge-1") == {
        "routing_key": KEY,
        "event_action": ("acknowledge", "resolve")[index - 1],
        "dedup_key": note.incident.id,
    }


def test_one_incident_shares_one_dedup_key_across_its_events() -> None:
    events = [pagerduty_event(n, routing_key=KEY) for n in lifecycle()]
    assert [e["event_action"] for e in events] == ["trigger", "acknowledge", "resolve"]
    assert len({e["dedup_key"] for e in events}) == 1


@pytest.mark.parametrize(
    ("details", "severity"),
    [
        ({"severity": "critical"}, "critical"),
        ({"severity": "Warning "}, "warning"),
        ({"severity": "info"}, "info"),
        ({"severity": "error"}, "error"),
        ({"severity": "fatal"}, "error"),  # unknown: PagerDuty would answer 400
        ({"severity": 3}, "error"),
        ({}, "error"),
    ],
)
def test_pagerduty_severity_comes_from_details(details: dict[str, Any], severity: str) -> None:
    event = pagerduty_event(trigger_of(details=details), routing_key=KEY)
    assert event["payload"]["severity"] == severity


def test_pagerduty_summary_is_truncated_to_1024() -> None:
    event = pagerduty_event(trigger_of(summary="x" * 5000), routing_key=KEY)
    summary = event["payload"]["summary"]
    assert len(summary) == PAGERDUTY_SUMMARY_MAX
    assert summary.endswith("…")


def test_pagerduty_summary_falls_back_when_the_signal_has_none() -> None:
    event = pagerduty_event(trigger_of(summary=""), routing_key=KEY)
    assert event["payload"]["summary"] == "high-temp firing for site=berlin"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"routing_key": ""}, "routing_key is empty"),
        ({"routing_key": "   "}, "routing_key is empty"),
        ({"routing_key": KEY, "source": ""}, "source is empty"),
    ],
)
def test_pagerduty_rejects_missing_settings(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        pagerduty_event(trigger_of(), **kwargs)


# --- Slack -----------------------------------------------------------------------------


def test_slack_trigger_has_the_exact_block_kit_shape() -> None:
    trigger, _, _ = lifecycle()
    assert slack_message(trigger, dashboard_url=DASH) == {
        "text": "Firing: high-temp (site=berlin): temperature 85C above 80C",
        "blocks": [
            {
                "type": "header",
                "text": {
                    "type": "plain_text",
                    "text": "Firing: high-temp (site=berlin)",
                    "emoji": True,
                },
            },
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": "temperature 85C above 80C"},
            },
            {
                "type": "section",
                "fields": [
                    {"type": "mrkdwn", "text": "*Tenant*\nacme"},
                    {"type": "mrkdwn", "text": "*Rule*\nhigh-temp"},
                    {"type": "mrkdwn", "text": "*Group*\nsite=berlin"},
                    {"type": "mrkdwn", "text": "*State*\nfiring"},
                    {"type": "mrkdwn", "text": "*Since*\n2024-01-02T03:04:05.006Z"},
                ],
            },
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open dashboard", "emoji": True},
                        "url": DASH,
                    }
                ],
            },
        ],
    }


def test_slack_acknowledge_and_resolve_say_so() -> None:
    _, ack, resolve = lifecycle()
    ack_body = slack_message(ack)
    assert ack_body["text"].startswith("Acknowledged: high-temp (site=berlin) by alice")
    assert {"type": "mrkdwn", "text": "*State*\nacknowledged (by alice)"} in (
        ack_body["blocks"][2]["fields"]
    )
    resolve_body = slack_message(resolve)
    assert resolve_body["text"] == "Resolved: high-temp (site=berlin): temperature back to 20C"
    assert resolve_body["blocks"][0]["text"]["text"] == "Resolved: high-temp (site=berlin)"
    assert {"type": "mrkdwn", "text": "*State*\nresolved (by alice)"} in (
        resolve_body["blocks"][2]["fields"]
    )


def test_slack_without_dashboard_has_no_button() -> None:
    body = slack_message(trigger_of())
    assert [b["type"] for b in body["blocks"]] == ["header", "section", "section"]


def test_slack_truncates_long_text_with_an_ellipsis() -> None:
    body = slack_message(trigger_of(summary="s" * 10_000, rule_id="r" * 400))
    header = body["blocks"][0]["text"]["text"]
    section = body["blocks"][1]["text"]["text"]
    assert (len(header), len(section), len(body["text"])) == (
        SLACK_HEADER_MAX,
        SLACK_SECTION_MAX,
        SLACK_SECTION_MAX,
    )
    assert header.endswith("…")
    assert section.endswith("…")


def test_slack_escapes_control_characters_so_summaries_cannot_ping_channels() -> None:
    body = slack_message(trigger_of(summary="<!channel> a & b > c"))
    assert body["blocks"][1]["text"]["text"] == "&lt;!channel&gt; a &amp; b &gt; c"


@given(st.text(alphabet="<>&ab", max_size=4000))
def test_slack_truncation_never_splits_an_entity(summary: str) -> None:
    text = slack_message(trigger_of(summary=summary))["blocks"][1]["text"]["text"]
    assert len(text) <= SLACK_SECTION_MAX
    body = text.removesuffix("…")
    assert body.replace("&amp;", "").replace("&lt;", "").replace("&gt;", "").count("&") == 0


@pytest.mark.parametrize(
    "url",
    [
        "https://grafana.example.com/d/x",
        "http://127.0.0.1:3000/d/x",
        "http://localhost:3000/d/x",
    ],
)
def test_slack_accepts_https_and_local_http(url: str) -> None:
    assert slack_message(trigger_of(), dashboard_url=url)["blocks"][-1]["elements"][0]["url"] == url


@pytest.mark.parametrize(
    "url",
    [
        "http://grafana.example.com/d/x",
        "ftp://grafana.example.com",
        "grafana.example.com/d/x",
        "https://",
        "javascript:alert(1)",
        "http://localhost.evil.com/",
        "https://example.com/" + "x" * 3000,
    ],
)
def test_slack_rejects_unsafe_dashboard_urls(url: str) -> None:
    with pytest.raises(ConfigurationError, match="dashboard_url"):
        slack_message(trigger_of(), dashboard_url=url)


# --- helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [("abc", 3, "abc"), ("abcd", 3, "ab…"), ("", 1, "")],
)
def test_truncate(text: str, limit: int, expected: str) -> None:
    assert truncate(text, limit) == expected


@pytest.mark.parametrize(
    ("ms", "iso"), [(0, "1970-01-01T00:00:00.000Z"), (OPENED, "2024-01-02T03:04:05.006Z")]
)
def test_iso_utc(ms: int, iso: str) -> None:
    assert iso_utc(ms) == iso


# --- acceptance ------------------------------------------------------------------------


def test_firing_repeats_then_resolve_send_one_trigger_and_one_resolve() -> None:
    book = IncidentBook()
    signals = [signal(OPENED + i * 60_000, summary=f"temperature {85 + i}C") for i in range(5)]
    signals.append(signal(OPENED + 300_000, False, summary="temperature back to 20C"))
    notes = [n for s in signals for n in book.apply(s)]
    assert [n.kind for n in notes] == ["trigger", "resolve"]
    trigger, resolve = notes

    pd_trigger = pagerduty_event(trigger, routing_key=KEY)
    pd_resolve = pagerduty_event(resolve, routing_key=KEY)
    assert pd_trigger["payload"]["summary"] == "temperature 85C"
    assert pd_trigger["payload"]["timestamp"] == "2024-01-02T03:04:05.006Z"
    assert pd_resolve == {
        "routing_key": KEY,
        "event_action": "resolve",
        "dedup_key": trigger.dedup_key,
    }

    slack_trigger = slack_message(trigger, dashboard_url=DASH)
    slack_resolve = slack_message(resolve, dashboard_url=DASH)
    assert slack_trigger["text"] == "Firing: high-temp (site=berlin): temperature 85C"
    assert slack_resolve["text"] == "Resolved: high-temp (site=berlin): temperature back to 20C"
    assert resolve.incident.occurrences == 5
    # What goes on the wire must serialise as is.
    for body in (pd_trigger, pd_resolve, slack_trigger, slack_resolve):
        assert json.loads(json.dumps(body)) == body
