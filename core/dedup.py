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

from collections.abc import Mapping, Sequence
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
    # bucket -> offset of the first record that added an id to it
    _first_offset: dict[int, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.horizon_ms <= 0 or self.bucket_ms <= 0 or self.max_ids <= 0:
            raise ValueError("horizon_ms, bucket_ms and max_ids must be positive")

    def __len__(self) -> int:
        return len(self._bucket_of)

    def split(
        self, events: Sequence[Mapping[str, Any]], offsets: Sequence[int] | None = None
    ) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
        """Split a batch into (first sightings, duplicates), remembering the former.

        A duplicate within the batch itself counts as a duplicate too.
        """
        keys = [f"{e['tenant']}\x1f{e['source']}\x1f{e['event_id']}" for e in events]
        fresh = self.split_keys(keys, [e["ts"] for e in events], offsets)
        return (
            [e for e, new in zip(events, fresh, strict=True) if new],
            [e for e, new in zip(events, fresh, strict=True) if not new],
        )

    def split_keys(
        self, keys: Sequence[str], ts: Sequence[int], offsets: Sequence[int] | None = None
    ) -> list[bool]:
        """True where the event with this key is a first sighting, remembering it.

        With ``offsets`` (the records' Kafka offsets), each bucket also remembers the
        first offset that added to it: see :meth:`rebuild_from`.
        """
        bucket_of = self._bucket_of
        size = self.bucket_ms
        fresh = []
        for i, (key, t) in enumerate(zip(keys, ts, strict=True)):
            if key in bucket_of:
                fresh.append(False)
                continue
            bucket = t - t % size
            bucket_of[key] = bucket
            self._buckets.setdefault(bucket, []).append(key)
            if offsets is not None:
                self._first_offset.setdefault(bucket, offsets[i])
            fresh.append(True)
        self.stats.duplicates += len(fresh) - sum(fresh)
        self._enforce_cap()
        return fresh

    def rebuild_from(self) -> int | None:
        """The lowest offset whose id is still held: re-reading from there rebuilds
        every id this filter holds. None when no offsets were given."""
        return min(self._first_offset.values(), default=None)

    def advance(self, watermark_ms: int) -> int:
        """Forget buckets wholly older than ``watermark - horizon``; return ids dropped."""
        cutoff = watermark_ms - self.horizon_ms
        dropped = 0
        for start in [b for b in self._buckets if b + self.bucket_ms <= cutoff]:
            dropped += self._drop(start)
        return dropped

    def _drop(self, bucket: int) -> int:
        keys = self._buckets.pop(bucket)
        self._first_offset.pop(bucket, None)
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
