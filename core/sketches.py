"""Mergeable sketches of a micro-batch, computed column-wise: distinct counts and quantiles.

A batch of 1,000–20,000 events is aggregated per group with NumPy on whole columns; no
function here loops in Python over events (a loop over groups, or over the buckets of one
sketch, is the most there is). Nothing here does I/O.

Three pieces, and the contracts the pipeline relies on:

* :func:`hash64` gives a 64-bit hash per element of a string, binary or integer Arrow
  array. It is *deterministic*: the same bytes (or the same integer) hash to the same
  value in every process, run and machine, because it is plain wrap-around uint64
  arithmetic (never Python's salted ``hash()``). Strings hash by a polynomial over their
  bytes mixed with their length, integers by their 8 bytes; both end in murmur3's
  ``fmix64`` finaliser. It is meant for sketches, not for security: nothing stops an
  adversary from building colliding strings. Nulls have no hash: drop them first,
  ``hash64`` raises ValueError if it meets one.
* :class:`HyperLogLog` counts distinct hashes in ``2**p`` registers of one byte. Its
  registers depend only on the *set* of hashes added (duplicates and order change
  nothing), and its bytes only on its registers, so a recomputation from the same
  values, offline or in another worker, gives identical bytes; merging is an
  elementwise max, so the sketch of a union is the merge of the sketches. The
  standard error of :meth:`HyperLogLog.estimate` is about ``1.04 / sqrt(2**p)`` (1.6 %
  at p=12) over the whole range, and small cardinalities are near exact. The
  estimator reads only the registers, so it can improve without changing a stored byte.
* :class:`DDSketch` answers quantiles with a relative error of at most ``alpha`` for
  values of magnitude at least ``MIN_MAGNITUDE``; smaller magnitudes count as zero.
  It keeps a count per logarithmic bucket, so it depends only on the multiset of
  values and a merge equals the sketch of the concatenation, even after collapsing.
  Its keys come from a float logarithm, so unlike the HyperLogLog's bytes they may
  differ between machines for a value on a bucket boundary; the bound holds either way.
  Memory is bounded: past ``max_buckets`` buckets per sign the buckets of smallest
  magnitude are collapsed into one, as the reference DDSketch does, and only
  quantiles that land in a collapsed bucket lose the guarantee. NaN and infinities
  raise ValueError: the caller filters them.

:func:`hll_by_group` and :func:`ddsketch_by_group` build one sketch per group of a batch
in a few whole-array operations; each equals the sketch built from that group alone.
"""

from __future__ import annotations

import itertools
import math
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa

U64Array = npt.NDArray[np.uint64]
I64Array = npt.NDArray[np.int64]

# The polynomial's base: odd, so that it is invertible mod 2**64 and a string's hash can
# be cut out of the prefix sums of a whole buffer.
_POLY_BASE = 0x9E3779B97F4A7C15
_POLY_BASE_INV = pow(_POLY_BASE, -1, 1 << 64)
_LENGTH_MULT = 0xC2B2AE3D27D4EB4F
_BYTES_SEED = 0x27D4EB2F165667C5
_INT_SEED = 0x165667B19E3779F9
_FMIX_1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX_2 = np.uint64(0xC4CEB9FE1A85EC53)
_SHIFT_33 = np.uint64(33)

_HLL_TAG = 0x48  # "H"
_DDS_TAG = 0x44  # "D"
_FORMAT_VERSION = 1
_HLL_DENSE = 0
_HLL_SPARSE = 1

MIN_PRECISION = 4
MAX_PRECISION = 18
DEFAULT_PRECISION = 12
DEFAULT_ALPHA = 0.01
DEFAULT_MAX_BUCKETS = 2048
MIN_ALPHA = 1e-6
MAX_ALPHA = 0.5
MIN_MAGNITUDE = 1e-9
"""Values with a smaller magnitude than this count as zero in a :class:`DDSketch`."""


# --------------------------------------------------------------------------- hash64


