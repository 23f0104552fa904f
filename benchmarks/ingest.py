"""Ingest throughput: the Serve app next to a bare Starlette app running the same handler.

Both run :class:`serve_apps.edge.IngestEdge` (API key check, body parse, validation,
produce to Kafka, wait for the acks) against the stack's Kafka, PostgreSQL and Redis,
writing to a fresh topic that no worker reads. ``wrk`` drives each with the same
requests from another process:

* batched: ``POST /v1/events`` with N events per request (default 500);
* single: one event per request;
* webhook batched: a GitHub-signed ``POST /v1/sources/{s}/webhook`` of N payloads,
  each mapped to an event (signature check, replay-id claim in Redis, mapping).

Two references, measured in the same run with the same wrk settings:

* the same handler in a bare FastAPI/Starlette app under uvicorn (one process, no
  Ray), so the ratio shows what Serve's proxy and replica hop cost;
* a hello-world Serve deployment (returns a constant, reads nothing) driven by the
  single-event requests: the most any one-event request can get through Serve here.
Needs the stack (`rayline up`) and wrk (Debian package).

Run: ``.venv/bin/python -m benchmarks.ingest --seconds 15``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import ray
from confluent_kafka import Producer
from ray import serve

from adapters.kafka import AsyncBatchProducer, Record, TopicSpec, end_offsets, ensure_topics
from adapters.publisher import EventPublisher, Outgoing, raw_headers
from adapters.sources import Source, SourceCatalog
from cluster.deploy import connected, edge_config
from cluster.settings import Settings, load_settings
from core import signatures
from core.envelope import validate_events

BENCH_APP = "ingest-bench"
BENCH_ROUTE = "/bench"
HELLO_APP = "hello-bench"
HELLO_ROUTE = "/hello"
PARTITIONS = 8


def _batch(n: int, tenant: str) -> bytes:
    now = time.time()
    return orjson.dumps(
        [
            {
                "event_id": f"b-{i}",
                "tenant": tenant,
                "type": "click",
                "ts": now,
                "entity": f"dev-{i % 1000}",
                "value": i % 7,
                "attributes": {"page": "/checkout", "country": "DE"},
            }
            for i in range(n)
        ]
    )


def _wrk_script(folder: Path, body: bytes, key: str) -> Path:
    body_file = folder / f"body-{len(body)}.json"
    body_file.write_bytes(body)
    script = folder / f"post-{len(body)}.lua"
    script.write_text(
        f'local f = io.open("{body_file}", "rb")\n'
        "wrk.body = f:read('*a')\nf:close()\n"
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
        "local statuses = {}\n"
        "response = function(status, headers, body)\n"
        "  statuses[status] = (statuses[status] or 0) + 1\n"
        "end\n"
    )
    return script


def _webhook_script(folder: Path, secret: str, batch: int, tag: str, count: int = 20_000) -> Path:
    """GitHub-signed deliveries of ``batch`` payloads each, all different, so that no
    request is a replay: GitHub signs the body only and the edge refuses a body it has
    seen (``ingest.delivery_ttl_seconds``). Request ``i`` (of ``count``, round robin,
    wrk's two threads on alternate ones) differs in the first payload's id, and carries
    its precomputed signature; ``tag`` keeps each run's bodies apart."""
    body = _deliveries(batch)
    head, tail = b'[{"id":"' + tag.encode() + b"-", b'",' + body[len(b'[{"id":"w-0",') :]
    signatures_file = folder / f"webhook-{tag}.txt"
    signatures_file.write_text(
        "\n".join(
            signatures.sign(
                "github", secret, head + str(i).encode() + tail, now_s=0, delivery_id="-"
            )["x-hub-signature-256"]
            for i in range(count)
        )
    )
    script = folder / f"webhook-{tag}.lua"
    script.write_text(
        f"local head = {_lua_string(head)}\n"
        f"local tail = {_lua_string(tail)}\n"
        "local signed = {}\n"
        f'for line in io.lines("{signatures_file}") do signed[#signed + 1] = line end\n'
        "local threads = 0\n"
        "function setup(thread)\n"
        '  thread:set("tid", threads)\n'
        "  threads = threads + 1\n"
        "end\n"
        "local n = 0\n"
        "request = function()\n"
        "  local i = (n * 2 + (tid or 0)) % #signed\n"
        "  n = n + 1\n"
        "  local headers = {}\n"
        '  headers["Content-Type"] = "application/json"\n'
        '  headers["X-Hub-Signature-256"] = signed[i + 1]\n'
        '  headers["X-GitHub-Delivery"] = tostring(i)\n'
        '  return wrk.format("POST", nil, headers, head .. tostring(i) .. tail)\n'
        "end\n"
    )
    return script


def _lua_string(data: bytes) -> str:
    """A Lua long-bracket string literal holding ``data`` (JSON text: no ']]=]')."""
    return "[==[" + data.decode() + "]==]"


def _webhook_source(settings: Settings) -> tuple[str, str]:
    """A GitHub-signed source mapping each array element to an event; (name, secret)."""
    name = f"bench-gh-{uuid.uuid4().hex[:8]}"
    secret = signatures.new_secret("github")
    source = Source(
        name=name,
        kind="webhook",
        tenant="bench",
        auth="hmac",
        scheme="github",
        secrets=(secret,),
        mapping={"event_id": "$.id", "type": "const:push", "ts": "now", "entity": "$.repo"},
        events_per_second=1e9,
        burst=1_000_000_000,
    )

    async def add() -> None:
        catalog = SourceCatalog(settings.postgres.dsn(), max_size=1)
        try:
            await catalog.add_source(source)
        finally:
            await catalog.close()

    asyncio.run(add())
    return name, secret


def _deliveries(n: int) -> bytes:
    return orjson.dumps(
        [{"id": f"w-{i}", "repo": f"acme/r{i % 50}", "ref": "main"} for i in range(n)]
    )


_CPU_KINDS = (
    ("ServeReplica:ingest-bench", "Serve replica (the handler)"),
    ("ProxyActor", "Serve proxy"),
    ("kafka.Kafka", "Kafka broker (JVM)"),
    ("wrk", "wrk (load generator)"),
    ("raylet", "Ray raylet"),
    ("gcs_server", "Ray GCS"),
    ("ServeController", "Serve controller"),
    ("postgres", "PostgreSQL"),
    ("redis-server", "Redis"),
)


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system, all threads) of every process now, by pid, with
    the kind of process it is (from its command line)."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        used = (int(fields[11]) + int(fields[12])) / tick
        kind = next((label for mark, label in _CPU_KINDS if mark in cmdline), "other")
        found[int(entry.name)] = (kind, used)
    return found


