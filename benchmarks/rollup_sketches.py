"""Cost of building and reading the sketch states, next to ClickHouse's own states.

In-process chDB, no stack needed: ``python -m benchmarks.rollup_sketches --events N``.
Folds N raw events (the query benchmark's shape: entities ``user-<0..200000>``, values
0..1000) into per-minute states of Rayline's HyperLogLog and DDSketch (the SQL of
``core.sketch_states``) and, as the reference in the same run, into
``uniqCombinedState(14)`` and ``quantilesTDigestState``; then merges the minute states
into hours and reads distinct and p99 from them. Each figure is the best of three.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from chdb import session

from core.sketch_states import estimate_sql, raw_state_sql

_EVENTS = """
    SELECT toDateTime('2026-12-01 00:00:00', 'UTC') + intDiv(number * 86400, {n}) AS ts,
        concat('user-', toString(intHash64(number) % 200000)) AS entity,
        (intHash32(number * 7) % 100000) / 100 AS value
    FROM numbers({n})
"""


def _best(run: Callable[[], object]) -> float:
    times = []
    for _ in range(3):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=2_000_000)
    n = parser.parse_args().events
    s = session.Session()
    s.query("CREATE DATABASE IF NOT EXISTS b")
    s.query(
        f"CREATE OR REPLACE TABLE b.ev ENGINE = MergeTree ORDER BY ts AS {_EVENTS}".replace(
            "{n}", str(n)
        )
    )
    ours = ", ".join(f"{sql} AS {c}" for c, sql in raw_state_sql().items())
    theirs = "uniqCombinedState(14)(entity) AS d, quantilesTDigestState(0.5, 0.9, 0.99)(value) AS q"
    for name, states in (("ours", ours), ("theirs", theirs)):
        s.query(
            f"CREATE OR REPLACE TABLE b.{name} ENGINE = MergeTree ORDER BY m AS "
            f"SELECT toStartOfMinute(ts) AS m, {states} FROM b.ev GROUP BY m"
        )
    build_ours = _best(
        lambda: s.query(f"SELECT toStartOfMinute(ts) AS m, {ours} FROM b.ev GROUP BY m FORMAT Null")
    )
    build_theirs = _best(
        lambda: s.query(
            f"SELECT toStartOfMinute(ts) AS m, {theirs} FROM b.ev GROUP BY m FORMAT Null"
        )
    )
    est = estimate_sql()
    read_ours = _best(
        lambda: s.query(
            f"SELECT toStartOfHour(m) AS h, {est['distinct']}, {est['p99']} FROM b.ours "
            "GROUP BY h FORMAT Null"
        )
    )
    read_theirs = _best(
        lambda: s.query(
            "SELECT toStartOfHour(m) AS h, uniqCombinedMerge(14)(d), "
            "quantilesTDigestMerge(0.5, 0.9, 0.99)(q)[3] FROM b.theirs GROUP BY h FORMAT Null"
        )
    )
    print(f"{n:,} events, {n / 1e6:.1f} M, into 1,440 minute states")
    print(
        f"build minute states: ours {build_ours * 1000:8.1f} ms   "
        f"reference uniqCombined+t-digest {build_theirs * 1000:8.1f} ms   "
        f"ratio {build_ours / build_theirs:5.2f}"
    )
    print(
        f"24 hours' distinct + p99 from minute states: ours {read_ours * 1000:6.1f} ms   "
        f"reference {read_theirs * 1000:6.1f} ms   ratio {read_ours / read_theirs:5.2f}"
    )


if __name__ == "__main__":
    main()
