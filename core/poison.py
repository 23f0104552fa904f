"""Finding the record that makes a whole batch fail, so that a worker never loops on it.

A worker whose batch raises something no check foresaw starts over from its last
snapshot and reads the same records again: without help it would fail the same way
forever. :class:`PoisonHunt` halves the batch size after each such failure (the
records before the poison go through in the smaller batches) until a batch of one
record fails: that record is poison, and from then on it is dead-lettered instead of
processed. After each batch that goes through, the size doubles back to the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, TypeVar


class _Positioned(Protocol):
    @property
    def offset(self) -> int: ...


R = TypeVar("R", bound=_Positioned)

MAX_POISON_KEPT = 10_000
"""Poison records remembered (they are committed past, so a few suffice)."""
HUNT_PATIENCE = 64
"""Batches that go through in a row before a search that found nothing ends."""


@dataclass
class PoisonHunt:
    """The batch size while a poison record is searched for, and the ones found."""

    limit: int | None = None
    """The batch size now, or None when no search is on (the configured size)."""
    found: dict[tuple[int, int], str] = field(default_factory=dict)
    """(partition, offset) of each poison record, with the reason for its dead letter."""
    hunting: int = 0
    """Batches that may still go through before a search with no poison found ends
    (the failure did not come back: it was not the records); 0 when none is on."""

    def batch_size(self, default: int) -> int:
        return default if self.limit is None else min(self.limit, default)

    def failed(self, records: list[tuple[int, int]], error: BaseException) -> None:
        """A batch of ``records`` ((partition, offset) each) raised ``error``."""
        if len(records) == 1:
            reason = f"the record cannot be processed: {type(error).__name__}: {error}"
            if len(self.found) >= MAX_POISON_KEPT:
                self.found.pop(next(iter(self.found)))
            self.found[records[0]] = reason[:2000]
            self.hunting = 0
        elif records:
            self.limit = max(1, len(records) // 2)
            self.hunting = HUNT_PATIENCE

    def succeeded(self, default: int) -> None:
        """A batch went through: while searching, keep the size (the poison is ahead);
        otherwise let it grow back towards ``default``."""
        if self.hunting:
            self.hunting -= 1
            return
        if self.limit is not None:
            self.limit = None if self.limit * 2 >= default else self.limit * 2

    def split(
        self, records: dict[int, list[R]]
    ) -> tuple[dict[int, list[R]], dict[int, list[tuple[R, str]]]]:
        """Per partition, the records to fold and the known poison ones with their reason
        (each record has an ``offset``)."""
        folded: dict[int, list[R]] = {}
        poisoned: dict[int, list[tuple[R, str]]] = {}
        for partition, refs in records.items():
            folded[partition] = []
            for ref in refs:
                reason = self.reason(partition, ref.offset)
                if reason is None:
                    folded[partition].append(ref)
                else:
                    poisoned.setdefault(partition, []).append((ref, reason))
        return folded, poisoned

    def reason(self, partition: int, offset: int) -> str | None:
        """Why the record is poison, or None when it is not known to be."""
        return self.found.get((partition, offset))
