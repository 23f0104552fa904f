"""Does a long read hold back writes and other reads? chDB in one process, then the owner actor.

Three measurements, each with a CPU-heavy, bounded read (``count()`` over
``numbers(N)`` with a hash filter, N sized to take ``--heavy-seconds``) running while
a loop times 1,000-row Arrow inserts and short primary-key SELECTs:

1. in one process, the heavy read on a connection of its own (clickhouse-connect
   clients over one chDB data folder), then on the writer's own connection;
2. a Ray actor shaped like the old owner (one thread, one client for everything);
3. the real :class:`actors.clickhouse_owner.ClickHouseOwner`, deployed with its
   concurrency groups (``owner_concurrency``) as ``cluster.deploy`` does.

Starts a local Ray instance of its own (``num_cpus=2``); needs no stack. Run:
``python -m benchmarks.clickhouse_concurrency`` (figures in docs/storage.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import clickhouse_connect
import ray

from actors.clickhouse_owner import ClickHouseOwner, OwnerConfig, owner_concurrency

HEAVY = "SELECT count() FROM numbers({n:UInt64}) WHERE cityHash64(number) % 7 = 3"
SHORT = "SELECT sum(v) FROM m.t WHERE k < 1000"
ROWS = [[k, 1.0] for k in range(1000)]


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:.1f} ms, max {max(values) * 1000:.1f} ms"


def timed_loop(insert: Callable[[], Any], short: Callable[[], Any], rounds: int) -> str:
    inserts, shorts = [], []
    began = time.perf_counter()
    for _ in range(rounds):
        t = time.perf_counter()
        insert()
        inserts.append(time.perf_counter() - t)
        t = time.perf_counter()
        short()
        shorts.append(time.perf_counter() - t)
    took = time.perf_counter() - began
    return f"insert {ms(inserts)}; short read {ms(shorts)}; {rounds} rounds in {took:.2f} s"


def during(heavy: Callable[[], Any], loop: Callable[[], str]) -> tuple[float, str]:
    """Run ``heavy`` in a thread, ``loop`` meanwhile; return the heavy's seconds, the loop."""
    took: list[float] = []

    def run() -> None:
        t = time.perf_counter()
        heavy()
        took.append(time.perf_counter() - t)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.5)
    report = loop()
    thread.join()
    return took[0], report


def in_process(heavy_seconds: float, rounds: int) -> int:
    folder = tempfile.mkdtemp()
    writer = clickhouse_connect.get_client(dsn=f"chdb://{folder}")
    writer.command("CREATE DATABASE IF NOT EXISTS m")
    writer.command("CREATE TABLE m.t (k UInt64, v Float64) ENGINE = MergeTree ORDER BY k")
    writer.insert("m.t", ROWS, column_names=["k", "v"])
    reader, other = (clickhouse_connect.get_client(dsn=f"chdb://{folder}") for _ in range(2))
    t = time.perf_counter()
    reader.query(HEAVY, parameters={"n": 200_000_000})
    n = int(200_000_000 * heavy_seconds / (time.perf_counter() - t))

    def loop() -> str:
        return timed_loop(
            lambda: writer.insert("m.t", ROWS, column_names=["k", "v"]),
            lambda: other.query(SHORT),
            rounds,
        )

    print(f"chDB in one process, heavy read over {n:,} numbers")
    print(f"  alone:                          {loop()}")
    for label, client in (("own connection", reader), ("writer's connection", writer)):

        def heavy(client: Any = client) -> Any:
            return client.query(HEAVY, parameters={"n": n})

        took, report = during(heavy, loop)
        print(f"  heavy on the {label:<20} ({took:.1f} s): {report}")
    for client in (writer, reader, other):
        client.close()
    return n


class OldOwner:
    """The old owner's shape: one thread, one client for writes and reads."""

    def __init__(self, folder: str) -> None:
        self._client = clickhouse_connect.get_client(dsn=f"chdb://{folder}")
        self._client.command("CREATE DATABASE IF NOT EXISTS m")
        self._client.command("CREATE TABLE m.t (k UInt64, v Float64) ENGINE=MergeTree ORDER BY k")

    def insert_cdc_rows(self, table: str, columns: list[str], rows: list[list[Any]]) -> int:
        self._client.insert(f"m.{table}", rows, column_names=columns)
        return len(rows)

    def run_query(
        self, sql: str, parameters: dict[str, Any], settings: dict[str, Any] | None = None
    ) -> Any:
        return self._client.query(sql, parameters=parameters, settings=settings).result_rows


def actors(n: int, rounds: int) -> None:
    # A local ray.init() otherwise writes ~/.ray/auth_token, which turns token auth on
    # for every later Ray head and driver of this user (the stack's among them).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    try:
        old: Any = ray.remote(OldOwner).options(num_cpus=0).remote(tempfile.mkdtemp())
        remote: Any = ray.remote  # its overloads leave out concurrency_groups
        new_class = remote(concurrency_groups=owner_concurrency(8))(ClickHouseOwner)
        config = OwnerConfig(f"chdb://{tempfile.mkdtemp()}", "m", rollup_interval_seconds=0)
        new: Any = new_class.options(num_cpus=0).remote(config)
        table = "CREATE TABLE m.t (k UInt64, v Float64) ENGINE = MergeTree ORDER BY k"
        ray.get(new.execute.remote(table))
        for label, owner in (
            ("old owner (one thread, one client)", old),
            ("ClickHouseOwner (concurrency groups)", new),
        ):
            ray.get(owner.insert_cdc_rows.remote("t", ["k", "v"], ROWS))

            def loop(owner: Any = owner) -> str:
                return timed_loop(
                    lambda: ray.get(owner.insert_cdc_rows.remote("t", ["k", "v"], ROWS)),
                    lambda: ray.get(owner.run_query.remote(SHORT, {})),
                    rounds,
                )

            print(f"{label}")
            print(f"  alone:            {loop()}")

            def heavy(owner: Any = owner) -> Any:
                return ray.get(owner.run_query.remote(HEAVY, {"n": n}))

            took, report = during(heavy, loop)
            print(f"  during heavy ({took:.1f} s): {report}")
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heavy-seconds", type=float, default=6.0, help="length of the read")
    parser.add_argument("--rounds", type=int, default=10, help="inserts and reads timed")
    args = parser.parse_args()
    n = in_process(args.heavy_seconds, args.rounds)
    actors(n, args.rounds)


if __name__ == "__main__":
    main()
