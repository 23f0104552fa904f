"""The stored map states are Rayline's own sketches: merging the maps as ClickHouse does
(``maxMap`` for registers, ``sumMap`` for buckets) equals ``core.sketches``' merge, and
the answers read from them equal the sketches' own estimates."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from core.sketch_states import (
    DD_MAX_BUCKETS,
    HLL_P,
    answer_value,
    ddsketch_from_state,
    ddsketch_state,
    distinct_sql,
    hll_from_state,
    hll_state,
    quantile_sql,
    quantile_value,
    raw_state_sql,
)
from core.sketches import DDSketch, HyperLogLog, hash64


def max_map(*states: dict[int, int]) -> dict[int, int]:
    """ClickHouse's ``maxMap`` over rows: per key, the largest value."""
    merged: dict[int, int] = {}
    for state in states:
        for key, value in state.items():
            merged[key] = max(merged.get(key, 0), value)
    return merged


def sum_map(*states: dict[int, int]) -> dict[int, int]:
    """ClickHouse's ``sumMap`` over rows: per key, the sum (keys summing to 0 dropped)."""
    total: Counter[int] = Counter()
    for state in states:
        total.update(state)
    return {k: v for k, v in total.items() if v}


def entities(rng: random.Random, n: int) -> HyperLogLog:
    sketch = HyperLogLog(HLL_P)
    if n:
        sketch.add_hashes(hash64(pa.array([f"user-{rng.randrange(10**9)}" for _ in range(n)])))
    return sketch


def values(rng: random.Random, n: int, spread: float = 3.0) -> DDSketch:
    sketch = DDSketch()
    data = [min(rng.lognormvariate(0, spread), 1e300) * rng.choice((1, 1, -1)) for _ in range(n)]
    sketch.add_values(np.array(data + [0.0] * (n // 10)))
    return sketch


@pytest.mark.parametrize("sizes", [(0,), (1, 0), (5, 50, 500), (3000, 20000, 1)])
def test_max_map_of_register_states_is_the_hyperloglog_merge(sizes: tuple[int, ...]) -> None:
    rng = random.Random(sum(sizes))
    parts = [entities(rng, n) for n in sizes]
    merged = parts[0].copy()
    for part in parts[1:]:
        merged.merge(part)
    state = max_map(*(hll_state(p) for p in parts))
    assert state == hll_state(merged)
    assert hll_from_state(state) == merged
    assert hll_from_state(state).estimate() == merged.estimate()


def test_a_small_set_keeps_a_small_state() -> None:
    sketch = entities(random.Random(1), 7)
    assert len(hll_state(sketch)) == 7  # sparse: one entry per set register


@pytest.mark.parametrize("spread", [0.5, 3.0, 60.0])
def test_sum_map_of_bucket_states_is_the_ddsketch_merge(spread: float) -> None:
    rng = random.Random(int(spread * 10))
    parts = [values(rng, n, spread) for n in (0, 10, 700, 5000)]
    merged = DDSketch()
    for part in parts:
        merged.merge(part)
    states = [ddsketch_state(p) for p in parts]
    pos = sum_map(*(s[0] for s in states))
    neg = sum_map(*(s[1] for s in states))
    zero = sum(s[2] for s in states)
    restored = ddsketch_from_state(pos, neg, zero)
    assert restored == merged
    for q in (0.0, 0.01, 0.5, 0.9, 0.99, 1.0):
        assert restored.quantile(q) == merged.quantile(q)


def test_collapsing_at_read_equals_collapsing_at_every_merge() -> None:
    # A spread this wide passes max_buckets: the sketches collapse as they merge, the
    # stored maps only when read, and both give the same sketch.
    rng = random.Random(5)
    parts = [values(rng, 4000, 200.0) for _ in range(3)]
    assert max(p.bucket_count for p in parts) >= DD_MAX_BUCKETS
    merged = DDSketch()
    for part in parts:
        merged.merge(part)
    states = [ddsketch_state(p) for p in parts]
    restored = ddsketch_from_state(
        sum_map(*(s[0] for s in states)),
        sum_map(*(s[1] for s in states)),
        sum(s[2] for s in states),
    )
    assert restored == merged
    assert restored.quantile(0.001) == merged.quantile(0.001)
    assert restored.quantile(0.5) == merged.quantile(0.5)


def test_quantile_value_reads_the_bucket_as_the_sketch_does() -> None:
    sketch = DDSketch()
    sketch.add_values(np.array([-40.0, -2.5, 0.0, 0.0, 3.0, 7.0, 1e6]))
    zero, positive, negative = sketch.buckets()
    assert zero == 2
    for key, _count in positive:
        assert quantile_value([1, key]) == sketch.bucket_value(key)
    for key, _count in negative:
        assert quantile_value([-1, -key]) == -sketch.bucket_value(key)
    assert quantile_value([0, 0]) == 0.0
    assert quantile_value([]) is None


def test_answers_round_distinct_counts_and_decode_quantiles() -> None:
    assert answer_value("distinct", 41.6) == 42
    assert answer_value("distinct", None) is None
    assert answer_value("p99", []) is None
    assert answer_value("p50", [0, 0]) == 0.0
    assert answer_value("count", 7) == 7


def test_the_sql_is_written_once_per_column() -> None:
    # The hash of an entity and the register of a hash appear once in the text (folds,
    # not copies), so statements stay small for the engine to plan.
    raw = raw_state_sql()
    assert raw["entity_hll"].count("substring(entity") == 1
    assert set(raw) == {"entity_hll", "value_dd_pos", "value_dd_neg", "value_dd_zero"}
    assert len(distinct_sql("maxMap(entity_hll)")) < 3000
    assert "arrayCumSum" in quantile_sql("p", "n", "z", 0.99)
