"""`rayline up`, `status` and `down` on the real local stack."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from typing import Any

import pytest

from cluster.processes import alive, port_open
from cluster.settings import Settings
from tests.integration.conftest import RAYLINE, rayline


def status() -> dict[str, Any]:
    result = rayline("status", "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_status_reports_services_and_pipeline(stack: Settings) -> None:
    data = status()
    services = {s["name"]: s for s in data["services"]}
    assert set(services) == {"kafka", "postgres", "redis", "ray", "s3", "connect", "mosquitto"}
    assert all(s["state"] == "running" and s["pid"] for s in services.values())
    assert services["kafka"]["ports"] == [stack.kafka.port, stack.kafka.controller_port]
    workers = data["pipeline"]["workers"]
    assert len(workers) == stack.pipeline.workers
    assert all(w["alive"] for w in workers)
    owned = sorted(p for w in workers for p in w["partitions"])
    assert owned == list(range(stack.kafka.raw_partitions))
    assert set(data["rollups"]["sealed"]) == {"windows_1m", "rollup_1h", "rollup_1d"}
    assert data["archiver"]["state"] in ("running", "paused", "retrying")
    assert data["alerting"]["state"] in ("running", "paused")
    shown = rayline("status")
    assert "rollups sealed: rollup_1d" in shown.stdout, shown.stdout
    assert "archiver: " in shown.stdout
    assert "alerting: " in shown.stdout


def test_up_twice_keeps_what_runs(stack: Settings) -> None:
    before = status()
    result = rayline("up")
    assert result.returncode == 0, result.stdout + result.stderr
    after = status()
    assert [s["pid"] for s in after["services"]] == [s["pid"] for s in before["services"]]
    assert after["pipeline"]["epoch"] == before["pipeline"]["epoch"]
    assert "starting" not in result.stdout


@pytest.mark.stack_teardown
def test_ctrl_c_during_the_demo_stops_the_stack(stack: Settings) -> None:
    pids = [s["pid"] for s in status()["services"]]
    demo = subprocess.Popen(
        [str(RAYLINE), "demo", "--rate", "1000", "--duration", "120", "--then", "wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(15)  # the stack is up already: by now events are flowing
        demo.send_signal(signal.SIGINT)
        output, _ = demo.communicate(timeout=180)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 1, output
    assert "stopping the stack" in output
    assert "stopped: ray, s3, mosquitto, connect, kafka, redis, postgres" in output
    assert [name for name, port in stack.local_ports().items() if port_open(port)] == []
    assert [pid for pid in pids if alive(pid)] == []


@pytest.mark.stack_teardown
def test_down_stops_everything_and_leaves_nothing_listening(stack: Settings) -> None:
    # Start again from the state the previous stop left: nothing is formatted twice.
    started = rayline("up")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "initdb" not in started.stdout
    pids = [s["pid"] for s in status()["services"]]
    assert all(pids)
    result = rayline("down")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopped: ray, s3, mosquitto, connect, kafka, redis, postgres" in result.stdout
    listening = {name: port for name, port in stack.local_ports().items() if port_open(port)}
    assert listening == {}
    assert [pid for pid in pids if alive(pid)] == []
    again = rayline("down")
    assert again.returncode == 0
    assert "nothing was running" in again.stdout


def test_demo_counts_every_event_it_sends(stack: Settings) -> None:
    result = rayline("demo", "--rate", "2000", "--duration", "5", "--then", "keep")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "every event counted: sent 10,000, processed 10,000, lag 0" in result.stdout
    assert "stack keeps running" in result.stdout


def test_workers_publish_committed_offsets_for_standard_lag_tools(stack: Settings) -> None:
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

    from adapters.kafka import admin, end_offsets

    # Once the demo above has drained, the group's committed offsets reach the end of
    # every partition: what `kafka-consumer-groups.sh --describe` reads as lag 0.
    ends = end_offsets(stack.kafka.bootstrap, stack.kafka.raw_topic)
    request = ConsumerGroupTopicPartitions(
        stack.kafka.consumer_group,
        [TopicPartition(stack.kafka.raw_topic, p) for p in ends],
    )
    client = admin(stack.kafka.bootstrap)  # keep it alive until the answer came
    futures = client.list_consumer_group_offsets([request])
    answer = futures[stack.kafka.consumer_group].result(30)
    committed = {tp.partition: tp.offset for tp in answer.topic_partitions}
    assert committed == ends
    assert sum(ends.values()) >= 10_000  # at least the demo's events