def cpu_shares(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], wall_s: float
) -> dict[str, float]:
    """Cores used by each kind of process between two :func:`cpu_seconds` snapshots."""
    shares: dict[str, float] = {}
    for pid, (kind, used) in after.items():
        spent = used - before.get(pid, (kind, 0.0))[1]
        shares[kind] = shares.get(kind, 0.0) + spent / wall_s
    return dict(sorted(shares.items(), key=lambda item: -item[1]))


def _replica_pid(after: dict[int, tuple[str, float]]) -> int | None:
    return next((p for p, (k, _) in after.items() if k.startswith("Serve replica")), None)


def profile_replica(seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """Start py-spy on the bench replica for ``seconds`` (collapsed stacks in ``out``)."""
    pid = _replica_pid(cpu_seconds())
    spy = Path(sys.executable).with_name("py-spy")
    if pid is None or not spy.exists():
        print("no bench replica or no py-spy: not profiled", file=sys.stderr)
        return None
    argv = [str(spy), "record", "--pid", str(pid), "--duration", str(int(seconds))]
    argv += ["--format", "raw", "--rate", "200", "--nonblocking", "-o", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wrk(url: str, script: Path, seconds: float, connections: int) -> dict[str, float]:
    """Requests/s and non-2xx count of one wrk run."""
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{int(seconds)}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    latency = re.search(r"Latency\s+([\d.]+)(\w+)", out)
    return {
        "rps": rate,
        "non_2xx": float(bad.group(1)) if bad else 0.0,
        "latency": float(latency.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[latency.group(2)]
        if latency
        else 0.0,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _key(settings: Settings) -> str:
    async def make() -> str:
        catalog = SourceCatalog(settings.postgres.dsn(), max_size=1)
        try:
            return await catalog.create_key("*", "ingest benchmark")
        finally:
            await catalog.close()

    return asyncio.run(make())


def _wait(url: str, key: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            answer = httpx.post(
                url, content=_batch(1, "warmup"), headers={"authorization": f"Bearer {key}"}
            )
            if answer.status_code == 202:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer 202 within {timeout:.0f} s")


def deploy_bench_app(settings: Settings, topic: str, replicas: int) -> str:
    """The ingest deployment again, as its own Serve app writing to ``topic``."""
    from serve_apps.ingest import IngestAPI

    config = edge_config(settings)
    config = dataclasses.replace(config, topic=topic, max_consumer_lag=0)
    app = IngestAPI.options(  # type: ignore[attr-defined]
        name="IngestBench",
        num_replicas=replicas,
        max_ongoing_requests=settings.serve.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    ).bind(config)
    serve.run(app, name=BENCH_APP, route_prefix=BENCH_ROUTE, blocking=False)
    return f"http://{settings.serve.host}:{settings.serve.port}{BENCH_ROUTE}/v1/events"


def deploy_hello_app(settings: Settings) -> str:
    """A Serve deployment that answers a constant: the single-event reference."""

    @serve.deployment(
        name="HelloBench",
        max_ongoing_requests=settings.serve.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    )
    class HelloBench:
        async def __call__(self, _request: Any) -> str:
            return "hello"

    serve.run(HelloBench.bind(), name=HELLO_APP, route_prefix=HELLO_ROUTE, blocking=False)  # type: ignore[attr-defined]
    return f"http://{settings.serve.host}:{settings.serve.port}{HELLO_ROUTE}"


def _wait_get(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s")


def start_bare_app(topic: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RAYLINE_BENCH_TOPIC": topic}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "benchmarks.bare_ingest:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env=env,
    )


_SWEEP: list[tuple[str, int, dict[str, Any]]] = [
    ("linger 5 ms, lz4 (the default)", 5, {}),
    ("linger 20 ms, lz4", 20, {}),
    ("linger 0 ms, lz4", 0, {}),
    ("linger 5 ms, no compression", 5, {"compression.type": "none"}),
    ("linger 5 ms, zstd", 5, {"compression.type": "zstd"}),
    ("linger 5 ms, lz4, batch.size 1 MiB", 5, {"batch.size": 1024 * 1024}),
]


def _bench_records(batch: int) -> list[Record]:
    envelopes, _ = validate_events(
        orjson.loads(_batch(batch, "bench")),
        default_source="bench",
        received_at_ms=int(time.time() * 1000),
    )
    out = Outgoing()
    out.add_envelopes(envelopes, raw_headers())
    return out.raw


async def _publish_for(
    publisher: EventPublisher, records: list[Record], seconds: float, concurrency: int
) -> int:
    """Records acknowledged while ``concurrency`` senders publish ``records`` over and
    over, as that many concurrent requests would."""
    sent = 0
    deadline = time.monotonic() + seconds

    async def sender() -> None:
        nonlocal sent
        while time.monotonic() < deadline:
            await publisher.publish(Outgoing(raw=records))
            sent += len(records)

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return sent


def _flush_only(bootstrap: str, topic: str, records: list[Record], seconds: float) -> int:
    """The reference without a Python callback per record: produce, then flush()."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
        }
    )
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(8):
            for key, value, headers in records:
                producer.produce(topic, value, key, headers=headers)
        producer.flush(30)
        sent += 8 * len(records)
    return sent


def producer_sweep(settings: Settings, topic: str, seconds: float, batch: int) -> None:
    """The publisher alone, in this process, with each producer setting of the sweep:
    records/s and this process's CPU (all threads, librdkafka's included) per record."""
    records = _bench_records(batch)
    bootstrap = settings.kafka.bootstrap
    print(f"publisher alone, {batch}-record batches, 8 concurrent senders, {seconds:.0f} s each:")
    print(f"{'':44}{'records/s':>12}{'CPU µs/record':>15}")
    for label, linger, tuning in _SWEEP:
        producer = AsyncBatchProducer(
            bootstrap, linger_ms=linger, queue_max_messages=200_000, tuning=tuning
        )
        publisher = EventPublisher(producer, topic, settings.kafka.dlq_topic)
        cpu, wall = time.process_time(), time.monotonic()
        sent = asyncio.run(_publish_for(publisher, records, seconds, 8))
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        publisher.close()
        print(f"  {label:42}{sent / wall:>12,.0f}{cpu / sent * 1e6:>15.1f}")
    cpu, wall = time.process_time(), time.monotonic()
    sent = _flush_only(bootstrap, topic, records, seconds)
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    label = "reference: no callback, flush() per 8 batches"
    print(f"  {label:42}{sent / wall:>12,.0f}{cpu / sent * 1e6:>15.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15, help="length of each wrk run")
    parser.add_argument("--batch", type=int, default=500, help="events per batched request")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument(
        "--replicas", type=int, default=None, help="Serve replicas (default: serve.ingest_replicas)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="write py-spy's collapsed stacks of the Serve replica during the batched run "
        "here (and during the single-event run next to it, .single.txt)",
    )
    parser.add_argument(
        "--producer-sweep",
        action="store_true",
        help="measure only the publisher in this process, with each producer setting",
    )
    args = parser.parse_args(argv)
    if args.producer_sweep:
        settings = load_settings()
        topic = f"bench.publish.{uuid.uuid4().hex[:8]}"
        ensure_topics(settings.kafka.bootstrap, [TopicSpec(topic, PARTITIONS)])
        producer_sweep(settings, topic, args.seconds, args.batch)
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk (or make setup)", file=sys.stderr)
        return 1
    settings = load_settings()
    topic = f"bench.ingest.{uuid.uuid4().hex[:8]}"
    ensure_topics(settings.kafka.bootstrap, [TopicSpec(topic, PARTITIONS)])
    key = _key(settings)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="rayline-bench-") as tmp:
        folder = Path(tmp)
        batched = _wrk_script(folder, _batch(args.batch, "bench"), key)
        single = _wrk_script(folder, _batch(1, "bench"), key)
        source, secret = _webhook_source(settings)
        bare_hook = _webhook_script(folder, secret, args.batch, f"bare{uuid.uuid4().hex[:6]}")
        serve_hook = _webhook_script(folder, secret, args.batch, f"serve{uuid.uuid4().hex[:6]}")
        hook_path = f"/v1/sources/{source}/webhook"
        port = _free_port()
        bare = start_bare_app(topic, port)
        try:
            bare_url = f"http://127.0.0.1:{port}/v1/events"
            _wait(bare_url, key)
            print("bare Starlette app under uvicorn ...", flush=True)
            results["bare batched"] = wrk(bare_url, batched, args.seconds, args.connections)
            results["bare single"] = wrk(bare_url, single, args.seconds, args.connections)
            results["bare webhook batched"] = wrk(
                f"http://127.0.0.1:{port}{hook_path}", bare_hook, args.seconds, args.connections
            )
        finally:
            bare.terminate()
            bare.wait(10)
        with connected(settings):
            replicas = args.replicas or settings.serve.ingest_replicas
            serve_url = deploy_bench_app(settings, topic, replicas)
            try:
                _wait(serve_url, key)
                print("Ray Serve app ...", flush=True)
                spy = profile_replica(args.seconds, args.profile) if args.profile else None
                before, started = cpu_seconds(), time.monotonic()
                results["serve batched"] = wrk(serve_url, batched, args.seconds, args.connections)
                shares = cpu_shares(before, cpu_seconds(), time.monotonic() - started)
                if spy is not None:
                    spy.wait(30)
                spy = (
                    profile_replica(args.seconds, args.profile.with_suffix(".single.txt"))
                    if args.profile
                    else None
                )
                results["serve single"] = wrk(serve_url, single, args.seconds, args.connections)
                if spy is not None:
                    spy.wait(30)
                results["serve webhook batched"] = wrk(
                    serve_url.replace("/v1/events", hook_path),
                    serve_hook,
                    args.seconds,
                    args.connections,
                )
            finally:
                serve.delete(BENCH_APP)
            hello_url = deploy_hello_app(settings)
            try:
                _wait_get(hello_url)
                print("Ray Serve hello-world ...", flush=True)
                results["serve hello-world"] = wrk(
                    hello_url, single, args.seconds, args.connections
                )
            finally:
                serve.delete(HELLO_APP)
                ray.shutdown()
    stored = sum(end_offsets(settings.kafka.bootstrap, topic).values())
    report(results, args.batch, stored)
    print(f"\ncores used during the Serve batched run ({os.cpu_count()} on this machine):")
    for kind, cores in shares.items():
        print(f"  {kind:32}{cores:>6.2f}")
    return 0


def report(results: dict[str, dict[str, Any]], batch: int, stored: int) -> None:
    print()
    print(f"{'':28}{'requests/s':>12}{'events/s':>12}{'latency avg':>14}{'non-2xx':>9}")
    for name, r in results.items():
        per = batch if "batched" in name else 1  # hello-world: one (constant) answer
        print(
            f"{name:28}{r['rps']:>12,.0f}{r['rps'] * per:>12,.0f}"
            f"{r['latency']:>11,.1f} ms{r['non_2xx']:>9,.0f}"
        )
    for kind in ("batched", "single", "webhook batched"):
        ratio = results[f"serve {kind}"]["rps"] / results[f"bare {kind}"]["rps"]
        print(f"{'ratio Serve / bare, ' + kind:28}{ratio:>12.2f}")
    hello = results["serve hello-world"]["rps"]
    ratio = results["serve single"]["rps"] / hello
    print(f"{'ratio single / hello-world':28}{ratio:>12.2f}")
    print(f"records in the bench topic after all runs: {stored:,}")


if __name__ == "__main__":
    sys.exit(main())
