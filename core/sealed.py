"""A sealed one-minute window: final numbers for a (tenant, type, group) minute.

A minute is *sealed* once every partition's watermark has passed its end plus the
allowed lateness: no event can still count in it, so its aggregates in ClickHouse
(``windows_1m``, merged across all partitions) are final. Alerting evaluates rules on
sealed windows, and the query API's aggregated resolutions read sealed buckets. Their
distinct counts and quantiles come from the workers' own sketches (HyperLogLog and
DDSketch, see ``core.sketch_states``), so they equal what ``/latest`` shows for the
minute once it closed.

It satisfies :class:`core.alert_rules.WindowLike`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MINUTE_MS = 60_000
QUANTILE_NAMES = ("p50", "p90", "p99")
QUANTILE_LEVELS = (0.5, 0.9, 0.99)


@dataclass(frozen=True, slots=True)
class SealedWindow:
    """One minute of one metric and group, all partitions merged."""

    tenant: str
    type: str
    start: int
    """Minute start, epoch milliseconds (UTC)."""
    group_key: str
    """``name=value`` pairs joined by U+001F, in the configured dimension order; ``""``."""
    count: int
    sum: float
    min: float
    max: float
    distinct: float | None
    """Distinct entities, rounded as every endpoint answers it (``sketch_states``)."""
    quantiles: Mapping[str, float] | None
    dims: tuple[tuple[str, str], ...] = field(default=())
    window: str = "1m"

    @property
    def end(self) -> int:
        return self.start + MINUTE_MS

    def to_row(self) -> dict[str, Any]:
        """JSON-friendly form (for actor calls, logs and the notification log)."""
        return {
            "tenant": self.tenant,
            "type": self.type,
            "start": self.start,
            "group_key": self.group_key,
            "count": self.count,
            "sum": self.sum,
            "min": self.min,
            "max": self.max,
            "distinct": self.distinct,
            "quantiles": None if self.quantiles is None else dict(self.quantiles),
            "dims": [list(pair) for pair in self.dims],
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SealedWindow:
        quantiles = row.get("quantiles")
        return cls(
            tenant=str(row["tenant"]),
            type=str(row["type"]),
            start=int(row["start"]),
            group_key=str(row.get("group_key", "")),
            count=int(row["count"]),
            sum=float(row["sum"]),
            min=float(row["min"]),
            max=float(row["max"]),
            distinct=None if row.get("distinct") is None else float(row["distinct"]),
            quantiles=None if quantiles is None else {k: float(v) for k, v in quantiles.items()},
            dims=tuple((str(k), str(v)) for k, v in row.get("dims", ())),
        )
