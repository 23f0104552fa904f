"""`rayline up`, `status` and `down` on the real local stack."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cluster.processes import alive, port_open
from cluster.settings import Settings
from tests.integration.conftest import rayline


def status() -> dict[str, Any]:
    result = rayline("status", "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_status_reports_services_and_pipeline(stack: Settings) -> None:
    data = status()
    services = {s["name"]: s for s in data["services"]}
    assert set(services) == {"kafka", "postgres", "redis", "ray"}
    assert all(s["state"] == "running" and s["pid"] for s in services.values())
    assert services["kafka"]["ports"] == [stack.kafka.port, stack.kafka.controller_port]
    workers = data["pipeline"]["workers"]
    assert len(workers) == stack.pipeline.workers
    assert all(w["alive"] for w in workers)
    owned = sorted(p for w in workers for p in w["partitions"])
    assert owned == list(range(stack.kafka.raw_partitions))


def test_up_twice_keeps_what_runs(stack: Settings) -> None:
    before = status()
    result = rayline("up")
    assert result.returncode == 0, result.stdout + result.stderr
    after = status()
    assert [s["pid"] for s in after["services"]] == [s["pid"] for s in before["services"]]
    assert after["pipeline"]["epoch"] == before["pipeline"]["epoch"]
    assert "starting" not in result.stdout


@pytest.mark.stack_teardown
def test_down_stops_everything_and_leaves_nothing_listening(stack: Settings) -> None:
    pids = [s["pid"] for s in status()["services"]]
    result = rayline("down")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopped: ray, kafka, redis, postgres" in result.stdout
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
