from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.dedup import DedupFilter

SECOND = 1000


def ev(event_id: str, ts: int, source: str = "api", tenant: str = "acme") -> dict[str, Any]:
    return {"event_id": event_id, "source": source, "ts": ts, "tenant": tenant}


def ids(events: list[Any]) -> list[str]:
    return [e["event_id"] for e in events]


def test_second_sighting_is_a_duplicate_within_and_across_batches() -> None:
    dedup = DedupFilter(horizon_ms=60 * SECOND)
    fresh, dupes = dedup.split([ev("a", 1), ev("b", 2), ev("a", 3)])
    assert (ids(fresh), ids(dupes)) == (["a", "b"], ["a"])
    fresh, dupes = dedup.split([ev("b", 10), ev("c", 10)])
    assert (ids(fresh), ids(dupes)) == (["c"], ["b"])
    assert dedup.stats.duplicates == 2


def test_same_id_from_another_source_or_tenant_is_not_a_duplicate() -> None:
    dedup = DedupFilter(horizon_ms=60 * SECOND)
    fresh, _ = dedup.split([ev("a", 1, "billing"), ev("a", 1, "crm"), ev("a", 1, "crm", "globex")])
    assert len(fresh) == 3


def test_ids_are_forgotten_once_the_watermark_passes_the_horizon() -> None:
    dedup = DedupFilter(horizon_ms=60 * SECOND, bucket_ms=10 * SECOND)
    dedup.split([ev("old", 5 * SECOND), ev("new", 65 * SECOND)])
    assert dedup.advance(69 * SECOND) == 0  # bucket [0,10) s ends at 10 s > 69 - 60
    assert dedup.advance(70 * SECOND) == 1
    assert len(dedup) == 1
    fresh, _ = dedup.split([ev("old", 5 * SECOND), ev("new", 65 * SECOND)])
    assert ids(fresh) == ["old"]


def test_memory_is_capped_even_when_the_watermark_stalls() -> None:
    dedup = DedupFilter(horizon_ms=3600 * SECOND, bucket_ms=SECOND, max_ids=100)
    for i in range(10):
        dedup.split([ev(f"{i}-{j}", i * SECOND) for j in range(50)])
    assert len(dedup) <= 100
    assert dedup.stats.forced_evictions == 400


def test_snapshot_survives_a_restart_as_json() -> None:
    dedup = DedupFilter(horizon_ms=60 * SECOND)
    dedup.split([ev("a", 1), ev("b", 20 * SECOND)])
    restored = DedupFilter.restore(orjson.loads(orjson.dumps(dedup.snapshot())))
    fresh, dupes = restored.split([ev("a", 1), ev("c", 2)])
    assert (ids(fresh), ids(dupes)) == (["c"], ["a"])
    assert len(restored) == 3


@pytest.mark.parametrize("bad", [{"horizon_ms": 0}, {"horizon_ms": 1, "bucket_ms": 0}])
def test_rejects_non_positive_sizes(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        DedupFilter(**bad)


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 100_000)), max_size=300))
def test_each_id_passes_exactly_once_inside_the_horizon(pairs: list[tuple[int, int]]) -> None:
    dedup = DedupFilter(horizon_ms=10**9)
    fresh, dupes = dedup.split([ev(str(i), ts) for i, ts in pairs])
    assert sorted(ids(fresh)) == sorted({str(i) for i, _ in pairs})
    assert len(fresh) + len(dupes) == len(pairs)


def test_rebuild_offset_follows_the_buckets_still_held() -> None:
    dedup = DedupFilter(horizon_ms=60 * SECOND, bucket_ms=10 * SECOND)
    assert dedup.rebuild_from() is None
    dedup.split([ev("late-in-log", 5 * SECOND), ev("b", 65 * SECOND)], offsets=[40, 41])
    dedup.split([ev("c", 1 * SECOND)], offsets=[42])  # joins the bucket offset 40 opened
    assert dedup.rebuild_from() == 40
    dedup.advance(70 * SECOND)  # the [0, 10 s) bucket goes, and its offset with it
    assert dedup.rebuild_from() == 41


def test_a_snapshot_in_the_older_text_form_still_restores() -> None:
    older = {
        "horizon_ms": 60 * SECOND,
        "bucket_ms": 10 * SECOND,
        "buckets": {"0": ["acme\x1fapi\x1fa"]},
    }
    restored = DedupFilter.restore(older)
    fresh, dupes = restored.split([ev("a", 1), ev("b", 2)])
    assert (ids(fresh), ids(dupes)) == (["b"], ["a"])


def test_ids_are_held_as_12_bytes_each() -> None:
    # Bounded memory: a million ids take 12 MB (hash and bucket), not the ~150 MB of
    # Python strings and dict entries.
    dedup = DedupFilter(horizon_ms=3600 * SECOND)
    keys = [f"acme\x1fapi\x1fev-{i}" for i in range(1_000_000)]
    fresh = dedup.split_keys(keys, [i // 100 for i in range(1_000_000)])
    assert all(fresh)
    assert len(dedup) == 1_000_000
    assert dedup.nbytes() <= 12 * 1_000_000
    # and a batch of repeats finds every one of them
    assert not any(dedup.split_keys(keys[::1000], [0] * 1000))


@given(st.lists(st.integers(0, 50), max_size=80), st.integers(1, 5))
def test_batches_agree_with_one_pass_over_the_same_ids(ids_: list[int], batches: int) -> None:
    # However a stream is cut into batches (chunks merged or not), the first sighting
    # of each id is the one that is fresh.
    dedup = DedupFilter(horizon_ms=10**9, bucket_ms=7)
    size = max(1, len(ids_) // batches)
    fresh: list[bool] = []
    for start in range(0, len(ids_), size):
        chunk = ids_[start : start + size]
        fresh += dedup.split_keys([f"t\x1fs\x1f{i}" for i in chunk], chunk)
    seen: set[int] = set()
    want = []
    for i in ids_:
        want.append(i not in seen)
        seen.add(i)
    assert fresh == want