def hash64(values: pa.Array | pa.ChunkedArray) -> U64Array:
    """Hashes each element of an Arrow array to a deterministic 64-bit value.

    Args:
        values: A string, binary (any offset width, view or fixed size), integer or
            dictionary-of-those array, plain or chunked, sliced or not, without nulls.
            Strings and binaries with equal bytes hash equally whatever their Arrow type;
            integers of any width hash by their value as an int64 (uint64 by its bits).

    Returns:
        A new uint64 array with one hash per element, in order.

    Raises:
        ValueError: If ``values`` holds a null.
        TypeError: If ``values`` is of another type.
    """
    if isinstance(values, pa.ChunkedArray):
        parts = [_hash_array(chunk) for chunk in values.chunks]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
    if isinstance(values, pa.Array):
        return _hash_array(values)
    raise TypeError(f"hash64 takes a pyarrow Array or ChunkedArray, not {type(values).__name__}")


def _hash_array(arr: pa.Array) -> U64Array:
    if arr.null_count:
        raise ValueError(
            f"hash64 got {arr.null_count} null value(s): nulls have no hash, drop them first"
        )
    kind = arr.type
    if pa.types.is_null(kind):  # what pa.array([]) infers: nothing to hash
        return np.empty(0, dtype=np.uint64)
    if pa.types.is_dictionary(kind):
        return _hash_array(arr.dictionary_decode())
    if pa.types.is_integer(kind):
        return _hash_integers(arr)
    if _is_bytes_like(kind):
        return _hash_bytes(arr.cast(pa.large_binary()))
    raise TypeError(f"hash64 hashes strings, binaries and integers, not {kind}")


def _is_bytes_like(kind: pa.DataType) -> bool:
    checks = (
        pa.types.is_string,
        pa.types.is_large_string,
        pa.types.is_string_view,
        pa.types.is_binary,
        pa.types.is_large_binary,
        pa.types.is_binary_view,
        pa.types.is_fixed_size_binary,
    )
    return any(check(kind) for check in checks)


def _hash_integers(arr: pa.Array) -> U64Array:
    if pa.types.is_uint64(arr.type):
        raw = arr.to_numpy(zero_copy_only=True)
    else:
        # Through int64, so that 7 as int8 and 7 as int64 are the same key.
        raw = arr.cast(pa.int64()).to_numpy(zero_copy_only=True).view(np.uint64)
    return _fmix64(raw + np.uint64(_INT_SEED))


def _hash_bytes(arr: pa.Array) -> U64Array:
    """Polynomial hash of each value of a large_binary array, from one pass over its bytes.

    With ``G[k] = sum_{j<k} b_j P**j`` over the whole data buffer, the value spanning
    ``[s, e)`` has ``sum_j b_{s+j} P**j = (G[e] - G[s]) * P**-s``, all mod 2**64.
    """
    n = len(arr)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64, count=n + 1, offset=8 * arr.offset)
    first, total = int(offsets[0]), int(offsets[-1] - offsets[0])
    data = (
        np.frombuffer(data_buf, dtype=np.uint8, count=total, offset=first)
        if total
        else np.empty(0, dtype=np.uint8)
    )
    starts = offsets[:-1] - first
    ends = offsets[1:] - first
    with np.errstate(over="ignore"):
        # One buffer of total + 1 words, reused (fresh pages are what costs here): first
        # the prefix sums G, then the inverse powers.
        work = np.empty(total + 1, dtype=np.uint64)
        work[0] = 0
        _fill_powers(work[1:], _POLY_BASE)
        work[1:] *= data
        np.cumsum(work, out=work)
        poly = work[ends] - work[starts]
        _fill_powers(work, _POLY_BASE_INV)
        poly *= work[starts]
        poly += (ends - starts).astype(np.uint64) * np.uint64(_LENGTH_MULT)
        poly += np.uint64(_BYTES_SEED)
    return _fmix64(poly)


def _fill_powers(out: U64Array, base: int) -> None:
    """Writes ``base**0, base**1, ...`` mod 2**64 into ``out`` (array products wrap)."""
    if len(out):
        out[0] = 1
        out[1:] = base
        np.cumprod(out, out=out)


