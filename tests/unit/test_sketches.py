"""Sketches of a batch: hash64 against a pure-Python reference, HLL and DDSketch bounds."""

from __future__ import annotations

import itertools
import math
import pickle
import random
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.sketches import (
    MIN_MAGNITUDE,
    DDSketch,
    HyperLogLog,
    ddsketch_by_group,
    hash64,
    hll_by_group,
)

# The algorithm, written out again per element. The constants are repeated here on
# purpose: changing one changes every persisted sketch, and should fail this file.
M64 = 1 << 64
POLY_BASE = 0x9E3779B97F4A7C15
LENGTH_MULT = 0xC2B2AE3D27D4EB4F
BYTES_SEED = 0x27D4EB2F165667C5
INT_SEED = 0x165667B19E3779F9


def ref_fmix64(x: int) -> int:
    x ^= x >> 33
    x = x * 0xFF51AFD7ED558CCD % M64
    x ^= x >> 33
    x = x * 0xC4CEB9FE1A85EC53 % M64
    x ^= x >> 33
    return x


def ref_hash_bytes(data: bytes) -> int:
    poly, power = 0, 1
    for byte in data:
        poly = (poly + byte * power) % M64
        power = power * POLY_BASE % M64
    return ref_fmix64((poly + len(data) * LENGTH_MULT + BYTES_SEED) % M64)


def ref_hash_int(value: int) -> int:
    return ref_fmix64((value + INT_SEED) % M64)


def ref_index_and_rank(h: int, p: int) -> tuple[int, int]:
    rest = (h << p) % M64
    return h >> (64 - p), min(64 - rest.bit_length(), 64 - p) + 1


def hashes_of(n: int, prefix: str = "user-") -> np.ndarray:
    return hash64(pa.array([f"{prefix}{i}" for i in range(n)]))


def hll_of(hashes: np.ndarray, p: int = 12) -> HyperLogLog:
    sketch = HyperLogLog(p)
    sketch.add_hashes(hashes)
    return sketch


def dds_of(values: Sequence[float] | np.ndarray, alpha: float = 0.01, cap: int = 2048) -> DDSketch:
    sketch = DDSketch(alpha, cap)
    sketch.add_values(np.asarray(values, dtype=np.float64))
    return sketch


# The first call into an Arrow kernel or a fresh large allocation can take far longer than
# the rest; a per-example deadline would turn that into a flaky failure.
NO_DEADLINE = settings(deadline=None)
u64s = st.lists(st.integers(0, M64 - 1), max_size=60).map(lambda v: np.array(v, dtype=np.uint64))
finite = st.floats(min_value=-1e300, max_value=1e300, allow_nan=False)
small_or_signed = st.one_of(
    finite,
    st.sampled_from([0.0, -0.0, 1e-12, -3e-10, 1.0, -1.0, 2.5]),
    st.integers(-1000, 1000).map(float),
)


# ----------------------------------------------------------------------------- hash64


@NO_DEADLINE
@given(st.lists(st.binary(max_size=40), max_size=30))
def test_hash64_of_bytes_matches_the_reference(values: list[bytes]) -> None:
    expected = [ref_hash_bytes(v) for v in values]
    for kind in (pa.binary(), pa.large_binary(), pa.binary_view()):
        assert hash64(pa.array(values, kind)).tolist() == expected


@NO_DEADLINE
@given(st.lists(st.text(max_size=20), max_size=30))
def test_hash64_of_text_hashes_its_utf8_bytes(values: list[str]) -> None:
    expected = [ref_hash_bytes(v.encode()) for v in values]
    for kind in (pa.string(), pa.large_string(), pa.string_view()):
        assert hash64(pa.array(values, kind)).tolist() == expected
    assert hash64(pa.array(values).dictionary_encode()).tolist() == expected


@NO_DEADLINE
@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=30))
def test_hash64_of_integers_matches_the_reference(values: list[int]) -> None:
    expected = [ref_hash_int(v) for v in values]
    assert hash64(pa.array(values, pa.int64())).tolist() == expected
    small = [v for v in values if -128 <= v < 128]
    assert hash64(pa.array(small, pa.int8())).tolist() == [ref_hash_int(v) for v in small]


