"""Partition snapshots in the real PostgreSQL: whole, per partition, fenced by epoch."""

from __future__ import annotations

import uuid

from adapters.postgres import CheckpointStore
from cluster.settings import Settings


def test_a_newer_epoch_fences_an_older_owner(stack: Settings) -> None:
    topic = f"test.{uuid.uuid4().hex[:8]}"
    store = CheckpointStore(stack.postgres.dsn())
    try:
        first, second = store.next_epoch(), store.next_epoch()
        assert second > first
        assert store.save(topic, first, {0: (10, b"a"), 1: (20, b"b")}) == {0, 1}
        assert store.save(topic, second, {1: (25, b"c")}) == {1}
        # The old owner may still write partition 0, but no longer partition 1.
        assert store.save(topic, first, {0: (11, b"d"), 1: (21, b"e")}) == {0}
        assert store.load(topic, 0) == (first, 11, b"d")
        assert store.load(topic, 1) == (second, 25, b"c")
        assert store.load(topic, 2) is None
        assert store.save(topic, second, {}) == set()
    finally:
        store.close()
