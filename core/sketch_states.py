"""Rayline's own sketches as ClickHouse map states: one sketch family for every endpoint.

The live windows of the workers sketch distinct entities with :class:`core.sketches.
HyperLogLog` and values with :class:`core.sketches.DDSketch`. The stored aggregates
(``windows_1m``, ``rollup_1h``, ``rollup_1d``) and the query API's unsealed tail keep
*the same sketches*, in a form ClickHouse merges natively:

* the HyperLogLog as its non-zero registers, ``Map(UInt16, UInt8)`` (index → rank),
  merged with ``maxMap``: an elementwise max, which is exactly ``HyperLogLog.merge``.
  Sparse, so a minute with few entities costs a few bytes, and at most ``2**12``
  entries (3 bytes each) however many entities there were;
* the DDSketch as its bucket counts, ``Map(Int32, UInt64)`` per sign (key → count)
  plus the zero count, merged with ``sumMap``/``sum``: bucket-count addition, which is
  ``DDSketch.merge``. Stored uncollapsed; collapsing past ``max_buckets`` happens
  where a quantile is read, which gives the same answer because collapsing the lowest
  buckets commutes with merging (see :class:`core.sketches.DDSketch`).

From raw events, the states are computed in SQL by the very steps of
:mod:`core.sketches`: :func:`hash64`'s polynomial string hash and ``fmix64`` in
wrap-around UInt64 arithmetic, the register index and rank from its bits, and the
bucket key ``ceil(ln|v| / ln gamma)``. The estimates are SQL too, and equal to the
Python ones: the distinct count is Ertl's estimator of
:meth:`HyperLogLog.estimate` step for step (same IEEE operations in the same order),
and a quantile is the *bucket key* of :meth:`DDSketch.quantile` found with integer
arithmetic, turned into a value by :func:`quantile_value` (Python, because
ClickHouse's ``exp`` and the C library's differ in the last bit for some keys). The
integration tests check each equality against :mod:`core.sketches` on the real engine.

Bucket keys come from a float logarithm, so a value that sits exactly on a bucket
boundary may land one bucket apart in ClickHouse and NumPy; the error bound holds
either way (see :mod:`core.sketches`). Nothing here does I/O: it builds SQL text and
reads values back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from core.sealed import QUANTILE_LEVELS, QUANTILE_NAMES
from core.sketches import (
    _BYTES_SEED,
    _FMIX_1,
    _FMIX_2,
    _LENGTH_MULT,
    _POLY_BASE,
    DEFAULT_ALPHA,
    DEFAULT_MAX_BUCKETS,
    DEFAULT_PRECISION,
    MIN_MAGNITUDE,
    DDSketch,
    HyperLogLog,
)

HLL_P = DEFAULT_PRECISION
"""Precision of the stored HyperLogLogs: the workers' default, so their sketches merge."""
HLL_M = 1 << HLL_P
_HLL_Q = 64 - HLL_P
DD_ALPHA = DEFAULT_ALPHA
DD_MAX_BUCKETS = DEFAULT_MAX_BUCKETS
_DD = DDSketch(DD_ALPHA, DD_MAX_BUCKETS)
_LN_GAMMA = math.log((1.0 + DD_ALPHA) / (1.0 - DD_ALPHA))
# The first factor of HyperLogLog.estimate's last line, as Python computes it.
_HLL_SCALE = HLL_M * HLL_M / (2.0 * math.log(2.0))
# Enough rounds for Ertl's sigma and tau series to converge for any m up to 2**18 (they
# stop changing long before; further rounds add terms too small to change the sum).
_SERIES_ROUNDS = 64

STATE_COLUMNS: Mapping[str, str] = {
    "entity_hll": "SimpleAggregateFunction(maxMap, Map(UInt16, UInt8))",
    "value_dd_pos": "SimpleAggregateFunction(sumMap, Map(Int32, UInt64))",
    "value_dd_neg": "SimpleAggregateFunction(sumMap, Map(Int32, UInt64))",
    "value_dd_zero": "SimpleAggregateFunction(sum, UInt64)",
}
"""The sketch columns of the aggregate tables and their ClickHouse types."""

DISTINCT_COLUMNS = ("entity_hll",)
QUANTILE_COLUMNS = ("value_dd_pos", "value_dd_neg", "value_dd_zero")

MERGE_SQL: Mapping[str, str] = {
    "entity_hll": "maxMap(entity_hll)",
    "value_dd_pos": "sumMap(value_dd_pos)",
    "value_dd_neg": "sumMap(value_dd_neg)",
    "value_dd_zero": "sum(value_dd_zero)",
}
"""How rows of the aggregate tables merge each sketch column (the HLL and DDSketch merges)."""


def _u64(value: int | Any) -> str:
    return f"toUInt64({int(value)})"