def _fmix64(x: U64Array) -> U64Array:
    """murmur3's 64-bit finaliser, in place: a bijection that spreads every input bit."""
    x ^= x >> _SHIFT_33
    x *= _FMIX_1
    x ^= x >> _SHIFT_33
    x *= _FMIX_2
    x ^= x >> _SHIFT_33
    return x


# --------------------------------------------------------------------- HyperLogLog


class HyperLogLog:
    """Distinct count of 64-bit hashes in ``m = 2**p`` one-byte registers.

    A hash's top ``p`` bits pick a register; the register keeps the largest rank seen,
    the rank being one plus the number of leading zeros of the other ``64 - p`` bits.
    Registers are a function of the set of hashes, so duplicates and order do not
    matter, and :meth:`to_bytes` is a function of the registers.

    Args:
        p: The precision, from ``MIN_PRECISION`` to ``MAX_PRECISION``.
    """

    __slots__ = ("_p", "_registers")

    def __init__(self, p: int = DEFAULT_PRECISION) -> None:
        _check_precision(p)
        self._p = p
        self._registers = np.zeros(1 << p, dtype=np.uint8)

    @classmethod
    def _from_registers(cls, p: int, registers: npt.NDArray[np.uint8]) -> HyperLogLog:
        sketch = cls.__new__(cls)
        sketch._p = p
        sketch._registers = registers
        return sketch

    @classmethod
    def from_registers(cls, p: int, registers: npt.ArrayLike) -> HyperLogLog:
        """A sketch with these ``2**p`` registers (copied), e.g. a stored map state's.

        Raises:
            ValueError: If the registers are not ``2**p`` ranks in range.
        """
        _check_precision(p)
        values = np.array(registers, dtype=np.uint8)
        if values.shape != (1 << p,) or (values.size and int(values.max()) > 65 - p):
            raise ValueError(f"expected {1 << p} registers of at most {65 - p}")
        return cls._from_registers(p, values)

    @property
    def p(self) -> int:
        """The precision: the sketch has ``2**p`` registers."""
        return self._p

    @property
    def registers(self) -> npt.NDArray[np.uint8]:
        """A read-only view of the registers."""
        view = self._registers.view()
        view.flags.writeable = False
        return view

    def add_hashes(self, hashes: U64Array) -> None:
        """Adds a 1-D uint64 array of hashes (from :func:`hash64`), in place."""
        index, rank = _index_and_rank(_check_hashes(hashes), self._p)
        np.maximum.at(self._registers, index, rank)

    def merge(self, other: HyperLogLog) -> None:
        """Folds ``other`` into this sketch, in place: it then counts the union.

        Raises:
            ValueError: If the precisions differ.
        """
        if other._p != self._p:
            raise ValueError(f"cannot merge HyperLogLog of p={other._p} into one of p={self._p}")
        np.maximum(self._registers, other._registers, out=self._registers)

    def copy(self) -> HyperLogLog:
        """An independent copy."""
        return HyperLogLog._from_registers(self._p, self._registers.copy())

    def estimate(self) -> float:
        """The estimated number of distinct hashes added.

        Ertl's improved estimator ("New cardinality estimation algorithms for
        HyperLogLog sketches", 2017; what Redis uses): the harmonic mean of Flajolet
        et al. with its bias corrected from the register histogram, through the whole
        range. It agrees with linear counting where few registers are set (so small
        counts are near exact) and with the classic raw estimate for large counts,
        without the classic's jump and bias where one hands over to the other.
        """
        m = len(self._registers)
        q = 64 - self._p
        histogram = np.bincount(self._registers, minlength=q + 2).tolist()
        z = m * _tau(1.0 - histogram[q + 1] / m)
        for k in range(q, 0, -1):
            z = 0.5 * (z + histogram[k])
        z += m * _sigma(histogram[0] / m)
        return m * m / (2.0 * math.log(2.0)) / z

    def to_bytes(self) -> bytes:
        """A compact, versioned encoding: (index, value) pairs while few registers are set."""
        set_index = np.flatnonzero(self._registers)
        if 4 * len(set_index) < len(self._registers):
            pairs = (set_index.astype(np.uint32) << np.uint32(8)) | self._registers[set_index]
            body, encoding = pairs.astype("<u4").tobytes(), _HLL_SPARSE
        else:
            body, encoding = self._registers.tobytes(), _HLL_DENSE
        return bytes([_HLL_TAG, _FORMAT_VERSION, self._p, encoding]) + body

    @classmethod
    def from_bytes(cls, data: bytes) -> HyperLogLog:
        """Decodes :meth:`to_bytes`.

        Raises:
            ValueError: If ``data`` is not a valid encoding.
        """
        if len(data) < 4 or data[0] != _HLL_TAG or data[1] != _FORMAT_VERSION:
            raise ValueError("not a version-1 HyperLogLog encoding")
        p, encoding, body = data[2], data[3], data[4:]
        _check_precision(p)
        m = 1 << p
        if encoding == _HLL_DENSE and len(body) == m:
            registers = np.frombuffer(body, dtype=np.uint8).copy()
        elif encoding == _HLL_SPARSE and len(body) % 4 == 0:
            registers = _sparse_registers(np.frombuffer(body, dtype="<u4"), m)
        else:
            raise ValueError("HyperLogLog encoding has a bad body")
        if registers.size and int(registers.max()) > 65 - p:
            raise ValueError("HyperLogLog encoding has a register out of range")
        return cls._from_registers(p, registers)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HyperLogLog):
            return NotImplemented
        return self._p == other._p and bool(np.array_equal(self._registers, other._registers))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"HyperLogLog(p={self._p}, estimate={self.estimate():.1f})"


