from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.exceptions import ConfigurationError, InvalidInputError
from core.incidents import (
    Incident,
    IncidentBook,
    Notification,
    RetryPolicy,
    Signal,
    Silence,
    incident_id,
)

MINUTE = 60_000


def sig(
    at_ms: int,
    firing: bool = True,
    *,
    tenant: str = "acme",
    rule: str = "high-temp",
    group: str = "site=berlin",
    summary: str = "temperature above 80C",
    details: dict[str, Any] | None = None,
) -> Signal:
    return Signal(tenant, rule, group, firing, at_ms, summary, details or {"severity": "critical"})


def kinds(notes: list[Notification]) -> list[str]:
    return [n.kind for n in notes]


def run(signals: list[Signal], silences: list[Silence] | None = None) -> list[Notification]:
    book = IncidentBook()
    return [n for s in signals for n in book.apply(s, silences or [])]


# --- lifecycle ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signals", "expected"),
    [
        pytest.param([sig(0)], ["trigger"], id="first-firing-triggers"),
        pytest.param([sig(0), sig(1), sig(2)], ["trigger"], id="repeats-deduplicated"),
        pytest.param([sig(0), sig(1), sig(2, False)], ["trigger", "resolve"], id="resolves"),
        pytest.param([sig(0, False)], [], id="resolve-without-incident-is-quiet"),
        pytest.param(
            [sig(0), sig(1, False), sig(2, False)], ["trigger", "resolve"], id="one-resolve"
        ),
        pytest.param(
            [sig(0), sig(1, False), sig(2)], ["trigger", "resolve", "trigger"], id="refires-new"
        ),
        pytest.param([sig(5), sig(3, False)], ["trigger"], id="late-resolve-ignored"),
        pytest.param(
            [sig(0), sig(5, False), sig(3)], ["trigger", "resolve"], id="late-firing-no-reopen"
        ),
    ],
)
def test_signals_produce_the_expected_notifications(
    signals: list[Signal], expected: list[str]
) -> None:
    assert kinds(run(signals)) == expected


def test_repeated_firing_counts_occurrences_and_keeps_latest_summary() -> None:
    book = IncidentBook()
    book.apply(sig(0))
    book.apply(sig(MINUTE, summary="now 85C"))
    book.apply(sig(2 * MINUTE, summary="now 90C"))
    [incident] = book.open_incidents()
    assert (incident.occurrences, incident.last_summary) == (3, "now 90C")
    assert (incident.opened_ms, incident.updated_ms, incident.state) == (0, 2 * MINUTE, "firing")


def test_resolve_notification_carries_the_resolved_incident() -> None:
    book = IncidentBook()
    [trigger] = book.apply(sig(0))
    [resolve] = book.apply(sig(MINUTE, False, summary="back to 20C"))
    assert resolve.incident.state == "resolved"
    assert resolve.incident.resolved_ms == MINUTE
    assert resolve.incident.last_summary == "back to 20C"
    assert resolve.dedup_key == trigger.dedup_key == trigger.incident.id
    assert book.open_incidents() == []


def test_notification_is_a_snapshot_not_the_live_incident() -> None:
    book = IncidentBook()
    [trigger] = book.apply(sig(0))
    book.apply(sig(1, summary="changed"))
    assert (trigger.incident.occurrences, trigger.incident.last_summary) == (
        1,
        "temperature above 80C",
    )


def test_groups_tenants_and_rules_are_separate_incidents() -> None:
    signals = [
        sig(0),
        sig(0, group="site=paris"),
        sig(0, tenant="globex"),
        sig(0, rule="low-battery"),
        sig(1),
    ]
    notes = run(signals)
    assert kinds(notes) == ["trigger"] * 4
    assert len({n.dedup_key for n in notes}) == 4


def test_late_firing_signal_does_not_count() -> None:
    book = IncidentBook()
    book.apply(sig(10))
    assert book.apply(sig(5)) == []
    assert book.open_incidents()[0].occurrences == 1


# --- ids -------------------------------------------------------------------------------


def test_replay_of_the_same_signals_gives_the_same_ids() -> None:
    signals = [sig(0), sig(1), sig(2, False), sig(3)]
    first = [n.dedup_key for n in run(signals)]
    assert first == [n.dedup_key for n in run(signals)]
    assert first[0] == first[1] != first[2]