def hash64_sql(column: str) -> str:
    """SQL of :func:`core.sketches.hash64` of a String column: the same UInt64 per value.

    The polynomial ``sum_j b_j P**j`` is folded from the last byte (Horner), then mixed
    with the length and finished with ``fmix64``; UInt64 products and sums wrap as
    NumPy's do.
    """
    codes = (
        f"arrayMap(i -> toUInt64(reinterpretAsUInt8(substring({column}, i, 1))), "
        f"arrayReverse(range(1, length({column}) + 1)))"
    )
    poly = f"arrayFold((acc, b) -> acc * {_u64(_POLY_BASE)} + b, {codes}, toUInt64(0))"
    x = f"{poly} + toUInt64(length({column})) * {_u64(_LENGTH_MULT)} + {_u64(_BYTES_SEED)}"
    # fmix64 as a fold over its multipliers (the last, 1, only shifts): no repeated text.
    steps = f"[{_u64(_FMIX_1)}, {_u64(_FMIX_2)}, toUInt64(1)]"
    return f"arrayFold((x, c) -> bitXor(x, bitShiftRight(x, 33)) * c, {steps}, {x})"


def _bit_length_sql(x: str) -> str:
    """Exact bit length of a UInt64: smear the top bit down, then count the ones."""
    smear = f"arrayFold((y, s) -> bitOr(y, bitShiftRight(y, s)), [1, 2, 4, 8, 16, 32], {x})"
    return f"bitCount({smear})"


def hll_register_sql(hash_expr: str) -> str:
    """``map(index, rank)`` of one hash, as :func:`core.sketches._index_and_rank` gives."""
    index = f"toUInt16(bitShiftRight(h, {64 - HLL_P}))"
    rank = f"toUInt8(least(64 - {_bit_length_sql(f'bitShiftLeft(h, {HLL_P})')}, {_HLL_Q}) + 1)"
    # Through a one-element arrayMap, so the hash is computed (and written) once.
    return f"arrayMap(h -> map({index}, {rank}), [{hash_expr}])[1]"


def dd_key_sql(magnitude: str) -> str:
    """The DDSketch bucket key of a magnitude (>= ``MIN_MAGNITUDE``), as core computes it."""
    return f"toInt32(ceil(log({magnitude}) / {_LN_GAMMA!r}))"


def raw_state_sql(entity: str = "entity", value: str = "value") -> dict[str, str]:
    """Aggregates that fold raw events into the sketch columns (one per column).

    An empty ``entity`` is how the workers store an event without one (they count no
    entity for it), and a value that is not finite is in no quantile sketch.
    """
    one = "toUInt64(1)"
    finite = f"isFinite({value})"
    # Every row computes a key (the -If combinator evaluates its arguments first), so the
    # magnitude is kept finite and positive where the row is filtered out anyway.
    key = dd_key_sql(f"greatest(if({finite}, abs({value}), 1.0), {MIN_MAGNITUDE!r})")
    return {
        "entity_hll": f"maxMapIf({hll_register_sql(hash64_sql(entity))}, {entity} != '')",
        "value_dd_pos": f"sumMapIf(map({key}, {one}), {finite} AND {value} >= {MIN_MAGNITUDE!r})",
        "value_dd_neg": f"sumMapIf(map({key}, {one}), {finite} AND {value} <= {-MIN_MAGNITUDE!r})",
        "value_dd_zero": f"countIf(abs({value}) < {MIN_MAGNITUDE!r})",
    }


def _series_sql(step: str, start: str) -> str:
    """``arrayFold`` of a (x, y, z) recurrence over a fixed number of rounds; its z."""
    return f"arrayFold((s, i) -> {step}, range({_SERIES_ROUNDS}), {start}).3"


def distinct_sql(registers: str) -> str:
    """The distinct count of merged registers: :meth:`HyperLogLog.estimate` in SQL.

    ``registers`` is a ``Map(UInt16, UInt8)`` expression (a ``maxMap`` of states). The
    histogram, Ertl's sigma and tau series and the halving loop are the Python steps
    in the same order; the sigma and tau loops run a fixed number of rounds, past the
    point where Python stops (the terms left are too small to change the sum).
    """
    ranks = f"mapValues({registers})"
    m = float(HLL_M)
    # sigma: y=1, z=x; repeat x*=x; z+=x*y; y+=y
    sigma = _series_sql("(s.1 * s.1, s.2 + s.2, s.3 + (s.1 * s.1) * s.2)", "(x0, 1.0, x0)")
    # tau: y=1, z=1-x; repeat x=sqrt(x); y*=0.5; z-=(1-x)*(1-x)*y; then z/3
    tau = _series_sql(
        "(sqrt(s.1), s.2 * 0.5, s.3 - ((1.0 - sqrt(s.1)) * (1.0 - sqrt(s.1))) * (s.2 * 0.5))",
        "(t0, 1.0, 1.0 - t0)",
    )
    x0 = f"(({m!r} - length({ranks})) / {m!r})"
    t0 = f"(1.0 - countEqual({ranks}, {_HLL_Q + 1}) / {m!r})"
    start = f"if({t0} IN (0.0, 1.0), 0.0, {m!r} * ({tau.replace('t0', t0)} / 3.0))"
    halving = (
        f"arrayFold((z, k) -> 0.5 * (z + countEqual({ranks}, k)), "
        f"arrayReverse(range(1, {_HLL_Q + 1})), {start})"
    )
    z = f"{halving} + {m!r} * {sigma.replace('x0', x0)}"
    return f"if(length({ranks}) = 0, 0.0, {_HLL_SCALE!r} / ({z}))"


