"""Deduplication by event id within an event-time horizon, in bounded memory.

Ids are kept as 64-bit hashes (``core.sketches.hash64`` of ``tenant␟source␟event_id``)
in NumPy arrays, in buckets by event time: 8 bytes an id instead of a Python string
and a dict entry (about 150 bytes), and a batch is checked with a few vectorised
binary searches instead of one dict lookup per record. Two different ids share a
hash with a chance of about n²/2⁶⁵ (n ids held): with the 2 million ids one
partition may hold, about one in ten million runs drops one event as a false
duplicate.

When the watermark passes a bucket's end plus the horizon, the bucket is dropped
whole, so memory follows the number of ids inside the horizon, not the length of
the run. A hard cap on ids bounds memory even when the watermark stalls: past it the
oldest bucket goes early, and those evictions are counted so that the operator sees
the horizon was cut short.

The state snapshots to plain data and restores from it, so that a restarted worker
still recognises the ids it saw before its checkpoint.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from core.sketches import hash64

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
# A bucket's sorted chunks are merged into one when there are more than this many,
# so that a lookup costs a few binary searches per bucket, not one per batch.
MAX_CHUNKS = 4


def id_hashes(tenant: pa.Array, source: pa.Array, event_id: pa.Array) -> U64:
    """The dedup hash of each event: of ``tenant␟source␟event_id`` (a null source as "")."""
    keys = pc.binary_join_element_wise(tenant, pc.fill_null(source, ""), event_id, "\x1f")
    return hash64(pc.fill_null(keys, ""))


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
    # bucket start -> sorted chunks of the hashes of the ids first seen in it
    _buckets: dict[int, list[U64]] = field(default_factory=dict, init=False)
    _count: int = field(default=0, init=False)
    # bucket -> offset of the first record that added an id to it
    _first_offset: dict[int, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.horizon_ms <= 0 or self.bucket_ms <= 0 or self.max_ids <= 0:
            raise ValueError("horizon_ms, bucket_ms and max_ids must be positive")

    def __len__(self) -> int:
        return self._count

    def nbytes(self) -> int:
        """The bytes the held hashes take (the filter's memory, but for small overheads)."""
        return sum(chunk.nbytes for chunks in self._buckets.values() for chunk in chunks)

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
        """True where the event with this key (``tenant␟source␟event_id``) is a first
        sighting, remembering it; see :meth:`split_hashes`."""
        hashes = hash64(pa.array(keys, pa.string())) if keys else np.empty(0, np.uint64)
        at = None if offsets is None else np.asarray(offsets, np.int64)
        return list(self.split_hashes(hashes, np.asarray(ts, np.int64), at).tolist())

    def split_hashes(
        self, hashes: U64, ts: I64, offsets: I64 | None = None
    ) -> npt.NDArray[np.bool_]:
        """True where the event with this id hash is a first sighting, remembering it.

        With ``offsets`` (the records' Kafka offsets), each bucket also remembers the
        first offset that added to it: see :meth:`rebuild_from`.
        """
        fresh = np.zeros(len(hashes), dtype=bool)
        if not len(hashes):
            return fresh
        _unique, first = np.unique(hashes, return_index=True)  # first sighting in the batch
        fresh[first] = True
        candidates = np.flatnonzero(fresh)
        seen = self._contains(hashes[candidates])
        fresh[candidates[seen]] = False
        self._remember(hashes[fresh], ts[fresh], None if offsets is None else offsets[fresh])
        self.stats.duplicates += len(hashes) - int(fresh.sum())
        self._enforce_cap()
        return fresh

    def _contains(self, hashes: U64) -> npt.NDArray[np.bool_]:
        found = np.zeros(len(hashes), dtype=bool)
        for chunks in self._buckets.values():
            for chunk in chunks:
                at = np.searchsorted(chunk, hashes)
                found |= chunk[np.minimum(at, len(chunk) - 1)] == hashes
        return found

    def _remember(self, hashes: U64, ts: I64, offsets: I64 | None) -> None:
        if not len(hashes):
            return
        buckets = ts - ts % self.bucket_ms
        for bucket in np.unique(buckets).tolist():
            mask = buckets == bucket
            chunks = self._buckets.setdefault(bucket, [])
            chunks.append(np.sort(hashes[mask]))
            if len(chunks) > MAX_CHUNKS:
                self._buckets[bucket] = [np.sort(np.concatenate(chunks))]
            if offsets is not None:
                first = int(offsets[mask].min())
                self._first_offset[bucket] = min(self._first_offset.get(bucket, first), first)
        self._count += len(hashes)

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
        held = sum(len(chunk) for chunk in self._buckets.pop(bucket))
        self._first_offset.pop(bucket, None)
        self._count -= held
        return held

    def _enforce_cap(self) -> None:
        while self._count > self.max_ids and self._buckets:
            self.stats.forced_evictions += self._drop(min(self._buckets))

    def snapshot(self) -> dict[str, Any]:
        """Plain data: each bucket's hashes as base64 of their little-endian bytes."""

        def encoded(chunks: list[U64]) -> str:
            merged = np.sort(np.concatenate(chunks)).astype("<u8")
            return base64.b64encode(merged.tobytes()).decode()

        return {
            "horizon_ms": self.horizon_ms,
            "bucket_ms": self.bucket_ms,
            "hashes": {str(k): encoded(v) for k, v in self._buckets.items()},
        }

    @classmethod
    def restore(cls, data: Mapping[str, Any], max_ids: int = 2_000_000) -> DedupFilter:
        """From :meth:`snapshot`, or from the older form that held the keys as text."""
        restored = cls(data["horizon_ms"], data["bucket_ms"], max_ids)
        held = data.get("hashes", {})
        for bucket_text, text in held.items():
            hashes = np.frombuffer(base64.b64decode(text), "<u8").astype(np.uint64)
            restored._buckets[int(bucket_text)] = [hashes]
            restored._count += len(hashes)
        for bucket_text, keys in data.get("buckets", {}).items():
            hashes = np.sort(hash64(pa.array(list(keys), pa.string())))
            restored._buckets[int(bucket_text)] = [hashes]
            restored._count += len(hashes)
        return restored
