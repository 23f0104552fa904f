"""Deduplication by event id within an event-time horizon, in bounded memory.

Ids are kept as 64-bit hashes (``core.sketches.hash64`` of ``tenant␟source␟event_id``)
in one sorted NumPy array, each tagged with its event-time bucket: 12 bytes an id
instead of a Python string and a dict entry (about 150 bytes), and a batch is checked
with one vectorised binary search instead of one dict lookup per record. Adding a
batch's new ids is a merge into the sorted array (a copy of it: milliseconds for the
two million ids a partition may hold). Two different ids share a
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
U32 = npt.NDArray[np.uint32]


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
    # every id held, sorted by hash, with the number (start // bucket_ms) of its bucket
    _hashes: U64 = field(default_factory=lambda: np.empty(0, np.uint64), init=False)
    _tags: U32 = field(default_factory=lambda: np.empty(0, np.uint32), init=False)
    _buckets: dict[int, int] = field(default_factory=dict, init=False)  # start -> ids
    # bucket -> offset of the first record that added an id to it
    _first_offset: dict[int, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.horizon_ms <= 0 or self.bucket_ms <= 0 or self.max_ids <= 0:
            raise ValueError("horizon_ms, bucket_ms and max_ids must be positive")

    def __len__(self) -> int:
        return len(self._hashes)

    def nbytes(self) -> int:
        """The bytes the held ids take (the filter's memory, but for small overheads)."""
        return int(self._hashes.nbytes + self._tags.nbytes)

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
        held = self._hashes
        if not len(held):
            return np.zeros(len(hashes), dtype=bool)
        at = np.minimum(np.searchsorted(held, hashes), len(held) - 1)
        return held[at] == hashes

    def _remember(self, hashes: U64, ts: I64, offsets: I64 | None) -> None:
        if not len(hashes):
            return
        order = np.argsort(hashes, kind="stable")
        hashes, numbers = hashes[order], (ts[order] // self.bucket_ms).astype(np.uint32)
        at = np.searchsorted(self._hashes, hashes)
        self._hashes = np.insert(self._hashes, at, hashes)
        self._tags = np.insert(self._tags, at, numbers)
        unique, counts = np.unique(numbers, return_counts=True)
        for number, count in zip(unique.tolist(), counts.tolist(), strict=True):
            bucket = number * self.bucket_ms
            self._buckets[bucket] = self._buckets.get(bucket, 0) + count
            if offsets is not None:
                first = int(offsets[order][numbers == number].min())
                self._first_offset[bucket] = min(self._first_offset.get(bucket, first), first)

    def rebuild_from(self) -> int | None:
        """The lowest offset whose id is still held: re-reading from there rebuilds
        every id this filter holds. None when no offsets were given."""
        return min(self._first_offset.values(), default=None)

    def advance(self, watermark_ms: int) -> int:
        """Forget buckets wholly older than ``watermark - horizon``; return ids dropped."""
        cutoff = watermark_ms - self.horizon_ms
        return self._drop(*[b for b in self._buckets if b + self.bucket_ms <= cutoff])

    def _drop(self, *buckets: int) -> int:
        gone = [b for b in buckets if b in self._buckets]
        if not gone:
            return 0
        for bucket in gone:
            del self._buckets[bucket]
            self._first_offset.pop(bucket, None)
        numbers = np.array([b // self.bucket_ms for b in gone], np.uint32)
        keep = ~np.isin(self._tags, numbers)
        dropped = len(keep) - int(keep.sum())
        self._hashes, self._tags = self._hashes[keep], self._tags[keep]
        return dropped

    def _enforce_cap(self) -> None:
        if len(self._hashes) <= self.max_ids:
            return
        excess, oldest = len(self._hashes) - self.max_ids, []
        for bucket in sorted(self._buckets):  # the oldest buckets go, whole
            if excess <= 0:
                break
            oldest.append(bucket)
            excess -= self._buckets[bucket]
        self.stats.forced_evictions += self._drop(*oldest)

    def snapshot(self) -> dict[str, Any]:
        """Plain data: each bucket's hashes as base64 of their little-endian bytes."""
        return {
            "horizon_ms": self.horizon_ms,
            "bucket_ms": self.bucket_ms,
            "hashes": {
                str(bucket): base64.b64encode(
                    self._hashes[self._tags == bucket // self.bucket_ms].astype("<u8").tobytes()
                ).decode()
                for bucket in self._buckets
            },
        }

    @classmethod
    def restore(cls, data: Mapping[str, Any], max_ids: int = 2_000_000) -> DedupFilter:
        """From :meth:`snapshot`, or from the older form that held the keys as text."""
        restored = cls(data["horizon_ms"], data["bucket_ms"], max_ids)
        for bucket_text, text in data.get("hashes", {}).items():
            hashes = np.frombuffer(base64.b64decode(text), "<u8").astype(np.uint64)
            restored._remember(hashes, np.full(len(hashes), int(bucket_text), np.int64), None)
        for bucket_text, keys in data.get("buckets", {}).items():
            hashes = hash64(pa.array(list(keys), pa.string()))
            restored._remember(hashes, np.full(len(hashes), int(bucket_text), np.int64), None)
        return restored
