"""What a worker does when a restored checkpoint does not fit its partition's offsets.

A partition's checkpoint names the offset to go on from (``next_offset``) and the
offset from which to re-read the partition (``replay_from``: the dedup horizon, or the
first record of an outbox not known to be written). Kafka keeps a partition's records
in ``[low, high)``: ``low`` moves up as retention deletes old records, ``high`` is the
offset the next record will get. A checkpoint that points outside that range would
otherwise make the worker read nothing, silently, or wait for offsets that will never
come. The policy (docs/architecture.md, "Checkpoints that no longer fit the topic"):

- taken on another topic id than the topic's now: ``reset``, a fresh state at ``low``;
- ``next_offset > high`` (topic recreated or truncated): ``reset``, likewise;
- ``next_offset < low`` (retention passed it): ``skip_to_low``, state kept, at ``low``;
- ``replay_from < low <= next_offset``: ``replay_from_low``, state kept, re-read from
  ``low``, at ``next_offset``;
- otherwise: ``resume`` at ``next_offset``.

``reset`` discards the partition's state and its outbox: they describe records of
another incarnation of the topic (or records the broker no longer has), and writing
them again would count events that the topic does not hold. ``skip_to_low`` keeps
the state (its windows hold events that did happen) and counts the offsets that
retention removed before they were processed. ``replay_from_low`` re-reads what is
left of the dedup horizon; ids of the removed records are forgotten, so a repeat of
one of them would count again. Every action but ``resume`` is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Action(StrEnum):
    """What the worker does with a partition's checkpoint."""

    RESUME = "resume"
    RESET = "reset"
    SKIP_TO_LOW = "skip_to_low"
    REPLAY_FROM_LOW = "replay_from_low"


@dataclass(frozen=True, slots=True)
class OffsetCheck:
    """A partition's checkpoint next to the offsets its topic holds now.

    Attributes:
        partition: The partition.
        checkpoint_offset: The checkpoint's next offset (or a committed offset).
        replay_from: Where re-reading would start; ``checkpoint_offset`` when nothing
            is to be re-read.
        low: The partition's first offset still held (low watermark).
        high: The offset of the partition's next record (high watermark).
        saved_topic_id: The topic id the checkpoint was taken on, None when unknown
            (a checkpoint saved before topic ids were recorded).
        topic_id: The topic's id now, None when the broker did not say.
        has_state: False for a committed offset with no snapshot behind it (the
            reason then speaks of no state or outbox).
    """

    partition: int
    checkpoint_offset: int
    replay_from: int
    low: int
    high: int
    saved_topic_id: str | None = None
    topic_id: str | None = None
    has_state: bool = True

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"low offset {self.low} is above high offset {self.high}")


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer for one partition.

    Attributes:
        action: What to do with the checkpoint.
        start_offset: Where consumption (and the kept or fresh state) goes on from.
        replay_from: Where re-reading starts; re-read ``[replay_from, start_offset)``.
        skipped: Offsets removed before they were processed (``skip_to_low`` only).
        reason: One sentence for the log and ``rayline status``: what happened and
            what Rayline did about it.
    """

    action: Action
    start_offset: int
    replay_from: int
    skipped: int
    reason: str

    @property
    def reported(self) -> bool:
        """True for every action but ``resume``: the operator must hear of it."""
        return self.action is not Action.RESUME

    def report(self, check: OffsetCheck, at: str) -> dict[str, Any]:
        """A plain-data record for the worker's stats and ``rayline status``."""
        return {
            "partition": check.partition,
            "checkpoint_offset": check.checkpoint_offset,
            "low": check.low,
            "high": check.high,
            "action": str(self.action),
            "start_offset": self.start_offset,
            "skipped": self.skipped,
            "reason": self.reason,
            "at": at,
        }


def decide(check: OffsetCheck) -> Decision:
    """Apply the module's policy to one partition's checkpoint."""
    c = check
    what = "checkpoint" if c.has_state else "committed offset"
    where = f"partition {c.partition}: {what} at offset {c.checkpoint_offset}"
    held = f"the topic holds offsets [{c.low}, {c.high})"
    fresh = "state and outbox discarded, started fresh" if c.has_state else "started"
    kept = "state kept, resumed" if c.has_state else "resumed"
    if c.saved_topic_id and c.topic_id and c.saved_topic_id != c.topic_id:
        return Decision(
            Action.RESET,
            c.low,
            c.low,
            0,
            f"{where} was taken on topic id {c.saved_topic_id}, the topic now has id "
            f"{c.topic_id} (deleted and recreated) and {held}: {fresh} at offset {c.low}",
        )
    if c.checkpoint_offset > c.high:
        return Decision(
            Action.RESET,
            c.low,
            c.low,
            0,
            f"{where} is past the end: {held} (topic recreated or truncated): {fresh} "
            f"at offset {c.low}",
        )
    if c.checkpoint_offset < c.low:
        skipped = c.low - c.checkpoint_offset
        return Decision(
            Action.SKIP_TO_LOW,
            c.low,
            c.low,
            skipped,
            f"{where} is before the start: {held} (retention removed {skipped} offsets "
            f"never processed): {kept} at offset {c.low}",
        )
    if c.replay_from < c.low:
        return Decision(
            Action.REPLAY_FROM_LOW,
            c.checkpoint_offset,
            c.low,
            0,
            f"{where} re-reads from offset {c.replay_from} but {held} (retention): "
            f"re-read from offset {c.low}; ids of the {c.low - c.replay_from} removed "
            f"records are no longer deduplicated",
        )
    return Decision(Action.RESUME, c.checkpoint_offset, c.replay_from, 0, f"{where}: resumed")