def test_hash64_of_uint64_hashes_its_bits() -> None:
    values = [0, 1, 2**63, M64 - 1]
    assert hash64(pa.array(values, pa.uint64())).tolist() == [ref_hash_int(v) for v in values]


@NO_DEADLINE
@given(
    st.lists(st.text(max_size=12), max_size=40),
    st.integers(0, 40),
    st.integers(0, 40),
    st.sampled_from([pa.string(), pa.large_string(), pa.large_binary()]),
)
def test_hash64_of_slices_and_chunks_equals_the_plain_array(
    values: list[str], i: int, j: int, kind: pa.DataType
) -> None:
    i, j = sorted((min(i, len(values)), min(j, len(values))))
    plain = pa.array(values, kind)
    whole = hash64(plain)
    assert hash64(plain[i:j]).tolist() == whole[i:j].tolist()
    chunked = pa.chunked_array([plain[:i], plain[i:j], plain[j:]], kind)
    assert hash64(chunked).tolist() == whole.tolist()


def test_equal_strings_hash_equally_whatever_their_container() -> None:
    values = ["a", "b", "a", "", "b", "a", ""]
    h = hash64(pa.array(values))
    for v in set(values):
        assert len({h[i] for i, x in enumerate(values) if x == v}) == 1
    assert len(set(h.tolist())) == 3
    fixed = pa.array([b"ab", b"cd"], pa.binary(2))
    assert hash64(fixed).tolist() == [ref_hash_bytes(b"ab"), ref_hash_bytes(b"cd")]


def test_hash64_of_empty_arrays() -> None:
    for arr in (pa.array([], pa.string()), pa.chunked_array([], pa.string())):
        out = hash64(arr)
        assert out.dtype == np.uint64
        assert out.shape == (0,)
    assert hash64(pa.array(["", ""])).tolist() == [ref_hash_bytes(b"")] * 2


def test_hash64_refuses_nulls_and_other_types() -> None:
    with pytest.raises(ValueError, match="null"):
        hash64(pa.array(["a", None]))
    with pytest.raises(ValueError, match="null"):
        hash64(pa.chunked_array([pa.array(["a"]), pa.array([None], pa.string())]))
    with pytest.raises(TypeError):
        hash64(pa.array([1.5]))
    with pytest.raises(TypeError):
        hash64(["a"])


def test_hash64_has_no_collisions_on_many_strings() -> None:
    rng = np.random.default_rng(7)
    lengths = rng.integers(0, 24, 200_000)
    blob = rng.integers(0, 256, int(lengths.sum()), dtype=np.uint8).tobytes()
    cuts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    random_strings = {blob[a:b] for a, b in itertools.pairwise(cuts)}
    every_short = [bytes([a]) for a in range(256)] + [
        bytes([a, b]) for a in range(256) for b in range(256)
    ]
    for values in (
        sorted(random_strings),
        every_short,
        [f"user-{i}".encode() for i in range(200_000)],
    ):
        assert len(set(hash64(pa.array(values, pa.binary())).tolist())) == len(values)


@pytest.mark.parametrize("shift", [56, 0, 28])
def test_hash64_bits_are_roughly_uniform(shift: int) -> None:
    h = hashes_of(100_000, "event-")
    counts = np.bincount(
        ((h >> np.uint64(shift)) & np.uint64(0xFF)).astype(np.int64), minlength=256
    )
    expected = len(h) / 256
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    # 255 degrees of freedom: mean 255, standard deviation about 22.6.
    assert chi_square < 255 + 5 * 22.6


# ------------------------------------------------------------------------ HyperLogLog


@NO_DEADLINE
@given(u64s, st.integers(4, 18))
def test_register_index_and_rank_match_the_reference(hashes: np.ndarray, p: int) -> None:
    sketch = hll_of(hashes, p)
    expected = np.zeros(1 << p, dtype=np.uint8)
    for h in hashes.tolist():
        index, rank = ref_index_and_rank(h, p)
        expected[index] = max(expected[index], rank)
    assert np.array_equal(sketch.registers, expected)