def hll_by_group(
    group_ids: npt.NDArray[np.integer],
    hashes: U64Array,
    n_groups: int,
    p: int = DEFAULT_PRECISION,
) -> list[HyperLogLog]:
    """One HyperLogLog per group, from one scatter-max over a ``(n_groups, 2**p)`` array.

    Args:
        group_ids: Each hash's group, integers in ``[0, n_groups)``.
        hashes: uint64 hashes, as long as ``group_ids``.
        n_groups: The number of groups; a group without hashes gets an empty sketch.
        p: The precision of every sketch.

    Returns:
        ``n_groups`` sketches; sketch ``g`` equals one fed only the hashes of group ``g``.
    """
    _check_precision(p)
    hashes = _check_hashes(hashes)
    groups = _check_groups(group_ids, n_groups, len(hashes))
    m = 1 << p
    registers = np.zeros((n_groups, m), dtype=np.uint8)
    index, rank = _index_and_rank(hashes, p)
    np.maximum.at(registers.reshape(-1), groups * m + index, rank)
    return [HyperLogLog._from_registers(p, row) for row in registers]


def _check_precision(p: int) -> None:
    if not MIN_PRECISION <= p <= MAX_PRECISION:
        raise ValueError(f"precision p must be in [{MIN_PRECISION}, {MAX_PRECISION}], got {p}")


def _check_hashes(hashes: U64Array) -> U64Array:
    arr = np.asarray(hashes)
    if arr.dtype != np.uint64:
        raise TypeError(f"hashes must be a uint64 array (see hash64), got {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"hashes must be one-dimensional, got shape {arr.shape}")
    return arr


def _check_groups(group_ids: npt.NDArray[np.integer], n_groups: int, n: int) -> I64Array:
    groups = np.asarray(group_ids)
    if not np.issubdtype(groups.dtype, np.integer):
        raise TypeError(f"group_ids must be integers, got {groups.dtype}")
    if groups.shape != (n,):
        raise ValueError(f"group_ids has shape {groups.shape}, the values have length {n}")
    if n_groups < 0:
        raise ValueError(f"n_groups must be >= 0, got {n_groups}")
    if n and (int(groups.min()) < 0 or int(groups.max()) >= n_groups):
        raise ValueError(f"group_ids must lie in [0, {n_groups})")
    return groups.astype(np.int64, copy=False)


def _index_and_rank(hashes: U64Array, p: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.uint8]]:
    index = (hashes >> np.uint64(64 - p)).astype(np.intp)
    rest = hashes << np.uint64(p)
    # rest's low p bits are zero, so only rest == 0 has more than 64 - p leading zeros.
    rank = np.minimum(_leading_zeros(rest), 64 - p) + 1
    return index, rank.astype(np.uint8)


