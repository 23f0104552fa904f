"""Which worker owns which partition, and the epoch that fences a stale owner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Assignment:
    """The partitions one worker owns under one epoch."""

    worker: int
    epoch: int
    partitions: tuple[int, ...]


def assign_partitions(partitions: Sequence[int], workers: int, epoch: int) -> list[Assignment]:
    """Spread partitions over ``workers`` round robin, each partition to exactly one.

    A worker may own no partition when there are more workers than partitions.
    """
    if workers < 1:
        raise ValueError(f"need at least one worker, got {workers}")
    if len(set(partitions)) != len(partitions):
        raise ValueError(f"partitions must be distinct, got {list(partitions)}")
    owned: list[list[int]] = [[] for _ in range(workers)]
    for i, partition in enumerate(sorted(partitions)):
        owned[i % workers].append(partition)
    return [Assignment(worker, epoch, tuple(parts)) for worker, parts in enumerate(owned)]