def test_rank_is_exact_at_bit_boundaries() -> None:
    edges = [0, 1, M64 - 1] + [1 << k for k in range(64)] + [(1 << k) - 1 for k in range(1, 64)]
    for p in (4, 12, 18):
        for h in edges:
            index, rank = ref_index_and_rank(h, p)
            assert hll_of(np.array([h], dtype=np.uint64), p).registers[index] == rank


@pytest.mark.parametrize(
    ("n", "p"),
    [
        (0, 12),
        (1, 12),
        (10, 12),
        (1000, 12),
        (100_000, 12),
        (100_000, 8),
        (100_000, 14),
        (20_000, 12),
        # Where the classic estimator hands over from linear counting (2.5 m) and is biased.
        (10_650, 12),
        (42_600, 14),
    ],
)
def test_estimate_is_within_three_standard_errors(n: int, p: int) -> None:
    estimate = hll_of(hashes_of(n), p).estimate()
    if n == 0:
        assert estimate == 0.0
    assert abs(estimate - n) <= 3 * 1.04 / math.sqrt(1 << p) * n


def test_small_cardinalities_are_near_exact() -> None:
    for n in (1, 2, 5, 10, 50):
        assert abs(hll_of(hashes_of(n, "small-")).estimate() - n) < 0.5


@NO_DEADLINE
@given(u64s, u64s, st.integers(4, 10))
def test_merge_equals_the_sketch_of_the_union(a: np.ndarray, b: np.ndarray, p: int) -> None:
    merged = hll_of(a, p)
    merged.merge(hll_of(b, p))
    union = hll_of(np.union1d(a, b).astype(np.uint64), p)
    assert merged == union
    assert merged.to_bytes() == union.to_bytes()


@NO_DEADLINE
@given(u64s, st.randoms(use_true_random=False), st.integers(4, 14))
def test_registers_depend_only_on_the_set(hashes: np.ndarray, rnd: random.Random, p: int) -> None:
    once = hll_of(np.unique(hashes), p)
    shuffled = list(hashes.tolist()) * 2
    rnd.shuffle(shuffled)
    again = HyperLogLog(p)
    for start in range(0, len(shuffled), 7):
        again.add_hashes(np.array(shuffled[start : start + 7], dtype=np.uint64))
    assert again.to_bytes() == once.to_bytes()


def test_offline_recomputation_gives_identical_bytes() -> None:
    users = [f"user-{i % 3000}" for i in range(20_000)]
    groups = np.arange(20_000) % 40
    live = hll_by_group(groups, hash64(pa.array(users)), 40)
    order = np.random.default_rng(3).permutation(20_000)
    replay = pa.chunked_array(
        [pa.array([users[i] for i in order[:9000]]), pa.array([users[i] for i in order[9000:]])]
    )
    offline = hll_by_group(groups[order], hash64(replay), 40)
    assert [s.to_bytes() for s in live] == [s.to_bytes() for s in offline]


@NO_DEADLINE
@given(u64s, st.integers(4, 18))
def test_bytes_round_trip(hashes: np.ndarray, p: int) -> None:
    sketch = hll_of(hashes, p)
    data = sketch.to_bytes()
    assert HyperLogLog.from_bytes(data) == sketch
    assert HyperLogLog.from_bytes(data).to_bytes() == data


def test_encoding_is_sparse_when_few_registers_are_set() -> None:
    few, many = hll_of(hashes_of(100)), hll_of(hashes_of(50_000))
    assert len(few.to_bytes()) <= 4 + 4 * 100
    assert len(many.to_bytes()) == 4 + 4096
    for sketch in (few, many, HyperLogLog()):
        assert HyperLogLog.from_bytes(sketch.to_bytes()) == sketch


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"X\x01\x0c\x00",
        b"H\x02\x0c\x00",
        b"H\x01\x02\x00",
        b"H\x01\x0c\x00" + bytes(10),
        b"H\x01\x0c\x01\x01\x00\x00\x00\x01\x00\x00\x00",
        b"H\x01\x04\x00" + bytes([62]) + bytes(15),
    ],
)
def test_bad_encodings_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any bad body is a ValueError
        HyperLogLog.from_bytes(data)