def _leading_zeros(x: U64Array) -> npt.NDArray[np.int64]:
    """Exact count of leading zeros of each uint64.

    Each 32-bit half converts to float64 exactly, and ``frexp`` then gives its bit
    length exactly (0 for 0); the whole 64 bits would round.
    """
    high = (x >> np.uint64(32)).astype(np.float64)
    low = (x & np.uint64(0xFFFFFFFF)).astype(np.float64)
    high_bits = np.frexp(high)[1].astype(np.int64)
    low_bits = np.frexp(low)[1].astype(np.int64)
    return np.where(high_bits > 0, 32 - high_bits, 64 - low_bits)


def _sigma(x: float) -> float:
    """Ertl's sigma(x) = x + sum_k x**(2**k) 2**(k-1): the share of empty registers."""
    if x == 1.0:
        return math.inf
    y, z = 1.0, x
    while True:
        x *= x
        previous = z
        z += x * y
        y += y
        if z == previous:
            return z


def _tau(x: float) -> float:
    """Ertl's tau(x): the share of registers at the top rank, which saturated."""
    if x in (0.0, 1.0):
        return 0.0
    y, z = 1.0, 1.0 - x
    while True:
        x = math.sqrt(x)
        previous = z
        y *= 0.5
        z -= (1.0 - x) * (1.0 - x) * y  # a product, as core.sketch_states' SQL has it
        if z == previous:
            return z / 3.0


def _sparse_registers(pairs: npt.NDArray[np.uint32], m: int) -> npt.NDArray[np.uint8]:
    index = (pairs >> np.uint32(8)).astype(np.int64)
    values = (pairs & np.uint32(0xFF)).astype(np.uint8)
    if len(index) and (int(index[-1]) >= m or np.any(np.diff(index) <= 0) or not np.all(values)):
        raise ValueError("HyperLogLog sparse encoding is not sorted, in range and non-zero")
    registers = np.zeros(m, dtype=np.uint8)
    registers[index] = values
    return registers


# ------------------------------------------------------------------------ DDSketch


@dataclass(frozen=True, slots=True)
class _Store:
    """Counts of the buckets of one sign: ascending keys, positive counts."""

    keys: I64Array
    counts: I64Array

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def merged(self, other: _Store, max_buckets: int) -> _Store:
        if not len(other.keys):
            return self.collapsed(max_buckets)
        if not len(self.keys):
            return other.collapsed(max_buckets)
        keys = np.concatenate([self.keys, other.keys])
        counts = np.concatenate([self.counts, other.counts])
        order = np.argsort(keys, kind="stable")
        keys, counts = keys[order], counts[order]
        starts = np.flatnonzero(np.diff(keys, prepend=keys[:1] - 1))
        return _Store(keys[starts], np.add.reduceat(counts, starts)).collapsed(max_buckets)

    def collapsed(self, max_buckets: int) -> _Store:
        """Folds the lowest buckets into the lowest kept one, keeping ``max_buckets``.

        Folding the lowest keys commutes with merging, so merge stays exact.
        """
        cut = len(self.keys) - max_buckets
        if cut <= 0:
            return self
        counts = self.counts[cut:].copy()
        counts[0] += self.counts[: cut + 1].sum() - self.counts[cut]
        return _Store(self.keys[cut:].copy(), counts)

    def key_at(self, rank: int) -> int:
        """The key of the element of 0-based ``rank`` in ascending key order."""
        index = np.searchsorted(np.cumsum(self.counts), rank, side="right")
        return int(self.keys[index])


_EMPTY_STORE = _Store(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))


