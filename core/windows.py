"""Event-time tumbling windows, folded a micro-batch at a time.

A partition worker folds each micro-batch into per-window *partial* aggregates
(count and sum per tenant, type and window). Partials of one window from several
batches or several partitions merge by addition, so the store keeps them as rows and
adds them up at read time (a ClickHouse ``SummingMergeTree`` does the same in the
background). This keeps worker memory bounded by one batch whatever the number of
open windows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

WindowKey = tuple[str, str, int]
"""(tenant, type, window start in epoch ms)."""


@dataclass(slots=True)
class Partial:
    """A mergeable partial aggregate of one window."""

    count: int = 0
    sum: float = 0.0

    def merge(self, other: Partial) -> None:
        self.count += other.count
        self.sum += other.sum


def window_start(ts_ms: int, size_ms: int) -> int:
    """Start of the tumbling window of ``size_ms`` that holds ``ts_ms`` (epoch aligned)."""
    return ts_ms - ts_ms % size_ms


def fold_tumbling(envelopes: Iterable[Mapping[str, Any]], size_ms: int) -> dict[WindowKey, Partial]:
    """Fold envelopes into count and sum per (tenant, type, window start)."""
    if size_ms <= 0:
        raise ValueError(f"window size must be positive, got {size_ms} ms")
    partials: dict[WindowKey, Partial] = {}
    for event in envelopes:
        ts = event["ts"]
        key = (event["tenant"], event["type"], ts - ts % size_ms)
        partial = partials.get(key)
        if partial is None:
            partial = partials[key] = Partial()
        partial.count += 1
        partial.sum += event["value"]
    return partials


def merge_partials(
    into: dict[WindowKey, Partial], other: Mapping[WindowKey, Partial]
) -> dict[WindowKey, Partial]:
    """Add ``other`` into ``into`` (in place) and return it."""
    for key, partial in other.items():
        mine = into.get(key)
        if mine is None:
            into[key] = Partial(partial.count, partial.sum)
        else:
            mine.merge(partial)
    return into
