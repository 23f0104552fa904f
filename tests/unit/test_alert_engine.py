"""The alerting engine with an in-memory feed and store, and the real HTTP senders on
httpx's MockTransport: what reaches Slack and PagerDuty, when, and how often."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import pytest

from actors.alerting import AlertEngine, EngineConfig
from adapters.alert_store import (
    AckRequest,
    EngineState,
    OutboxItem,
    StepWrite,
    notification_from,
    notification_json,
)
from adapters.notifiers import (
    MASK,
    ChannelConfig,
    DeliveryAttempt,
    PagerDutySender,
    Sender,
    build_senders,
)
from core.exceptions import ConfigurationError
from core.incidents import Incident, Notification, RetryPolicy, Silence
from core.sealed import MINUTE_MS, SealedWindow

T0 = 1_700_000_040_000 - 1_700_000_040_000 % MINUTE_MS
ROUTING_KEY = "R0UTINGKEY0123456789012345678901"
SLACK_URL = "https://hooks.slack.test/services/T/B/secret"
PD_URL = "https://events.pagerduty.test/v2/enqueue"
RULE = {
    "id": "orders-spike",
    "tenant": "acme",
    "type": "orders",
    "window": "1m",
    "metric": "count",
    "condition": {"kind": "anomaly", "detector": {"kind": "mad", "window": 30, "min_samples": 10}},
    "severity": "critical",
    "summary": "Orders unusual",
}


class FakeStore:
    """In memory, with the semantics of adapters.alert_store.AlertStore."""

    def __init__(self, rules: list[dict[str, Any]] | None = None) -> None:
        self.rule_specs = list(rules or [])
        self.active_silences: list[Silence] = []
        self.state: str | None = None
        self.incidents: dict[str, Incident] = {}
        self.outbox: dict[int, tuple[str, str, bool | None]] = {}
        self.acks: dict[int, tuple[AckRequest, str | None]] = {}
        self.attempts: list[DeliveryAttempt] = []
        self.fail_commit = False

    def rules(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rule_specs]

    def silences(self, now_ms: int) -> list[Silence]:
        return [s for s in self.active_silences if s.ends_ms > now_ms]

    def load_state(self, name: str) -> EngineState | None:
        return None if self.state is None else EngineState(**json.loads(self.state))

    def commit(self, name: str, write: StepWrite) -> None:
        if self.fail_commit:
            from adapters.exceptions import StoreUnavailable

            raise StoreUnavailable("PostgreSQL alert store failed: test")
        for incident in write.incidents:
            self.incidents[incident.id] = incident.copy()
        for channel, note in write.outbox:
            self.outbox[len(self.outbox) + 1] = (channel, notification_json(note), None)
        for ack_id, outcome in write.acks_done:
            self.acks[ack_id] = (self.acks[ack_id][0], outcome)
        self.state = json.dumps(write.state.__dict__)

    def pending_outbox(self, limit: int = 100) -> list[OutboxItem]:
        return [
            OutboxItem(i, ch, notification_from(raw))
            for i, (ch, raw, done) in sorted(self.outbox.items())
            if done is None
        ][:limit]

    def finish_outbox(self, item_id: int, delivered: bool) -> None:
        channel, raw, _ = self.outbox[item_id]
        self.outbox[item_id] = (channel, raw, delivered)

    def pending_acks(self, limit: int = 100) -> list[AckRequest]:
        return [a for a, outcome in self.acks.values() if outcome is None][:limit]

    def record(self, attempt: DeliveryAttempt) -> None:
        self.attempts.append(attempt)


class ListFeed:
    def __init__(self, rows: list[dict[str, Any]] | None = None) -> None:
        self.rows = list(rows or [])

    def sealed_windows(self, after_ms: int, limit: int) -> list[dict[str, Any]]:
        newer = sorted((r for r in self.rows if r["start"] > after_ms), key=lambda r: r["start"])
        return newer[:limit]


class Receiver:
    """An HTTP receiver behind httpx.MockTransport: records bodies, answers per script."""

    def __init__(self, statuses: Mapping[str, list[int]] | None = None) -> None:
        self.bodies: dict[str, list[dict[str, Any]]] = {"slack": [], "pagerduty": []}
        self._statuses = {k: list(v) for k, v in (statuses or {}).items()}
        self.headers: dict[str, str] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        channel = "slack" if request.url.host == "hooks.slack.test" else "pagerduty"
        self.bodies[channel].append(json.loads(request.content))
        script = self._statuses.get(channel)
        status = script.pop(0) if script else 202
        return httpx.Response(status, headers=self.headers, json={"status": "ok"})


def window(minute: int, count: int, group: str = "", tenant: str = "acme") -> dict[str, Any]:
    return SealedWindow(
        tenant=tenant,
        type="orders",
        start=T0 + minute * MINUTE_MS,
        group_key=group,
        count=count,
        sum=float(count),
        min=1.0,
        max=1.0,
        distinct=None,
        quantiles=None,
    ).to_row()


def steady(first: int, last: int) -> list[dict[str, Any]]:
    return [window(m, 100 + m % 3) for m in range(first, last)]


def make_engine(
    store: FakeStore,
    feed: ListFeed,
    receiver: Receiver,
    *,
    attempts: int = 3,
    sleeps: list[float] | None = None,
    matches: Any = None,
    clock: Callable[[], float] = lambda: (T0 + 120 * MINUTE_MS) / 1000,
    limit: int = 5000,
) -> AlertEngine:
    client = httpx.Client(transport=httpx.MockTransport(receiver))
    config = ChannelConfig(
        slack_webhook_url=SLACK_URL,
        pagerduty_routing_key=ROUTING_KEY,
        pagerduty_events_url=PD_URL,
        policy=RetryPolicy(attempts=attempts, base_ms=500, max_ms=4000),
    )
    naps = sleeps if sleeps is not None else []
    senders = build_senders(config, store, client, sleep=naps.append, draw=lambda: 0.5)
    return AlertEngine(
        store,
        feed,
        senders,
        matches=matches,
        clock=clock,
        config=EngineConfig(batch_limit=limit, first_cursor_ms=0),
    )


def actions(receiver: Receiver) -> list[tuple[str, str]]:
    slack = [
        (b["blocks"][0]["text"]["text"].split(":")[0], "slack") for b in receiver.bodies["slack"]
    ]
    pd = [(b["event_action"], "pagerduty") for b in receiver.bodies["pagerduty"]]
    return slack + pd


def test_one_anomaly_fires_one_incident_and_resolves_when_normal_again() -> None:
    store, feed, receiver = FakeStore([RULE]), ListFeed(steady(0, 20)), Receiver()
    engine = make_engine(store, feed, receiver)
    engine.step()
    assert receiver.bodies == {"slack": [], "pagerduty": []}, "a steady series must not page"

    feed.rows.append(window(20, 900))
    engine.step()
    [incident] = engine.open_incidents()
    assert incident.state == "firing"
    assert store.incidents[incident.id].state == "firing"
    [trigger] = receiver.bodies["pagerduty"]
    assert trigger["event_action"] == "trigger"
    assert trigger["routing_key"] == ROUTING_KEY
    assert trigger["dedup_key"] == incident.id
    assert trigger["payload"]["severity"] == "critical"
    assert receiver.bodies["slack"][0]["blocks"][0]["text"]["text"].startswith("Firing")

    feed.rows.extend(steady(21, 25))
    engine.step()
    assert engine.open_incidents() == []
    assert [i.state for i in store.incidents.values()] == ["resolved"]
    assert sorted(actions(receiver)) == [
        ("Firing", "slack"),
        ("Resolved", "slack"),
        ("resolve", "pagerduty"),
        ("trigger", "pagerduty"),
    ]
    assert receiver.bodies["pagerduty"][1]["dedup_key"] == incident.id
    logged = [(a.channel, a.action, a.delivered) for a in store.attempts]
    assert sorted(logged) == [
        ("pagerduty", "resolve", True),
        ("pagerduty", "trigger", True),
        ("slack", "resolve", True),
        ("slack", "trigger", True),
    ]
    assert all(a.payload.get("routing_key") in (None, MASK) for a in store.attempts)


def test_restart_from_the_snapshot_neither_renotifies_nor_forgets() -> None:
    store, feed, receiver = (
        FakeStore([RULE]),
        ListFeed([*steady(0, 20), window(20, 900)]),
        Receiver(),
    )
    make_engine(store, feed, receiver).step()
    assert len(receiver.bodies["pagerduty"]) == 1

    restarted = make_engine(store, feed, receiver)
    restarted.step()
    assert len(receiver.bodies["pagerduty"]) == 1, "a restart paged again"
    assert [i.state for i in restarted.open_incidents()] == ["firing"]

    feed.rows.extend(steady(21, 23))
    restarted.step()
    assert [b["event_action"] for b in receiver.bodies["pagerduty"]] == ["trigger", "resolve"]


def test_a_failed_commit_is_redone_from_the_last_committed_state() -> None:
    store, feed, receiver = FakeStore([RULE]), ListFeed(steady(0, 20)), Receiver()
    engine = make_engine(store, feed, receiver)
    engine.step()
    feed.rows.append(window(20, 900))
    store.fail_commit = True
    with pytest.raises(Exception, match="alert store failed"):
        engine.step()
    assert receiver.bodies["pagerduty"] == [], "sent before the step was committed"
    store.fail_commit = False
    engine.step()
    assert [b["event_action"] for b in receiver.bodies["pagerduty"]] == ["trigger"]


def test_500_is_retried_with_backoff_until_delivered() -> None:
    store, sleeps = FakeStore([RULE]), list[float]()
    receiver = Receiver({"pagerduty": [500, 503, 202]})
    feed = ListFeed([*steady(0, 20), window(20, 900)])
    make_engine(store, feed, receiver, attempts=5, sleeps=sleeps).step()
    pd = [
        (a.attempt, a.status_code, a.delivered) for a in store.attempts if a.channel == "pagerduty"
    ]
    assert pd == [(1, 500, False), (2, 503, False), (3, 202, True)]
    # Full jitter pinned at 0.5: half of 500 ms, then half of 1000 ms.
    assert sleeps == [0.25, 0.5]
    assert [done for _ch, _raw, done in store.outbox.values()] == [True, True]


def test_delivery_gives_up_after_the_last_attempt_and_logs_each() -> None:
    store, sleeps = FakeStore([RULE]), list[float]()
    receiver = Receiver({"pagerduty": [500] * 10})
    feed = ListFeed([*steady(0, 20), window(20, 900)])
    report = make_engine(store, feed, receiver, attempts=3, sleeps=sleeps).step()
    pd = [a for a in store.attempts if a.channel == "pagerduty"]
    assert [(a.attempt, a.delivered) for a in pd] == [(1, False), (2, False), (3, False)]
    assert "HTTP 500" in (pd[-1].error or "")
    assert (report.delivered, report.failed) == (1, 1)
    assert sleeps == [0.25, 0.5]


@pytest.mark.parametrize(
    ("status", "headers", "tries", "naps"),
    [
        (400, {}, 1, []),  # the request is wrong: repeating it cannot help
        (429, {"retry-after": "3"}, 2, [3.0]),  # the receiver's wish wins over the jitter
        (429, {"retry-after": "3600"}, 2, [4.0]),  # but never past the policy's cap
    ],
)
def test_what_is_retried_and_for_how_long(
    status: int, headers: dict[str, str], tries: int, naps: list[float]
) -> None:
    answers = iter([status, 202])
    seen: list[float] = []

    def reply(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(answers), headers=headers)

    store = FakeStore()
    sender = PagerDutySender(
        PD_URL,
        ROUTING_KEY,
        httpx.Client(transport=httpx.MockTransport(reply)),
        RetryPolicy(attempts=3, base_ms=500, max_ms=4000),
        store,
        sleep=seen.append,
        draw=lambda: 0.5,
    )
    incident = Incident("abc", "acme", "r", "", "firing", T0, T0)
    assert sender.deliver(Notification("trigger", incident)) is (tries == 2)
    assert len(store.attempts) == tries
    assert seen == naps


def test_connection_errors_are_retried() -> None:
    calls = []

    def reply(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200)

    store = FakeStore()
    sender = PagerDutySender(
        PD_URL,
        ROUTING_KEY,
        httpx.Client(transport=httpx.MockTransport(reply)),
        RetryPolicy(attempts=3),
        store,
        sleep=lambda _s: None,
    )
    assert sender.deliver(Notification("trigger", Incident("a", "t", "r", "", "firing", 1, 1)))
    assert [a.status_code for a in store.attempts] == [None, 200]
    assert "ConnectError" in (store.attempts[0].error or "")


def test_an_unconfigured_channel_is_skipped_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    senders: list[Sender] = build_senders(
        ChannelConfig(slack_webhook_url=None, pagerduty_routing_key=ROUTING_KEY), FakeStore()
    )
    assert [s.channel for s in senders] == ["pagerduty"]
    assert [r.message for r in caplog.records if "Slack is skipped" in r.message] != []


def test_acknowledge_request_notifies_both_channels_once() -> None:
    store, feed, receiver = (
        FakeStore([RULE]),
        ListFeed([*steady(0, 20), window(20, 900)]),
        Receiver(),
    )
    engine = make_engine(store, feed, receiver)
    engine.step()
    [incident] = engine.open_incidents()
    store.acks[1] = (AckRequest(1, incident.id, "acme", "alice", T0 + 30 * MINUTE_MS), None)
    store.acks[2] = (AckRequest(2, "no-such-incident", "acme", "bob", T0), None)
    engine.step()
    engine.step()
    ack = receiver.bodies["pagerduty"][-1]
    assert ack == {
        "routing_key": ROUTING_KEY,
        "event_action": "acknowledge",
        "dedup_key": incident.id,
    }
    assert len(receiver.bodies["pagerduty"]) == 2
    assert "by alice" in receiver.bodies["slack"][-1]["text"]
    assert store.incidents[incident.id].state == "acknowledged"
    assert {k: v[1] for k, v in store.acks.items()} == {1: "acknowledged", 2: "not open"}


def test_a_silenced_incident_is_recorded_but_never_sent() -> None:
    store, feed, receiver = (
        FakeStore([RULE]),
        ListFeed([*steady(0, 20), window(20, 900)]),
        Receiver(),
    )
    store.active_silences = [Silence("acme", T0, T0 + 600 * MINUTE_MS, rule_id="orders-spike")]
    engine = make_engine(store, feed, receiver)
    engine.step()
    [incident] = store.incidents.values()
    assert (incident.state, incident.silenced) == ("firing", True)
    feed.rows.extend(steady(21, 23))
    engine.step()
    assert store.incidents[incident.id].state == "resolved"
    assert receiver.bodies == {"slack": [], "pagerduty": []}


def test_deleting_a_rule_resolves_its_open_incidents() -> None:
    store, feed, receiver = (
        FakeStore([RULE]),
        ListFeed([*steady(0, 20), window(20, 900)]),
        Receiver(),
    )
    engine = make_engine(store, feed, receiver)
    engine.step()
    store.rule_specs = []
    engine.step()
    assert engine.open_incidents() == []
    resolve = receiver.bodies["pagerduty"][-1]
    assert resolve["event_action"] == "resolve"
    assert "deleted or disabled" in receiver.bodies["slack"][-1]["text"]


def test_a_minute_cut_by_the_batch_limit_is_read_whole_next_time() -> None:
    threshold = {**RULE, "condition": {"kind": "threshold", "op": ">", "value": 500}}
    rows = [window(m, 100, group=g) for m in range(4) for g in ("a", "b", "c")]
    rows.append(window(4, 900, group="c"))
    store, feed, receiver = FakeStore([threshold]), ListFeed(rows), Receiver()
    engine = make_engine(store, feed, receiver, limit=4)
    reports = [engine.step() for _ in range(6)]
    assert sum(r.windows for r in reports) == len(rows), "a window was skipped or read twice"
    assert [i.group_key for i in engine.open_incidents()] == ["c"]


class ListMatches:
    def __init__(self, matches: list[dict[str, Any]]) -> None:
        self.matches = matches

    def poll(
        self, offsets: Mapping[str, int], max_records: int
    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        start = offsets.get("0", 0)
        found = self.matches[start : start + max_records]
        return found, {"0": start + len(found)}

    def reset(self) -> None:
        pass


def test_cep_matches_open_one_incident_per_key_and_resolve_when_quiet() -> None:
    rule = {
        "id": "velocity",
        "tenant": "acme",
        "condition": {"kind": "cep", "rule_id": "card-velocity", "quiet_minutes": 5},
    }
    match = {"alert_id": "x", "rule_id": "card-velocity", "tenant": "acme", "key": "card-1"}
    matches = ListMatches(
        [
            {**match, "ts": T0, "severity": "critical"},
            {**match, "ts": T0 + 60_000, "severity": "critical"},
            {**match, "tenant": "other", "ts": T0},
        ]
    )
    now = [T0 / 1000 + 120]
    store, receiver = FakeStore([rule]), Receiver()
    engine = make_engine(store, ListFeed(), receiver, matches=matches, clock=lambda: now[0])
    engine.step()
    [incident] = engine.open_incidents()
    assert (incident.group_key, incident.occurrences) == ("card-1", 2)
    assert [b["event_action"] for b in receiver.bodies["pagerduty"]] == ["trigger"]
    assert receiver.bodies["pagerduty"][0]["payload"]["severity"] == "critical"
    now[0] = T0 / 1000 + 6 * 60
    engine.step()
    assert engine.open_incidents() == []
    assert [b["event_action"] for b in receiver.bodies["pagerduty"]] == ["trigger", "resolve"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"metric": "median"}, "metric"),
        ({"condition": {"kind": "threshold", "op": "~", "value": 1}}, "condition.op"),
        ({"window": "5m"}, "window"),
        ({"tenant": "someone-else"}, "tenant"),
        ({"id": "other-id"}, "id"),
        ({"enabled": "yes"}, "enabled"),
    ],
)
def test_the_api_names_the_field_of_a_bad_rule(change: dict[str, Any], field: str) -> None:
    from serve_apps.alerting import ApiError, _checked_spec

    with pytest.raises(ApiError) as caught:
        _checked_spec({**RULE, **change}, "acme", "orders-spike")
    assert caught.value.status == 422
    assert caught.value.errors is not None
    assert caught.value.errors[0]["field"] == field


def test_a_cep_rule_spec_round_trips() -> None:
    from core.cep_alerts import CepAlertRule, parse_rule_spec

    spec = {
        "id": "v",
        "tenant": "acme",
        "condition": {"kind": "cep", "rule_id": "card-velocity", "quiet_minutes": 3},
        "summary": "Velocity",
    }
    rule = parse_rule_spec(spec)
    assert isinstance(rule, CepAlertRule)
    assert parse_rule_spec(rule.to_spec()) == rule
    quiet = {**spec, "condition": {"kind": "cep", "rule_id": "x", "quiet_minutes": 0}}
    with pytest.raises(ConfigurationError, match=r"'condition\.quiet_minutes'"):
        parse_rule_spec(quiet)
    with pytest.raises(ConfigurationError, match="unknown keys"):
        parse_rule_spec({**spec, "metric": "count"})
