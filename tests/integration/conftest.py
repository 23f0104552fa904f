"""The integration tier: the real local stack, started once per session by `rayline up`
and stopped at the end by `rayline down`. Tests isolate themselves by uuid tenants.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition

from adapters.kafka import end_offsets
from cluster.settings import Settings, load_settings

RAYLINE = Path(sys.executable).parent / "rayline"
T = TypeVar("T")


def rayline(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run the real command line, as a user would."""
    return subprocess.run(
        [str(RAYLINE), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that stop the stack run after every other test.
    items.sort(key=lambda item: item.get_closest_marker("stack_teardown") is not None)


# The test stack allows an hour of lateness, so that tests may place events at known
# times in the recent past (and close windows on purpose by sending a later event).
STACK_ENV = {"RAYLINE_PIPELINE__ALLOWED_LATENESS_SECONDS": "3600"}


@pytest.fixture(scope="session")
def settings() -> Iterator[Settings]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in STACK_ENV.items():
            patch.setenv(name, value)
        yield load_settings()


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[Settings]:
    result = rayline("up")
    assert result.returncode == 0, f"rayline up failed:\n{result.stdout}\n{result.stderr}"
    yield settings
    rayline("down")


@pytest.fixture(scope="session")
def http(stack: Settings) -> Iterator[httpx.Client]:
    base = f"http://{stack.serve.host}:{stack.serve.port}"
    with httpx.Client(base_url=base, timeout=30) as client:
        yield client


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def eventually(probe: Callable[[], T], done: Callable[[T], bool], timeout: float = 60) -> T:
    """Call ``probe`` until ``done`` holds for its value; return the last value."""
    deadline = time.monotonic() + timeout
    value = probe()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.3)
        value = probe()
    return value


def raw_offsets(settings: Settings) -> dict[int, int]:
    return end_offsets(settings.kafka.bootstrap, settings.kafka.raw_topic)


def read_from(
    settings: Settings, topic: str, start: dict[int, int], count: int, timeout: float = 30
) -> list[Any]:
    """Read ``count`` records of ``topic`` written after the ``start`` offsets."""
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka.bootstrap, "group.id": f"test-{uuid.uuid4()}"}
    )
    try:
        consumer.assign([TopicPartition(topic, p, o) for p, o in start.items()])
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(records) < count and time.monotonic() < deadline:
            for msg in consumer.consume(count - len(records), 0.5):
                if msg.error() is None:
                    records.append(msg)
        return records
    finally:
        consumer.close()