def test_merge_refuses_another_precision_and_add_refuses_other_dtypes() -> None:
    with pytest.raises(ValueError, match="p="):
        HyperLogLog(12).merge(HyperLogLog(10))
    with pytest.raises(TypeError, match="uint64"):
        HyperLogLog().add_hashes(np.array([1, 2], dtype=np.int64))
    with pytest.raises(ValueError, match="precision"):
        HyperLogLog(3)


@NO_DEADLINE
@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, M64 - 1)), max_size=80), st.integers(4, 10)
)
def test_hll_by_group_equals_per_group_sketches(pairs: list[tuple[int, int]], p: int) -> None:
    groups = np.array([g for g, _ in pairs], dtype=np.int64)
    hashes = np.array([h for _, h in pairs], dtype=np.uint64)
    sketches = hll_by_group(groups, hashes, 6, p)
    assert len(sketches) == 6
    for g, sketch in enumerate(sketches):
        assert sketch == hll_of(hashes[groups == g], p)


def test_hll_by_group_checks_its_groups() -> None:
    hashes = np.array([1, 2], dtype=np.uint64)
    with pytest.raises(ValueError, match="group_ids"):
        hll_by_group(np.array([0, 2]), hashes, 2)
    with pytest.raises(ValueError, match="group_ids"):
        hll_by_group(np.array([0]), hashes, 2)
    with pytest.raises(TypeError, match="integers"):
        hll_by_group(np.array([0.0, 1.0]), hashes, 2)
    assert hll_by_group(np.array([], dtype=np.int64), np.array([], dtype=np.uint64), 0) == []


# --------------------------------------------------------------------------- DDSketch