def _key_at_sql(keys: str, counts: str, rank: str) -> str:
    """Key of the element of 0-based ``rank``, after collapsing to ``DD_MAX_BUCKETS``."""
    found = f"{keys}[arrayFirstIndex(c -> c > {rank}, arrayCumSum({counts}))]"
    kept = f"{keys}[greatest(1, length({keys}) - {DD_MAX_BUCKETS - 1})]"
    return f"greatest({found}, {kept})"


def quantile_sql(pos: str, neg: str, zero: str, q: float) -> str:
    """``[sign, sign * key]`` of :meth:`DDSketch.quantile`'s bucket, ``[]`` when empty.

    ``pos``/``neg`` are merged ``Map(Int32, UInt64)`` expressions, ``zero`` the merged
    zero count. The array orders as the quantile values do, so ``ORDER BY`` ranks by
    it exactly; :func:`quantile_value` turns it into the number.
    """
    pk, pc = f"mapKeys({pos})", f"mapValues({pos})"
    nk, nc = f"mapKeys({neg})", f"mapValues({neg})"
    n_neg, n_pos = f"arraySum({nc})", f"arraySum({pc})"
    n = f"({n_neg} + {zero} + {n_pos})"
    rank = f"toUInt64(floor({q!r} * ({n} - 1)))"
    negative = f"[-1, -({_key_at_sql(nk, nc, f'{n_neg} - 1 - {rank}')})]"
    positive = f"[1, {_key_at_sql(pk, pc, f'{rank} - {n_neg} - {zero}')}]"
    return (
        f"if({n} = 0, CAST([] AS Array(Int64)), CAST(multiIf({rank} < {n_neg}, {negative}, "
        f"{rank} < {n_neg} + {zero}, [0, 0], {positive}) AS Array(Int64)))"
    )


def estimate_sql() -> dict[str, str]:
    """``distinct``, ``p50``, ``p90`` and ``p99`` of the rows a GROUP BY merges.

    The one definition of the estimates that every stored-aggregate reader uses (query
    API series and summaries, alerting's sealed windows); :func:`answer_value` turns
    each into what the API answers.
    """
    pos, neg, zero = (MERGE_SQL[column] for column in QUANTILE_COLUMNS)
    quantiles = {
        name: quantile_sql(pos, neg, zero, q)
        for name, q in zip(QUANTILE_NAMES, QUANTILE_LEVELS, strict=True)
    }
    return {"distinct": distinct_sql(MERGE_SQL["entity_hll"]), **quantiles}


def quantile_value(encoded: Sequence[int] | None) -> float | None:
    """The quantile a :func:`quantile_sql` answer stands for, as :meth:`DDSketch.quantile`.

    Returns None for an empty sketch.
    """
    if not encoded:
        return None
    sign, signed_key = int(encoded[0]), int(encoded[1])
    if sign == 0:
        return 0.0
    return sign * _DD.bucket_value(sign * signed_key)


def distinct_value(estimate: float | None) -> int | None:
    """A distinct count as every endpoint answers it: the estimate, rounded."""
    return None if estimate is None else round(estimate)


def answer_value(metric: str, raw: Any) -> Any:
    """A metric's stored form (see ``core.query_sql.METRIC_SQL``) as the API answers it."""
    if metric == "distinct":
        return distinct_value(raw)
    if metric in QUANTILE_NAMES:
        return quantile_value(raw)
    return raw


def hll_state(sketch: HyperLogLog) -> dict[int, int]:
    """A HyperLogLog as its ``entity_hll`` map: the non-zero registers, index to rank."""
    registers = sketch.registers
    index = registers.nonzero()[0]
    return dict(zip(index.tolist(), registers[index].tolist(), strict=True))


def hll_from_state(state: Mapping[int, int]) -> HyperLogLog:
    """The HyperLogLog an ``entity_hll`` map holds (precision ``HLL_P``)."""
    registers = np.zeros(HLL_M, dtype=np.uint8)
    if state:
        registers[np.fromiter(state.keys(), np.int64)] = np.fromiter(state.values(), np.uint8)
    return HyperLogLog.from_registers(HLL_P, registers)


def ddsketch_state(sketch: DDSketch) -> tuple[dict[int, int], dict[int, int], int]:
    """A DDSketch as its ``value_dd_pos``, ``value_dd_neg`` and ``value_dd_zero``."""
    zero, positive, negative = sketch.buckets()
    return dict(positive), dict(negative), zero


def ddsketch_from_state(pos: Mapping[int, int], neg: Mapping[int, int], zero: int) -> DDSketch:
    """The DDSketch of merged bucket maps, collapsed to ``DD_MAX_BUCKETS`` as core merges."""
    return DDSketch.from_buckets(zero, pos, neg, DD_ALPHA, DD_MAX_BUCKETS)