@given(st.text(), st.text(), st.text(), st.integers(0, 2**45))
def test_incident_id_is_short_and_stable(tenant: str, rule: str, group: str, at: int) -> None:
    ident = incident_id(tenant, rule, group, at)
    assert len(ident) == 16
    assert ident == incident_id(tenant, rule, group, at)
    assert ident != incident_id(tenant, rule, group, at + 1)


def test_incident_id_does_not_confuse_shifted_fields() -> None:
    assert incident_id("a", "bc", "g", 0) != incident_id("ab", "c", "g", 0)


# --- acknowledge ---------------------------------------------------------------------


def test_acknowledge_notifies_once_and_resolve_still_follows() -> None:
    book = IncidentBook()
    [trigger] = book.apply(sig(0))
    [ack] = book.acknowledge(trigger.dedup_key, "alice", MINUTE)
    assert (ack.kind, ack.incident.state, ack.incident.acknowledged_by) == (
        "acknowledge",
        "acknowledged",
        "alice",
    )
    assert book.acknowledge(trigger.dedup_key, "bob", 2 * MINUTE) == []
    assert book.apply(sig(3 * MINUTE)) == []
    [resolve] = book.apply(sig(4 * MINUTE, False))
    assert (resolve.kind, resolve.incident.acknowledged_by) == ("resolve", "alice")
    assert len({trigger.dedup_key, ack.dedup_key, resolve.dedup_key}) == 1


def test_acknowledge_stamped_ahead_of_signal_time_does_not_block_the_resolve() -> None:
    book = IncidentBook()
    [trigger] = book.apply(sig(0))
    [ack] = book.acknowledge(trigger.dedup_key, "alice", 10 * MINUTE)
    assert ack.incident.acknowledged_ms == 10 * MINUTE
    assert kinds(book.apply(sig(MINUTE, False))) == ["resolve"]


@pytest.mark.parametrize("resolve_first", [True, False])
def test_acknowledging_an_unknown_or_resolved_incident_is_refused(resolve_first: bool) -> None:
    book = IncidentBook()
    [trigger] = book.apply(sig(0))
    if resolve_first:
        book.apply(sig(1, False))
    target = trigger.dedup_key if resolve_first else "nope"
    with pytest.raises(InvalidInputError, match="no open incident"):
        book.acknowledge(target, "alice", 2)


# --- silences --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("silence", "silenced"),
    [
        (Silence("acme", 0, MINUTE), True),
        (Silence("acme", 0, MINUTE, rule_id="high-temp"), True),
        (Silence("acme", 0, MINUTE, group_key="site=berlin"), True),
        (Silence("acme", 0, MINUTE, rule_id="high-temp", group_key="site=berlin"), True),
        (Silence("acme", 0, MINUTE, rule_id="other"), False),
        (Silence("acme", 0, MINUTE, group_key="site=paris"), False),
        (Silence("globex", 0, MINUTE), False),
        (Silence("acme", 10, MINUTE), False),  # not started yet
        (Silence("acme", -MINUTE, 5), False),  # ends exactly at the signal
    ],
)
def test_silence_matching(silence: Silence, silenced: bool) -> None:
    assert silence.matches(sig(5)) is silenced
    assert kinds(run([sig(5)], [silence])) == ([] if silenced else ["trigger"])


def test_silenced_incident_opens_but_never_notifies() -> None:
    book = IncidentBook()
    silence = Silence("acme", 0, 10 * MINUTE, comment="maintenance")
    assert book.apply(sig(0), [silence]) == []
    [incident] = book.open_incidents()
    assert incident.silenced
    assert book.acknowledge(incident.id, "alice", 1) == []
    assert book.apply(sig(MINUTE, False), [silence]) == []
    assert book.open_incidents() == []


def test_trigger_is_sent_when_the_silence_ends_while_still_firing() -> None:
    book = IncidentBook()
    silence = Silence("acme", 0, MINUTE)
    assert book.apply(sig(0), [silence]) == []
    [trigger] = book.apply(sig(2 * MINUTE), [silence])
    assert (trigger.kind, trigger.incident.opened_ms, trigger.incident.occurrences) == (
        "trigger",
        0,
        2,
    )
    assert kinds(book.apply(sig(3 * MINUTE, False), [silence])) == ["resolve"]


def test_silence_that_ends_before_it_starts_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="ends"):
        Silence("acme", 10, 10)


# --- snapshot --------------------------------------------------------------------------


