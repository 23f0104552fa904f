"""The policy for checkpoints that do not fit the offsets their partition holds now."""

from __future__ import annotations

import pytest

from core.checkpoint_policy import Action, OffsetCheck, decide


@pytest.mark.parametrize(
    ("check", "action", "start", "replay_from", "skipped"),
    [
        # Inside [low, high]: resume, re-read the dedup horizon as saved.
        (OffsetCheck(0, 500, 400, 0, 900), Action.RESUME, 500, 400, 0),
        (OffsetCheck(0, 900, 900, 0, 900), Action.RESUME, 900, 900, 0),  # at the end
        (OffsetCheck(0, 0, 0, 0, 0), Action.RESUME, 0, 0, 0),  # empty topic, new state
        (OffsetCheck(0, 300, 100, 100, 900), Action.RESUME, 300, 100, 0),  # replay at low
        # Past the end: the topic was recreated or truncated; a fresh state at low.
        (OffsetCheck(3, 500, 400, 0, 0), Action.RESET, 0, 0, 0),  # the user's case
        (OffsetCheck(3, 500, 400, 0, 120), Action.RESET, 0, 0, 0),
        (OffsetCheck(3, 901, 901, 50, 900), Action.RESET, 50, 50, 0),
        # Before the start: retention removed records never processed; state kept.
        (OffsetCheck(1, 100, 40, 250, 900), Action.SKIP_TO_LOW, 250, 250, 150),
        (OffsetCheck(1, 100, 100, 900, 900), Action.SKIP_TO_LOW, 900, 900, 800),
        # The dedup horizon reaches below low: re-read what is left of it.
        (OffsetCheck(2, 500, 100, 250, 900), Action.REPLAY_FROM_LOW, 500, 250, 0),
        (OffsetCheck(2, 500, 100, 500, 900), Action.REPLAY_FROM_LOW, 500, 500, 0),
        # Topic ids: another id is another topic, whatever its offsets.
        (OffsetCheck(4, 500, 400, 0, 9000, "old", "new"), Action.RESET, 0, 0, 0),
        (OffsetCheck(4, 500, 400, 0, 0, "old", "new"), Action.RESET, 0, 0, 0),
        (OffsetCheck(4, 500, 400, 0, 9000, "same", "same"), Action.RESUME, 500, 400, 0),
        # An id unknown on either side (a checkpoint older than ids, a broker that did
        # not say) leaves the offsets to decide.
        (OffsetCheck(4, 500, 400, 0, 9000, None, "new"), Action.RESUME, 500, 400, 0),
        (OffsetCheck(4, 500, 400, 0, 9000, "old", None), Action.RESUME, 500, 400, 0),
        (OffsetCheck(4, 500, 400, 0, 100, None, "new"), Action.RESET, 0, 0, 0),
    ],
)
def test_each_case_of_the_policy(
    check: OffsetCheck, action: Action, start: int, replay_from: int, skipped: int
) -> None:
    decision = decide(check)
    assert (decision.action, decision.start_offset, decision.replay_from, decision.skipped) == (
        action,
        start,
        replay_from,
        skipped,
    )
    assert decision.reported == (action is not Action.RESUME)
    # Consumption never starts outside what the partition holds, nor re-reads below it.
    assert check.low <= decision.replay_from <= decision.start_offset <= check.high


@pytest.mark.parametrize(
    ("check", "words"),
    [
        (
            OffsetCheck(3, 500, 400, 0, 0),
            [
                "partition 3",
                "checkpoint at offset 500",
                "[0, 0)",
                "recreated or truncated",
                "state and outbox discarded",
                "at offset 0",
            ],
        ),
        (
            OffsetCheck(3, 500, 500, 0, 120, has_state=False),
            ["committed offset at offset 500", "started at offset 0"],
        ),
        (
            OffsetCheck(1, 100, 40, 250, 900),
            ["retention removed 150 offsets never processed", "state kept, resumed at offset 250"],
        ),
        (
            OffsetCheck(2, 500, 100, 250, 900),
            ["re-reads from offset 100", "re-read from offset 250", "150 removed records"],
        ),
        (OffsetCheck(4, 5, 5, 0, 9000, "abc", "xyz"), ["topic id abc", "now has id xyz"]),
    ],
)
def test_the_reason_says_what_happened_and_what_was_done(
    check: OffsetCheck, words: list[str]
) -> None:
    reason = decide(check).reason
    for word in words:
        assert word in reason, reason


def test_the_report_is_plain_data_for_the_status() -> None:
    check = OffsetCheck(3, 500, 400, 10, 20)
    report = decide(check).report(check, "2026-01-01T00:00:00+00:00")
    assert report == {
        "partition": 3,
        "checkpoint_offset": 500,
        "low": 10,
        "high": 20,
        "action": "reset",
        "start_offset": 10,
        "skipped": 0,
        "reason": report["reason"],
        "at": "2026-01-01T00:00:00+00:00",
    }


def test_offsets_the_broker_cannot_have_are_refused() -> None:
    with pytest.raises(ValueError, match="low offset 9 is above high offset 3"):
        OffsetCheck(0, 5, 5, 9, 3)