class DDSketch:
    """Quantiles with relative error ``alpha``, from counts per logarithmic bucket.

    A value ``v`` with ``|v| >= MIN_MAGNITUDE`` goes to key ``ceil(log_gamma |v|)`` of the
    store of its sign, ``gamma = (1 + alpha) / (1 - alpha)``; smaller magnitudes go to
    a zero count. A bucket answers with ``2 gamma**k / (gamma + 1)``, within ``alpha``
    of every value in ``(gamma**(k-1), gamma**k]``.

    Args:
        alpha: The relative accuracy, from ``MIN_ALPHA`` to ``MAX_ALPHA``.
        max_buckets: The most buckets kept per sign; more fold the lowest magnitudes.
    """

    __slots__ = ("_alpha", "_ln_gamma", "_max_buckets", "_neg", "_pos", "_zero")

    def __init__(
        self, alpha: float = DEFAULT_ALPHA, max_buckets: int = DEFAULT_MAX_BUCKETS
    ) -> None:
        if not MIN_ALPHA <= alpha <= MAX_ALPHA:
            raise ValueError(f"alpha must be in [{MIN_ALPHA}, {MAX_ALPHA}], got {alpha}")
        if max_buckets < 1:
            raise ValueError(f"max_buckets must be >= 1, got {max_buckets}")
        self._alpha = float(alpha)
        self._ln_gamma = math.log((1.0 + alpha) / (1.0 - alpha))
        self._max_buckets = int(max_buckets)
        self._zero = 0
        self._pos = _EMPTY_STORE
        self._neg = _EMPTY_STORE

    def _like(self, zero: int, pos: _Store, neg: _Store) -> DDSketch:
        sketch = DDSketch(self._alpha, self._max_buckets)
        sketch._zero = zero
        sketch._pos = pos.collapsed(self._max_buckets)
        sketch._neg = neg.collapsed(self._max_buckets)
        return sketch

    @property
    def alpha(self) -> float:
        """The relative accuracy."""
        return self._alpha

    @property
    def max_buckets(self) -> int:
        """The most buckets kept per sign."""
        return self._max_buckets

    @property
    def count(self) -> int:
        """The number of values added."""
        return self._zero + self._pos.total + self._neg.total

    @property
    def bucket_count(self) -> int:
        """The number of buckets in use, both signs together."""
        return len(self._pos.keys) + len(self._neg.keys)

    def buckets(self) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]]]:
        """The zero count and the (key, count) buckets of each sign, ascending keys."""
        return (
            self._zero,
            list(zip(self._pos.keys.tolist(), self._pos.counts.tolist(), strict=True)),
            list(zip(self._neg.keys.tolist(), self._neg.counts.tolist(), strict=True)),
        )

    @classmethod
    def from_buckets(
        cls,
        zero: int,
        positive: Mapping[int, int],
        negative: Mapping[int, int],
        alpha: float = DEFAULT_ALPHA,
        max_buckets: int = DEFAULT_MAX_BUCKETS,
    ) -> DDSketch:
        """A sketch of these bucket counts (key to count per sign), collapsed as merge does.

        Raises:
            ValueError: If a count is negative.
        """
        sketch = cls(alpha, max_buckets)
        stores = []
        for buckets in (positive, negative):
            keys = np.array(sorted(k for k, c in buckets.items() if c), dtype=np.int64)
            counts = np.array([buckets[int(k)] for k in keys], dtype=np.int64)
            if np.any(counts < 0) or zero < 0:
                raise ValueError("DDSketch bucket counts must not be negative")
            stores.append(_Store(keys, counts).collapsed(max_buckets))
        sketch._zero, (sketch._pos, sketch._neg) = int(zero), stores
        return sketch

    def add_values(self, values: npt.ArrayLike) -> None:
        """Adds an array of finite numbers, in place.

        Raises:
            ValueError: If a value is NaN or infinite.
        """
        v = _check_values(values)
        magnitude = np.abs(v)
        self._zero += int(np.count_nonzero(magnitude < MIN_MAGNITUDE))
        for sign, mask in ((1, v >= MIN_MAGNITUDE), (-1, v <= -MIN_MAGNITUDE)):
            keys, counts = np.unique(self._keys(magnitude[mask]), return_counts=True)
            self._merge_store(sign, _Store(keys, counts.astype(np.int64)))

    def _merge_store(self, sign: int, store: _Store) -> None:
        if sign > 0:
            self._pos = self._pos.merged(store, self._max_buckets)
        else:
            self._neg = self._neg.merged(store, self._max_buckets)

    def _keys(self, magnitude: npt.NDArray[np.float64]) -> I64Array:
        return np.ceil(np.log(magnitude) / self._ln_gamma).astype(np.int64)

    def bucket_value(self, key: int) -> float:
        """The value a bucket answers with, ``2 gamma**key / (gamma + 1)`` (finite)."""
        log_value = key * self._ln_gamma + math.log(2.0 / (1.0 + math.exp(self._ln_gamma)))
        # Clamping keeps the answer between the true value and the bucket's, so in bound.
        if log_value >= math.log(sys.float_info.max):
            return sys.float_info.max
        return math.exp(log_value)

    def merge(self, other: DDSketch) -> None:
        """Folds ``other`` into this sketch, in place: it then sketches both inputs.

        Raises:
            ValueError: If the accuracies differ.
        """
        if other._alpha != self._alpha:
            raise ValueError(f"cannot merge DDSketch of alpha={other._alpha} into {self._alpha}")
        self._zero += other._zero
        self._merge_store(1, other._pos)
        self._merge_store(-1, other._neg)

    def quantile(self, q: float) -> float | None:
        """The lower ``q``-quantile, or None if the sketch is empty.

        The lower quantile is the element of 0-based rank ``floor(q * (count - 1))`` in
        sorted order (NumPy's ``method="lower"``). The answer is within ``alpha`` of it
        relatively, or within ``MIN_MAGNITUDE`` absolutely for a smaller element.

        Raises:
            ValueError: If ``q`` is not in ``[0, 1]``.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile q must be in [0, 1], got {q}")
        n = self.count
        if n == 0:
            return None
        rank = math.floor(q * (n - 1))
        n_neg = self._neg.total
        if rank < n_neg:
            # Negatives in ascending order are their magnitudes' keys descending.
            return -self.bucket_value(self._neg.key_at(n_neg - 1 - rank))
        rank -= n_neg
        if rank < self._zero:
            return 0.0
        return self.bucket_value(self._pos.key_at(rank - self._zero))

    def to_bytes(self) -> bytes:
        """A compact, versioned encoding: key deltas and counts in the fewest bytes."""
        head = struct.pack(
            "<BBdIQ", _DDS_TAG, _FORMAT_VERSION, self._alpha, self._max_buckets, self._zero
        )
        return head + _pack_store(self._neg) + _pack_store(self._pos)

    @classmethod
    def from_bytes(cls, data: bytes) -> DDSketch:
        """Decodes :meth:`to_bytes`.

        Raises:
            ValueError: If ``data`` is not a valid encoding.
        """
        reader = _Reader(data)
        tag, version, alpha, max_buckets, zero = struct.unpack("<BBdIQ", reader.take(22))
        if tag != _DDS_TAG or version != _FORMAT_VERSION:
            raise ValueError("not a version-1 DDSketch encoding")
        sketch = cls(alpha, max_buckets)
        neg, pos = _unpack_store(reader), _unpack_store(reader)
        if reader.remaining or max(len(neg.keys), len(pos.keys)) > max_buckets:
            raise ValueError("DDSketch encoding has a bad body")
        sketch._zero, sketch._neg, sketch._pos = zero, neg, pos
        return sketch

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DDSketch):
            return NotImplemented
        return (
            (self._alpha, self._max_buckets, self._zero)
            == (other._alpha, other._max_buckets, other._zero)
            and _stores_equal(self._pos, other._pos)
            and _stores_equal(self._neg, other._neg)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"DDSketch(alpha={self._alpha}, count={self.count}, buckets={self.bucket_count})"


def ddsketch_by_group(
    group_ids: npt.NDArray[np.integer],
    values: npt.ArrayLike,
    n_groups: int,
    alpha: float = DEFAULT_ALPHA,
    max_buckets: int = DEFAULT_MAX_BUCKETS,
) -> list[DDSketch]:
    """One DDSketch per group, from one sort of (group, bucket) pairs per sign.

    Args:
        group_ids: Each value's group, integers in ``[0, n_groups)``.
        values: Finite numbers, as many as ``group_ids``.
        n_groups: The number of groups; a group without values gets an empty sketch.
        alpha: The relative accuracy of every sketch.
        max_buckets: The bucket cap of every sketch.

    Returns:
        ``n_groups`` sketches; sketch ``g`` equals one fed only the values of group ``g``.

    Raises:
        ValueError: If a value is NaN or infinite, or a group id is out of range.
    """
    template = DDSketch(alpha, max_buckets)
    v = _check_values(values)
    groups = _check_groups(group_ids, n_groups, len(v))
    magnitude = np.abs(v)
    zeros = np.bincount(groups[magnitude < MIN_MAGNITUDE], minlength=n_groups)
    pos, neg = (
        _stores_by_group(groups[mask], template._keys(magnitude[mask]), n_groups)
        for mask in (v >= MIN_MAGNITUDE, v <= -MIN_MAGNITUDE)
    )
    return [template._like(int(zeros[g]), pos[g], neg[g]) for g in range(n_groups)]


def _stores_by_group(groups: I64Array, keys: I64Array, n_groups: int) -> Sequence[_Store]:
    if not len(keys):
        return [_EMPTY_STORE] * n_groups
    low = int(keys.min())
    # One int64 per (group, key): the key span is below 2**31 for any allowed alpha, and
    # a list of 2**32 sketches would not fit in memory anyway.
    span = int(keys.max()) - low + 1
    pairs, counts = np.unique(groups * span + (keys - low), return_counts=True)
    pair_groups = pairs // span
    pair_keys = pairs % span + low
    bounds = np.searchsorted(pair_groups, np.arange(n_groups + 1))
    counts = counts.astype(np.int64)
    return [
        _Store(pair_keys[start:stop], counts[start:stop])
        for start, stop in itertools.pairwise(bounds)
    ]


def _check_values(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {v.shape}")
    finite = np.isfinite(v)
    if not finite.all():
        n_nan = int(np.count_nonzero(np.isnan(v)))
        n_inf = len(v) - int(np.count_nonzero(finite)) - n_nan
        raise ValueError(
            f"DDSketch values must be finite: got {n_nan} NaN and {n_inf} infinite value(s)"
        )
    return v


def _stores_equal(a: _Store, b: _Store) -> bool:
    return bool(np.array_equal(a.keys, b.keys) and np.array_equal(a.counts, b.counts))


def _pack_store(store: _Store) -> bytes:
    n = len(store.keys)
    if n == 0:
        return struct.pack("<I", 0)
    head = struct.pack("<Iq", n, int(store.keys[0]))
    return head + _pack_uints(np.diff(store.keys)) + _pack_uints(store.counts)


def _unpack_store(reader: _Reader) -> _Store:
    (n,) = struct.unpack("<I", reader.take(4))
    if n == 0:
        return _EMPTY_STORE
    (first,) = struct.unpack("<q", reader.take(8))
    deltas = _unpack_uints(reader, n - 1)
    counts = _unpack_uints(reader, n)
    if np.any(deltas == 0) or np.any(counts == 0):
        raise ValueError("DDSketch encoding has repeated keys or empty buckets")
    keys = np.concatenate([[first], first + np.cumsum(deltas)])
    return _Store(keys.astype(np.int64), counts)


def _pack_uints(values: I64Array) -> bytes:
    """Non-negative integers in the narrowest of 1, 2, 4 or 8 bytes, after a width byte."""
    top = int(values.max()) if len(values) else 0
    width = next(w for w in (1, 2, 4, 8) if top < 1 << (8 * w))
    return bytes([width]) + values.astype(f"<u{width}").tobytes()


def _unpack_uints(reader: _Reader, n: int) -> I64Array:
    width = reader.take(1)[0]
    if width not in (1, 2, 4, 8):
        raise ValueError(f"DDSketch encoding has a bad integer width {width}")
    raw = np.frombuffer(reader.take(width * n), dtype=f"<u{width}")
    if width == 8 and n and int(raw.max()) > sys.maxsize:
        raise ValueError("DDSketch encoding has an integer out of range")
    return raw.astype(np.int64)


class _Reader:
    """Reads a byte string front to back; running short is a ValueError."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int) -> bytes:
        if n > self.remaining:
            raise ValueError("encoding is truncated")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk
