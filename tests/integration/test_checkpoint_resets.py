"""A worker whose checkpoint names offsets its partition no longer has (the topic was
recreated, as after `rm -rf .state` with PostgreSQL's cluster kept outside it) resets
that partition, processes what comes, and says so in `rayline status` and its log.

Recreating the shared raw topic would take every other test's data with it; the test
gives one partition a checkpoint past its end instead, which is what a recreated topic
looks like to the worker, and leaves the topic as it was."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import orjson

from adapters.kafka import end_offsets
from adapters.postgres import CheckpointStore
from cluster.settings import Settings
from cluster.stack import LocalStack
from tests.integration.conftest import eventually, rayline, read_matching


def post(http: httpx.Client, events: list[dict[str, Any]]) -> None:
    answer = http.post("/v1/events", json=events)
    assert answer.status_code == 202, answer.text


def counted(http: httpx.Client, tenant: str) -> int:
    now = time.time()
    query: dict[str, Any] = {"tenant": tenant, "from": now - 3600, "to": now + 3600}
    answer = http.get("/v1/query/latest/order", params=query)
    assert answer.status_code == 200, answer.text
    return int(answer.json()["total"]["count"])


def resets() -> list[dict[str, Any]]:
    result = rayline("status", "--json")
    assert result.returncode == 0, result.stderr
    workers = json.loads(result.stdout)["pipeline"]["workers"]
    return [r for w in workers for r in w.get("checkpoint_resets", [])]


def test_a_checkpoint_past_the_end_is_reset_and_reported(
    http: httpx.Client, stack: Settings, tenant: str
) -> None:
    topic = stack.kafka.raw_topic
    ts = int(time.time()) - 600  # on time for the test stack's hour of lateness

    def order(n: int) -> dict[str, Any]:
        return {"event_id": f"r-{n}", "tenant": tenant, "type": "order", "ts": ts, "entity": "e"}

    # One entity, hence one partition: find it from the first event.
    before = end_offsets(stack.kafka.bootstrap, topic)
    post(http, [order(0)])
    (first,) = read_matching(stack, topic, before, lambda m: tenant.encode() in m.value(), 1)
    partition = first.partition()
    store = CheckpointStore(stack.postgres.dsn())
    try:
        saved = eventually(
            lambda: store.load(topic, partition),
            lambda row: row is not None and row[1] > first.offset(),
            timeout=30,
        )
        assert saved is not None, f"partition {partition} has no checkpoint"
        assert saved[1] > first.offset(), saved
        # The checkpoint now points far past the partition's end, under a newer epoch
        # (the running owner is fenced off it); the new workers restore it.
        _epoch, _offset, blob = saved
        beyond = end_offsets(stack.kafka.bootstrap, topic)[partition] + 1_000_000
        data = orjson.loads(blob)
        data["snapshot"]["next_offset"] = data["snapshot"]["dedup_from"] = beyond
        planted = store.save(topic, store.next_epoch(), {partition: (beyond, orjson.dumps(data))})
        assert planted == {partition}
    finally:
        store.close()
    scaled = rayline("scale", "workers", str(stack.pipeline.workers))
    assert scaled.returncode == 0, scaled.stdout + scaled.stderr

    post(http, [order(n) for n in range(1, 41)])
    # The fresh state re-reads the partition from its start: the first event counts
    # again there, and only there (the discarded state's window with it is gone).
    total = eventually(lambda: counted(http, tenant), lambda n: n >= 41, timeout=45)
    assert total == 41

    (report,) = [r for r in resets() if r["partition"] == partition]
    assert report["action"] == "reset"
    assert report["checkpoint_offset"] == beyond
    assert report["start_offset"] == report["low"] < report["high"] < beyond
    assert "started fresh" in report["reason"]
    shown = rayline("status")
    assert f"partition {partition}: checkpoint at offset {beyond} is past the end" in " ".join(
        shown.stdout.split()
    ), shown.stdout
    logs = (LocalStack(stack)._ray_temp() / "session_latest" / "logs").glob("worker-*")
    said = f"partition {partition}: checkpoint at offset {beyond} is past the end"
    assert any(said in path.read_text(errors="replace") for path in logs)