def lower_quantile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The closest-rank lower quantile: the element of rank floor(q (n - 1)), sorted."""
    exact = float(np.sort(values)[math.floor(q * (len(values) - 1))])
    assert exact == float(np.quantile(values, q, method="lower"))
    return exact


def assert_within_alpha(estimate: float | None, exact: float, alpha: float) -> None:
    assert estimate is not None
    assert abs(estimate - exact) <= alpha * abs(exact) * (1 + 1e-9) + MIN_MAGNITUDE


QS = [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]


@NO_DEADLINE
@given(st.lists(small_or_signed, min_size=1, max_size=80), st.sampled_from([0.001, 0.01, 0.05]))
def test_quantiles_are_within_alpha_of_the_lower_quantile(
    values: list[float], alpha: float
) -> None:
    sketch = dds_of(values, alpha)
    assert sketch.count == len(values)
    for q in QS:
        assert_within_alpha(sketch.quantile(q), lower_quantile(values, q), alpha)


@pytest.mark.parametrize("alpha", [0.005, 0.01, 0.02])
def test_quantiles_of_a_large_mixed_sample(alpha: float) -> None:
    rng = np.random.default_rng(11)
    values = rng.lognormal(2, 3, 50_000) * rng.choice([-1.0, 1.0, 1.0], 50_000)
    values[::17] = 0.0
    sketch = dds_of(values, alpha)
    for q in [*QS, 0.3, 0.33, 0.999]:
        assert_within_alpha(sketch.quantile(q), lower_quantile(values, q), alpha)


@NO_DEADLINE
@given(
    st.lists(small_or_signed, max_size=60),
    st.lists(small_or_signed, max_size=60),
    st.sampled_from([3, 10, 2048]),
)
def test_merge_equals_the_sketch_of_the_concatenation(
    a: list[float], b: list[float], cap: int
) -> None:
    merged = dds_of(a, cap=cap)
    merged.merge(dds_of(b, cap=cap))
    assert merged == dds_of(a + b, cap=cap)
    in_batches = dds_of([], cap=cap)
    for start in range(0, len(a + b), 9):
        in_batches.add_values(np.array((a + b)[start : start + 9]))
    assert in_batches == merged


@NO_DEADLINE
@given(
    st.lists(small_or_signed, max_size=80),
    st.sampled_from([0.001, 0.01, 0.5]),
    st.sampled_from([5, 2048]),
)
def test_ddsketch_bytes_round_trip(values: list[float], alpha: float, cap: int) -> None:
    sketch = dds_of(values, alpha, cap)
    data = sketch.to_bytes()
    again = DDSketch.from_bytes(data)
    assert again == sketch
    assert again.to_bytes() == data
    assert again.quantile(0.5) == sketch.quantile(0.5)


def test_ddsketch_encoding_is_compact() -> None:
    values = np.random.default_rng(5).lognormal(3, 1, 20_000)
    assert len(dds_of(values).to_bytes()) < 4 * dds_of(values).bucket_count + 64


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"D\x01",
        DDSketch().to_bytes()[:-1],
        DDSketch().to_bytes() + b"\x00",
        b"X" + DDSketch().to_bytes()[1:],
    ],
)
def test_bad_ddsketch_encodings_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any bad body is a ValueError
        DDSketch.from_bytes(data)


def test_bucket_cap_collapses_the_smallest_magnitudes() -> None:
    magnitudes = np.geomspace(1e-6, 1e6, 10_000)
    values = np.concatenate([magnitudes, -magnitudes])
    sketch = dds_of(values, 0.01, cap=500)
    assert sketch.bucket_count == 2 * 500
    assert sketch.count == len(values)
    # The 500 largest magnitudes of each sign keep their buckets, so the tails keep the bound.
    for q in (0.0, 0.1, 0.9, 0.99, 1.0):
        assert_within_alpha(sketch.quantile(q), lower_quantile(values, q), 0.01)
    # The smallest magnitudes were folded into the lowest kept bucket, gamma**-500 below 1e6.
    floor = 1e6 * ((1 - 0.01) / (1 + 0.01)) ** 500
    smallest_positive = sketch.quantile(10_000 / (len(values) - 1))
    largest_negative = sketch.quantile(9_999 / (len(values) - 1))
    assert smallest_positive is not None
    assert largest_negative is not None
    assert smallest_positive > floor
    assert largest_negative < -floor


def test_nan_and_infinity_are_refused() -> None:
    with pytest.raises(ValueError, match="1 NaN and 0 infinite"):
        dds_of([1.0, math.nan])
    with pytest.raises(ValueError, match="0 NaN and 2 infinite"):
        dds_of([math.inf, -math.inf])
    with pytest.raises(ValueError, match="NaN"):
        ddsketch_by_group(np.array([0]), np.array([math.nan]), 1)


def test_empty_sketch_and_bad_arguments() -> None:
    sketch = DDSketch()
    assert sketch.count == 0
    assert sketch.quantile(0.5) is None
    with pytest.raises(ValueError, match="quantile"):
        dds_of([1.0]).quantile(1.5)
    with pytest.raises(ValueError, match="quantile"):
        dds_of([1.0]).quantile(math.nan)
    with pytest.raises(ValueError, match="alpha"):
        DDSketch(0.01).merge(DDSketch(0.02))
    with pytest.raises(ValueError, match="alpha"):
        DDSketch(1.0)


def test_extreme_magnitudes_stay_finite() -> None:
    sketch = dds_of([1.7976931348623157e308, -1.7976931348623157e308, 5e-324])
    assert sketch.quantile(1.0) == pytest.approx(1.7976931348623157e308, rel=0.01)
    assert sketch.quantile(0.0) == pytest.approx(-1.7976931348623157e308, rel=0.01)
    assert sketch.quantile(0.5) == 0.0


@NO_DEADLINE
@given(
    st.lists(st.tuples(st.integers(0, 4), small_or_signed), max_size=80), st.sampled_from([2, 2048])
)
def test_ddsketch_by_group_equals_per_group_sketches(
    pairs: list[tuple[int, float]], cap: int
) -> None:
    groups = np.array([g for g, _ in pairs], dtype=np.int64)
    values = np.array([v for _, v in pairs], dtype=np.float64)
    sketches = ddsketch_by_group(groups, values, 5, 0.01, cap)
    assert len(sketches) == 5
    for g, sketch in enumerate(sketches):
        assert sketch == dds_of(values[groups == g], 0.01, cap)


def test_sketches_survive_pickling() -> None:
    # Ray moves sketches between workers by pickling them.
    hll = hll_by_group(np.array([0, 1]), hashes_of(2), 2)[1]
    dds = dds_of([-2.0, 0.0, 3.5])
    assert pickle.loads(pickle.dumps(hll)) == hll
    assert pickle.loads(pickle.dumps(dds)) == dds
