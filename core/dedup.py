"""Deduplication by event id within an event-time horizon, in bounded memory.

Ids are kept in buckets by event time. When the watermark passes a bucket's end plus
the horizon, the bucket is dropped whole, so memory follows the number of ids inside
the horizon, not the length of the run. A hard cap on ids bounds memory even when
the watermark stalls: past it the oldest bucket goes early, and those evictions are
counted so that the operator sees the horizon was cut short.

The state snapshots to plain data and restores from it, so that a restarted worker
still recognises the ids it saw before its checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DedupStats:
    duplicates: int = 0
    forced_evictions: int = 0


@dataclass
class DedupFilter:
    """Remembers ``(tenant, source, event_id)`` for ``horizon_ms`` of event time.

    An id is unique within its source, and one source (the events API, say) takes
    events of many tenants, each with ids of its own: the tenant is part of the key.
    """

    horizon_ms: int
    bucket_ms: int = 10_000
    max_ids: int = 2_000_000
    stats: DedupStats = field(default_factory=DedupStats, init=False)
    # id -> its bucket (one lookup per event), bucket -> its ids (whole-bucket eviction)
    _bucket_of: dict[str, int] = field(default_factory=dict, init=False)
    _buckets: dict[int, list[str]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.horizon_ms <= 0 or self.bucket_ms <= 0 or self.max_ids <= 0:
            raise ValueError("horizon_ms, bucket_ms and max_ids must be positive")

    def __len__(self) -> int:
        return len(self._bucket_of)

    def split(
        self, events: Iterable[Mapping[str, Any]]
    ) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
        """Split a batch into (first sightings, duplicates), remembering the former.

        A duplicate within the batch itself counts as a duplicate too.
        """
        fresh: list[Mapping[str, Any]] = []
        dupes: list[Mapping[str, Any]] = []
        bucket_of = self._bucket_of
        for event in events:
            key = f"{event['tenant']}\x1f{event['source']}\x1f{event['event_id']}"
            if key in bucket_of:
                dupes.append(event)
                continue
            bucket = event["ts"] - event["ts"] % self.bucket_ms
            bucket_of[key] = bucket
            self._buckets.setdefault(bucket, []).append(key)
            fresh.append(event)
        self.stats.duplicates += len(dupes)
        self._enforce_cap()
        return fresh, dupes

    def split_keys(self, keys: Sequence[str], ts: Sequence[int]) -> list[bool]:
        """Like :meth:`split` for prepared keys: True where the event is a first sighting."""
        bucket_of = self._bucket_of
        size = self.bucket_ms
        fresh = []
        for key, t in zip(keys, ts, strict=True):
            if key in bucket_of:
                fresh.append(False)
                continue
            bucket = t - t % size
            bucket_of[key] = bucket
            self._buckets.setdefault(bucket, []).append(key)
            fresh.append(True)
        self.stats.duplicates += len(fresh) - sum(fresh)
        self._enforce_cap()
        return fresh

    def advance(self, watermark_ms: int) -> int:
        """Forget buckets wholly older than ``watermark - horizon``; return ids dropped."""
        cutoff = watermark_ms - self.horizon_ms
        dropped = 0
        for start in [b for b in self._buckets if b + self.bucket_ms <= cutoff]:
            dropped += self._drop(start)
        return dropped

    def buckets(self) -> set[int]:
        """Start times of the buckets held now."""
        return set(self._buckets)

    def _drop(self, bucket: int) -> int:
        keys = self._buckets.pop(bucket)
        for key in keys:
            del self._bucket_of[key]
        return len(keys)

    def _enforce_cap(self) -> None:
        while len(self._bucket_of) > self.max_ids and self._buckets:
            self.stats.forced_evictions += self._drop(min(self._buckets))

    def snapshot(self) -> dict[str, Any]:
        return {
            "horizon_ms": self.horizon_ms,
            "bucket_ms": self.bucket_ms,
            "buckets": {str(k): list(v) for k, v in self._buckets.items()},
        }

    @classmethod
    def restore(cls, data: Mapping[str, Any], max_ids: int = 2_000_000) -> DedupFilter:
        restored = cls(data["horizon_ms"], data["bucket_ms"], max_ids)
        for bucket_text, keys in data["buckets"].items():
            bucket = int(bucket_text)
            restored._buckets[bucket] = list(keys)
            for key in keys:
                restored._bucket_of[key] = bucket
        return restored