def test_snapshot_survives_json_and_restores_the_lifecycle() -> None:
    book = IncidentBook()
    [trigger] = book.apply(sig(0, details={"severity": "warning", "value": 81.5}))
    book.apply(sig(0, group="site=paris"), [Silence("acme", 0, MINUTE, group_key="site=paris")])
    book.acknowledge(trigger.dedup_key, "alice", 1)
    restored = IncidentBook.restore(json.loads(json.dumps(book.snapshot())))
    assert restored.open_incidents() == book.open_incidents()
    # Dedup and resolve keep working across the restart.
    assert restored.apply(sig(2)) == []
    [resolve] = restored.apply(sig(3, False))
    assert (resolve.dedup_key, resolve.incident.acknowledged_by) == (trigger.dedup_key, "alice")
    assert restored.apply(sig(3, False, group="site=paris")) == []


def test_restored_book_still_ignores_late_signals_of_resolved_incidents() -> None:
    book = IncidentBook()
    book.apply(sig(0))
    book.apply(sig(10, False))
    restored = IncidentBook.restore(json.loads(json.dumps(book.snapshot())))
    assert restored.apply(sig(5)) == []
    assert kinds(restored.apply(sig(11))) == ["trigger"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"version": 99, "incidents": []}, "version"),
        ({"version": 1, "incidents": ["x"]}, "not an object"),
        ({"version": 1, "incidents": [{"id": "x"}]}, "malformed"),
    ],
)
def test_restore_rejects_bad_snapshots(data: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        IncidentBook.restore(data)


def test_restore_rejects_unknown_state() -> None:
    raw = IncidentBook()
    raw.apply(sig(0))
    data = raw.snapshot()
    data["incidents"][0]["state"] = "snoozed"
    with pytest.raises(InvalidInputError, match="snoozed"):
        IncidentBook.restore(data)


@given(st.lists(st.tuples(st.integers(0, 50), st.booleans(), st.sampled_from("ab")), max_size=40))
def test_notifications_alternate_trigger_then_resolve_per_group(
    steps: list[tuple[int, bool, str]],
) -> None:
    book = IncidentBook()
    last: dict[str, str] = {}
    for at, firing, group in steps:
        for note in book.apply(sig(at, firing, group=group)):
            # Never two triggers or two resolves in a row for one group.
            assert last.get(group, "resolve") != note.kind
            last[group] = note.kind
    open_groups = {i.group_key for i in book.open_incidents()}
    assert open_groups == {g for g, k in last.items() if k == "trigger"}


def test_incident_copy_is_independent() -> None:
    incident = Incident("i", "t", "r", "g", "firing", 0, 0, details={"a": 1})
    copy = incident.copy()
    copy.details["a"] = 2
    assert incident.details == {"a": 1}


# --- retries ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "unit", "expected"),
    [
        (1, 0.999, 499),
        (1, 0.0, 0),
        (2, 0.5, 500),
        (3, 0.5, 1000),
        (4, 0.5, 2000),
        (5, 0.5, None),  # fifth try failed: attempts spent
        (9, 0.5, None),
    ],
)
def test_backoff_doubles_with_full_jitter_until_attempts_are_spent(
    attempt: int, unit: float, expected: int | None
) -> None:
    assert RetryPolicy(attempts=5, base_ms=500, max_ms=60_000).next_delay_ms(attempt, unit) == (
        expected
    )


@given(st.integers(1, 60), st.floats(0.0, 1.0, exclude_max=True))
def test_backoff_never_exceeds_the_cap(attempt: int, unit: float) -> None:
    delay = RetryPolicy(attempts=100, base_ms=100, max_ms=5_000).next_delay_ms(attempt, unit)
    assert delay is not None
    assert 0 <= delay < 5_000


@pytest.mark.parametrize(("attempt", "unit"), [(0, 0.5), (1, 1.0), (1, -0.1)])
def test_backoff_rejects_bad_arguments(attempt: int, unit: float) -> None:
    with pytest.raises(ValueError, match=r"must be|counts from"):
        RetryPolicy().next_delay_ms(attempt, unit)


@pytest.mark.parametrize("kwargs", [{"attempts": 0}, {"base_ms": 0}, {"base_ms": 10, "max_ms": 5}])
def test_retry_policy_rejects_bad_settings(kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigurationError, match="retry"):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize(
    ("status", "retry"),
    [
        (None, True),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        (599, True),
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (413, False),
        (202, False),
    ],
)
def test_retryable_statuses(status: int | None, retry: bool) -> None:
    assert RetryPolicy.retryable(status) is retry
